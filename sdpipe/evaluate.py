"""The evaluate stage: sample each model with the same prompts and seeds and score it with the oracle.

Writes `<eval>/<model>/metrics.json` and `grid.png` per model, and `summary.json` + `summary.md` with one row
per model. Models evaluated so far: the base model (trained, merged and exported models join as their
stages are built).
"""

from __future__ import annotations

from pathlib import Path

from diffusers import StableDiffusionPipeline

from sdpipe.config.evaluate import EvaluateParams
from sdpipe.io import atomic_path, write_json
from sdpipe.progress import log
from sdpipe.tinyworld import scoring, world


def evaluate_pipeline(pipeline: StableDiffusionPipeline, params: EvaluateParams, out_dir: Path) -> dict:
    """Held-in `a <color> <shape>` accuracy and the held-out star's shape accuracy, plus a sample grid."""
    pipeline.set_progress_bar_config(disable=True)
    seeds = list(range(params.seeds_per_prompt))
    held_in = scoring.color_shape_probes(world.PRETRAIN_SHAPES)
    held_out = scoring.color_shape_probes(world.HELD_OUT_SHAPES)
    probes = held_in + held_out
    images = scoring.sample(
        pipeline, [p.prompt for p in probes], seeds, params.steps, params.guidance_scale, params.batch_size
    )
    split = len(held_in) * len(seeds)
    held_in_scores = scoring.score_probes(images[:split], held_in, len(seeds))
    held_out_scores = scoring.score_probes(images[split:], held_out, len(seeds))
    metrics = {
        "color_accuracy": held_in_scores["color"],
        "shape_accuracy": held_in_scores["shape"],
        "joint_accuracy": held_in_scores["joint"],
        "star_color_accuracy": held_out_scores["color"],
        "star_shape_accuracy": held_out_scores["shape"],
        "images": len(images),
    }
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        scoring.image_grid(images, columns=len(seeds) * 2).save(tmp / "grid.png")
        write_json(tmp / "metrics.json", metrics)
    return metrics


def write_summary(rows: dict[str, dict], out_dir: Path) -> None:
    """`summary.json` and a markdown table, one row per model, the base first as the reference."""
    write_json(out_dir / "summary.json", rows)
    columns = sorted({key for metrics in rows.values() for key in metrics})
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, metrics in rows.items():
        cells = [f"{metrics[c]:.3f}" if isinstance(metrics.get(c), float) else str(metrics.get(c, "")) for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    with atomic_path(out_dir / "summary.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    log("\n".join(lines))
