"""Seconds per optimizer step of each training method on the tiny world, with and without the caches.

sdpipe trains on latents the `encode` stage computed once, and (when the text encoder is frozen) on text encoder
outputs computed once per caption. The diffusers training examples instead run the VAE encoder on every batch's
images and the text encoder on every batch's captions, at every step. This measures both ways, per method, at
the settings of `params.yaml` (batch size, precision, device), on the real tiny-world base and the datasets
prepared under `artifacts/` (run `dvc repro encode class_images` first):

- `cached`: the training core as the `train@<method>` stage runs it;
- `uncached`: the same, but every batch's latents are encoded from its prepared images
  (`artifacts/prepared/<dataset>/images`; the class images for the methods that train with them) by the VAE,
  read from disk at each step, and `train.common.cache_text_embeddings` is off, so the text encoder encodes the
  captions at each step.

Each run of a (method, variant) is its own subprocess (its peak RSS is its own): `--warmup` steps, then `--steps`
timed steps (sampling and checkpoints off). Each (method, variant) runs `--repeats` times, the variants in
alternating order. Printed per (method, variant): seconds per optimizer step (the median over the runs of each run's
mean over its timed steps, and the runs' range), images per second (the method's images and its class images, if
it trains with them), for `uncached` the seconds per step its image reads and VAE encodes take, peak RSS, peak CUDA
memory on CUDA.
The headline is LoRA's uncached / cached time per step (target >= 1.5x).

    python benchmarks/train_step.py [--steps 30] [--warmup 5] [--repeats 3] [--methods lora,finetune]
        [--variants cached,uncached]
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("cached", "uncached")
HEADLINE_METHOD, HEADLINE_TARGET = "lora", 1.5
NOT_ON_THE_CORE = ("aesthetic_gradient", "null_text_inversion")  # no training steps to time


# --- the child: one (method, variant) run ----------------------------------------------------------------------


def bench_params(params_path: Path, method: str, variant: str, total_steps: int):
    """`params.yaml` with `method` training `total_steps` steps, no samples or checkpoints, and for `uncached` no
    text embedding cache."""
    from sdpipe.config import parse_params

    data = yaml.safe_load(params_path.read_text(encoding="utf-8"))
    train = data.setdefault("train", {})
    common = train.setdefault("common", {})
    common.update(sample_every=0, checkpoint_every=0, resume=False)
    if variant == "uncached":
        common["cache_text_embeddings"] = False
    methods = train.setdefault("methods", [])
    if method not in methods:
        methods.append(method)
    train[method] = {**(train.get(method) or {}), "max_steps": total_steps}
    return parse_params(data, str(params_path))


def instrument(loop, params, variant: str, stamps: list[float], served: list[int], encoding: list) -> None:
    """Patches the training core (`sdpipe.training.loop`, in this process only) to time every optimizer step and
    count the images served; for `uncached`, to encode every batch's images with the VAE, and to time that (appends
    (step, seconds) to `encoding`)."""
    import torch

    from sdpipe.encode import load_pixels, read_manifest
    from sdpipe.models.loading import load_vae, resolve_device, resolve_dtype
    from sdpipe.training.data import Batch, LatentBatches
    from sdpipe.training.rng import torch_generator

    device = resolve_device(params.base.device)
    track = loop.track

    def stamp() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())

    def timed_track(items, *args, **kwargs):  # the loop iterates its steps through `track`: one item per step
        for item in track(items, *args, **kwargs):
            stamp()
            yield item
        stamp()

    loop.track = timed_track

    vae = None
    if variant == "uncached":
        vae = load_vae(
            params.base.base_model, params.base.base_model_config, dtype=resolve_dtype(params.base.precision, device),
            device=device,
        )
        vae.requires_grad_(False)
    shift_factor = getattr(vae.config, "shift_factor", None) if vae is not None else None
    folders = {"class": Path(params.paths.class_images)}  # the generated class images
    manifests: dict[str, dict[str, dict]] = {}

    def image_folder(dataset: str) -> Path:
        return folders.get(dataset, Path(params.paths.prepared) / dataset)

    def manifest_row(key: str) -> tuple[Path, dict]:
        dataset, image_id = key.split("/", 1)
        folder = image_folder(dataset)
        if dataset not in manifests:
            manifests[dataset] = {row["id"]: row for row in read_manifest(folder)}
        return folder, manifests[dataset][image_id]

    class CountedBatches(LatentBatches):
        """The core's batch stream; `uncached`: the latents encoded from the images now, as diffusers does."""

        def batch(self, index: int) -> Batch:
            batch = super().batch(index)
            served.append(len(batch.keys))
            if vae is None:
                return batch
            started = time.perf_counter()
            # the flip coins of LatentBatches.batch, drawn again (the same seed and index give the same coins)
            coins = torch.rand(len(batch.keys), generator=torch_generator(self.seed, "flip", index)).tolist()
            pixels = [load_pixels(*manifest_row(key), self.flip and coin < 0.5) for key, coin in zip(batch.keys, coins)]
            with torch.no_grad():
                distribution = vae.encode(torch.stack(pixels).to(device, dtype=vae.dtype)).latent_dist
                latents = distribution.sample() if params.encode.mode == "sample" else distribution.mean
                if shift_factor is not None:
                    latents = latents - shift_factor
                latents = latents.float() * vae.config.scaling_factor
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            encoding.append((len(stamps) - 1, time.perf_counter() - started))  # stamps: one per step begun
            return Batch(latents=latents, captions=batch.captions, keys=batch.keys)

    loop.LatentBatches = CountedBatches


def child(method: str, variant: str, steps: int, warmup: int, params_path: Path) -> None:
    """Trains `method` for `warmup + steps` steps and prints its figures as JSON (the last line of stdout)."""
    import torch

    from sdpipe.methods.registry import METHODS
    from sdpipe.models.loading import resolve_device
    from sdpipe.training import loop

    params = bench_params(params_path, method, variant, warmup + steps)
    stamps: list[float] = []
    served: list[int] = []
    encoding: list[tuple[int, float]] = []
    instrument(loop, params, variant, stamps, served, encoding)
    with tempfile.TemporaryDirectory(prefix=f"bench-{method}-") as out:
        METHODS[method].train(params, Path(out))
    if len(stamps) != warmup + steps + 1:
        raise SystemExit(f"{method}: expected {warmup + steps} training steps through sdpipe.training, saw {len(stamps) - 1}")
    durations = [later - earlier for earlier, later in itertools.pairwise(stamps)][warmup:]
    cuda = resolve_device(params.base.device).type == "cuda"
    result = {
        "seconds_per_step": statistics.mean(durations),
        "images_per_step": sum(served) / (warmup + steps),
        "encode_seconds_per_step": sum(seconds for step, seconds in encoding if step >= warmup) / steps,
        "batch_size": params.train.common.batch_size,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    }
    print(json.dumps(result))


# --- the parent: runs the children, prints the table (and imports no torch: a child inherits its peak RSS) ------


def default_methods(params_path: Path) -> list[str]:
    """The methods of `train.methods` that train through the training core (`sdpipe.training`)."""
    listed = (yaml.safe_load(params_path.read_text(encoding="utf-8")).get("train") or {}).get("methods") or []
    return [m for m in listed if m not in NOT_ON_THE_CORE]


def measure(method: str, variant: str, args) -> dict:
    command = [sys.executable, __file__, "--child", method, variant, "--steps", str(args.steps)]
    command += ["--warmup", str(args.warmup), "--params", str(args.params)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=False)
    if result.returncode != 0:
        return {"error": (result.stderr.strip() or result.stdout.strip()).splitlines()[-1][:200]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def combine(runs: list[dict]) -> dict:
    """One (method, variant)'s repeated runs: the median of their mean step times (and their range), the largest
    peaks."""
    good = [run for run in runs if "error" not in run]
    if not good:
        return runs[0]
    seconds = [run["seconds_per_step"] for run in good]
    combined = {**good[0], "runs": len(good), "seconds_per_step": statistics.median(seconds)}
    combined.update(fastest=min(seconds), slowest=max(seconds))
    combined["encode_seconds_per_step"] = statistics.median(run["encode_seconds_per_step"] for run in good)
    for peak in ("peak_rss_mib", "peak_cuda_mib"):
        combined[peak] = None if good[0][peak] is None else max(run[peak] for run in good)
    return combined


def print_table(rows: list[tuple[str, str, dict]], ratios: dict[str, float], args) -> None:
    from rich.console import Console
    from rich.table import Table

    cuda = any(r.get("peak_cuda_mib") is not None for _, _, r in rows)
    title = f"train step, tiny world: {args.repeats} runs each, {args.warmup} warmup + {args.steps} timed steps per run"
    table = Table(title=title)
    columns = ("method", "variant", "s/step", "runs' range", "images/s", "image read + VAE s/step", "peak RSS MiB")
    for column in columns:
        table.add_column(column, justify="left" if column in ("method", "variant") else "right")
    if cuda:
        table.add_column("peak CUDA MiB", justify="right")
    table.add_column("uncached / cached", justify="right")
    for method, variant, r in rows:
        if "error" in r:
            table.add_row(method, variant, f"[red]failed: {r['error']}[/]")
            continue
        cells = [
            method,
            variant,
            f"{r['seconds_per_step']:.3f}",
            f"{r['fastest']:.3f}-{r['slowest']:.3f}",
            f"{r['images_per_step'] / r['seconds_per_step']:.1f}",
            f"{r['encode_seconds_per_step']:.3f}" if variant == "uncached" else "",
            f"{r['peak_rss_mib']:.0f}",
        ]
        if cuda:
            cells.append(f"{r['peak_cuda_mib']:.0f}" if r["peak_cuda_mib"] is not None else "")
        ratio = ratios.get(method) if variant == "cached" else None
        cells.append(f"{ratio:.2f}x" if ratio is not None else "baseline" if variant == "uncached" else "")
        table.add_row(*cells)
    Console(width=150).print(table)
    ratio = ratios.get(HEADLINE_METHOD)
    if ratio is not None:
        verdict = "PASS" if ratio >= HEADLINE_TARGET else "FAIL"
        print(f"{HEADLINE_METHOD}: uncached / cached time per step = {ratio:.2f}x (target >= {HEADLINE_TARGET}x): {verdict}")
        extra = next(r["encode_seconds_per_step"] for m, v, r in rows if m == HEADLINE_METHOD and v == "uncached")
        needed = extra / (HEADLINE_TARGET - 1)
        print(
            f"{HEADLINE_METHOD}: the uncached steps' image reads and VAE encodes take {extra:.3f} s/step; with that "
            f"cost, {HEADLINE_TARGET}x needs a cached step of at most {needed:.3f} s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed optimizer steps first")
    parser.add_argument("--methods", default=None, help="comma-separated (default: the built methods of train.methods)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: cached, uncached")
    parser.add_argument("--repeats", type=int, default=3, help="runs per (method, variant), in alternating order")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.params = args.params.resolve()
    if args.child:
        child(*args.child, args.steps, args.warmup, args.params)
        return

    methods = args.methods.split(",") if args.methods else default_methods(args.params)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        parser.error(f"--variants takes {', '.join(VARIANTS)}; --steps >= 1; --warmup >= 0; --repeats >= 1")
    rows = []
    for method in methods:
        # the order alternates between repeats: on a shared machine the first run of a series is often the slowest
        runs: dict[str, list[dict]] = {variant: [] for variant in variants}
        for repeat in range(args.repeats):
            for variant in variants if repeat % 2 == 0 else variants[::-1]:
                print(f"{method} {variant} (run {repeat + 1} of {args.repeats}) ...", file=sys.stderr, flush=True)
                runs[variant].append(measure(method, variant, args))
        rows += [(method, variant, combine(runs[variant])) for variant in variants]
    ratios = {}
    for method in methods:
        found = {v: r for m, v, r in rows if m == method and "error" not in r}
        if set(found) == set(VARIANTS):
            ratios[method] = found["uncached"]["seconds_per_step"] / found["cached"]["seconds_per_step"]
    print_table(rows, ratios, args)


if __name__ == "__main__":
    main()
