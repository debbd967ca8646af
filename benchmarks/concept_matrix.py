"""Method x concept: which methods learn a concept the base model cannot draw, and which only one it can.

Every subject method is trained with its default params (`params.yaml`) on the unseen star and on the seen-but-unnamed
cross, and every style method on the unseen outlined style and the seen dark background; each model is scored by the
evaluate stage's own code (`fidelity` on a shape, `style` on a style) beside the base model's rate on the same prompts
and seeds. The finding it should reproduce, as on real Stable Diffusion: methods that leave the UNet frozen (textual
inversion, DreamArtist, CLIP inversion, aesthetic gradient) find what the base can already draw; methods that train
weights also teach what it cannot. Null-text inversion reconstructs given images and learns no concept: not a row.

It reads the default `dvc repro`'s prepared datasets, captions, latents and class images (run that first). Each
combination trains into `<work>/<concept>/train/<method>` and is scored into `<work>/<concept>/eval`; a combination
that is the default run's own (same method, same concept, `artifacts/eval/models/<method>/metrics.json` present) is
read from there unless `--retrain-all`. Not part of `dvc repro`: about 2 minutes per trained combination here.

    python benchmarks/concept_matrix.py [--work /tmp/concept_matrix] [--methods lora textual_inversion ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdpipe.config import parse_params  # noqa: E402
from sdpipe.evaluate import evaluate_model, row_concept  # noqa: E402
from sdpipe.methods.registry import METHODS  # noqa: E402
from sdpipe.models.loading import resolve_device  # noqa: E402

SUBJECT_METHODS = ("textual_inversion", "dreamartist", "clip_inversion", "lora", "dreambooth", "finetune", "custom_diffusion")
STYLE_METHODS = ("aesthetic_gradient", "hypernetwork")
SUBJECT_CONCEPTS = ("star", "cross")  # unseen, seen but unnamed
STYLE_CONCEPTS = ("outlined", "dark")
FROZEN_UNET = {"textual_inversion", "dreamartist", "clip_inversion", "aesthetic_gradient"}


def combination_params(data: dict, method: str, concept: str, work: Path):
    """The default params with `method` trained on `concept` alone, writing into `work/<concept>`."""
    data = json.loads(json.dumps(data))
    section = data["train"][method]
    if method == "custom_diffusion":
        section["concepts"] = [{**section["concepts"][0], "dataset": concept}]
    else:
        section["datasets"] = [concept]
    if method == "aesthetic_gradient":
        section["embedding_name"] = None  # named after the dataset
    data["train"]["methods"] = [method]
    folder = work / concept
    data["paths"] |= {"train": str(folder / "train"), "eval": str(folder / "eval"), "checkpoints": str(folder / "checkpoints")}
    return parse_params(data)


def score_of(metrics: dict, concept: str) -> float | None:
    return metrics.get("concept_rates", {}).get(concept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--work", default="/tmp/concept_matrix")
    parser.add_argument("--methods", nargs="*", default=[*SUBJECT_METHODS, *STYLE_METHODS])
    parser.add_argument("--retrain-all", action="store_true", help="also retrain the default run's own combinations")
    args = parser.parse_args()

    data = yaml.safe_load(Path(args.params).read_text(encoding="utf-8"))
    defaults = parse_params(data)
    work = Path(args.work)
    device = resolve_device(defaults.base.device)
    repro_rows = Path(defaults.paths.eval) / "models"

    base_file = repro_rows / "base" / "metrics.json"
    if base_file.is_file() and not args.retrain_all:
        base = json.loads(base_file.read_text())
    else:
        base = evaluate_model(combination_params(data, "lora", "star", work), "base", device)
    results: dict[str, dict[str, dict]] = {}
    for method in args.methods:
        concepts = STYLE_CONCEPTS if method in STYLE_METHODS else SUBJECT_CONCEPTS
        for concept in concepts:
            default_row = repro_rows / method / "metrics.json"
            is_default = method in defaults.train.methods and row_concept(defaults, method) == concept
            if is_default and default_row.is_file() and not args.retrain_all:
                metrics, seconds, source = json.loads(default_row.read_text()), None, "dvc repro"
            else:
                params = combination_params(data, method, concept, work)
                start = time.monotonic()
                METHODS[method].train(params, out_dir=Path(params.paths.train) / method)
                metrics = evaluate_model(params, method, device)
                seconds, source = round(time.monotonic() - start, 1), "trained here"
            results.setdefault(method, {})[concept] = {
                "rate": score_of(metrics, concept), "editability": metrics.get("editability"),
                "seconds": seconds, "source": source,
            }
            print(f"{method} on {concept}: {results[method][concept]}", flush=True)

    lines = [
        "| method | UNet | " + " | ".join(f"{c} ({'unseen' if i == 0 else 'seen'})" for i, c in enumerate(SUBJECT_CONCEPTS))
        + " | " + " | ".join(f"{c} ({'unseen' if i == 0 else 'seen'})" for i, c in enumerate(STYLE_CONCEPTS)) + " |",
        "|---|---|---|---|---|---|",
    ]
    base_cells = [f"{score_of(base, c):.2f}" if score_of(base, c) is not None else "" for c in (*SUBJECT_CONCEPTS, *STYLE_CONCEPTS)]
    lines.append("| base model (no training) | — | " + " | ".join(base_cells) + " |")
    for method, row in results.items():
        cells = []
        for concept in (*SUBJECT_CONCEPTS, *STYLE_CONCEPTS):
            rate = row.get(concept, {}).get("rate")
            cells.append("" if rate is None else f"{rate:.2f}")
        unet = "frozen" if method in FROZEN_UNET else "trained"
        lines.append(f"| {method} | {unet} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print("\nShare of samples showing the concept (subjects: `a <color> <token> shape` read as the shape; styles: "
          "`a <color> <shape>` read in the style), 8 seeds x 4 colors, the base's rate on the same prompts first:\n")
    print(table)
    work.mkdir(parents=True, exist_ok=True)
    (work / "concept_matrix.json").write_text(json.dumps({"base": base.get("concept_rates"), "methods": results}, indent=2))
    print(f"\nwritten: {work / 'concept_matrix.json'}")


if __name__ == "__main__":
    main()
