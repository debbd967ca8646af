"""Peak memory of a two-model merge, against the size of one model.

`merge` streams tensor by tensor (`sdpipe.merge`), so its peak memory should stay near that of the Python
process itself, well under one model, where loading both models whole needs three (two inputs and the result).
This builds two random pipelines of the tiny-world architecture with a wider UNet (so that the weights, not
torch's own memory, dominate): SD 1.x's (`--arch sd`) or SDXL's (`--arch sdxl`: the tiny SDXL, two text encoders,
read and written in the SGM layout), then measures in fresh subprocesses the peak resident set size (`ru_maxrss`) of:

- `imports`: torch, diffusers and sdpipe imported, both inputs opened, nothing merged (the floor);
- `whole models`: both models' state dicts loaded whole with safetensors and averaged (a merge without streaming);
- `sdpipe merge`: `merge_recipe` with a weighted sum, writing `model.safetensors` and the diffusers folder.

The merge's own memory is a few tensors at a time (inputs, fp32 temporaries, result), so it scales with the
largest tensor, printed too: on this UNet (few, wide layers) that is a sizeable share of the model; on SD 1.5
(largest tensor 59 MiB of 4 GiB fp32) a small one.

    python benchmarks/merge_memory.py [--arch sd|sdxl] [--width 256] [--workdir DIR]

`--width` is the UNet's first block width (the tiny world's is 64, the tiny SDXL's 32; the UNet's size grows with
its square; SDXL's three levels are width, 2 x width and 4 x width wide).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

SD_FILES = (
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
)
COMPONENT_FILES = {"sd": SD_FILES, "sdxl": (*SD_FILES, "text_encoder_2/model.safetensors")}


def build_pipeline(folder: Path, seed: int, width: int, arch: str) -> Path:
    """A random tiny-world pipeline whose UNet has block widths (width, 2 * width), or a tiny SDXL one whose UNet
    has (width, 2 * width, 4 * width)."""
    from diffusers import UNet2DConditionModel

    from sdpipe.tinyworld.models import build_random_pipeline, build_random_sdxl_pipeline, sdxl_unet_config, unet_config

    if (folder / "model_index.json").is_file():
        return folder
    if arch == "sdxl":
        build_random_sdxl_pipeline(folder, seed=seed)
        config = {**sdxl_unet_config(), "block_out_channels": (width, 2 * width, 4 * width)}
    else:
        build_random_pipeline(folder, seed=seed)
        config = {**unet_config(), "block_out_channels": (width, 2 * width)}
    UNet2DConditionModel(**config).save_pretrained(folder / "unet")
    return folder


def model_size(folder: Path, arch: str) -> int:
    return sum((folder / name).stat().st_size for name in COMPONENT_FILES[arch])


def largest_tensor(folder: Path, arch: str) -> int:
    """Bytes of the model's largest tensor, from the safetensors headers (the parent process stays torch-free)."""
    largest = 0
    for name in COMPONENT_FILES[arch]:
        with (folder / name).open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        sizes = [
            end - start
            for key, entry in header.items()
            if key != "__metadata__"
            for start, end in [entry["data_offsets"]]
        ]
        largest = max(largest, *sizes)
    return largest


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(mode: str, first: Path, second: Path, out: Path, arch: str) -> None:
    """One measurement, in a fresh process; prints its peak RSS in MiB as JSON."""
    import torch
    from safetensors.torch import load_file

    from sdpipe.config import parse_params
    from sdpipe.merge.output import diffusers_layout
    from sdpipe.merge.recipe import merge_recipe, resolve_inputs
    from sdpipe.merge.sources import open_checkpoint

    recipe = {"method": "weighted_sum", "inputs": {"a": str(first), "b": str(second)}, "alpha": 0.5}
    params = parse_params({"merge": {"recipes": {"bench": recipe}}})
    recipe = params.merge.recipes["bench"]
    # what every run does first, so that "imports" is the floor of the others
    diffusers_layout(first, "config")
    with open_checkpoint(first, "a"), open_checkpoint(second, "b"):
        pass
    if mode == "whole":
        a = {(name, key): t for name in COMPONENT_FILES[arch] for key, t in load_file(first / name).items()}
        b = {(name, key): t for name in COMPONENT_FILES[arch] for key, t in load_file(second / name).items()}
        merged = {key: (a[key] + b[key]) / 2 for key in a}
        assert all(torch.isfinite(tensor).all() for tensor in merged.values())
    elif mode == "merge":
        inputs = resolve_inputs(recipe, base_model=str(first), train_dir="unused")
        merge_recipe(recipe, inputs, config_folder=first, out_dir=out / "merged", seed=0)
    print(json.dumps({"peak_mib": peak_mib()}))


def measure(mode: str, first: Path, second: Path, out: Path, arch: str) -> float:
    command = [sys.executable, __file__, "--arch", arch, "--child", mode, str(first), str(second), str(out)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=("sd", "sdxl"), default="sd", help="the tiny world's SD 1.x or SDXL")
    parser.add_argument("--width", type=int, default=None, help="UNet first block width (multiple of 32; default: "
                        "256 for sd, 128 for sdxl)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the models here (default: a temp folder)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--build", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    arch = args.arch
    width = args.width or (128 if arch == "sdxl" else 256)
    if args.child:
        mode, first, second, out = args.child
        child(mode, Path(first), Path(second), Path(out), arch)
        return
    if args.build:
        build_pipeline(Path(args.build[0]), int(args.build[1]), width, arch)
        return

    with tempfile.TemporaryDirectory() as temp:
        workdir = args.workdir or Path(temp)
        # built in subprocesses too: a child's ru_maxrss starts from the RSS of the parent it was forked from
        first, second = workdir / f"{arch}-w{width}-seed0", workdir / f"{arch}-w{width}-seed1"
        for seed, folder in enumerate((first, second)):
            command = [sys.executable, __file__, "--arch", arch, "--width", str(width)]
            subprocess.run([*command, "--build", str(folder), str(seed)], check=True, capture_output=True)
        size_mib, tensor_mib = model_size(first, arch) / 2**20, largest_tensor(first, arch) / 2**20
        floor = measure("imports", first, second, workdir, arch)
        rows = [("imports", floor), ("whole models", measure("whole", first, second, workdir, arch))]
        rows.append(("sdpipe merge", measure("merge", first, second, workdir, arch)))

    parts = "UNet + VAE + both text encoders" if arch == "sdxl" else "UNet + VAE + text encoder"
    print(f"{arch}: one model ({parts}, fp32): {size_mib:.0f} MiB; UNet width {width}; "
          f"largest tensor {tensor_mib:.1f} MiB")
    print(f"{'run':<14} {'peak RSS MiB':>12} {'above imports':>14} {'x one model':>12}")
    for name, peak in rows:
        above = peak - floor
        print(f"{name:<14} {peak:>12.0f} {above:>14.0f} {above / size_mib:>12.2f}")


if __name__ == "__main__":
    main()
