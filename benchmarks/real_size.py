"""Every stage and every method at real size: Stable Diffusion 1.5, 2.x and XL architectures with random weights.

Builds the models of `--arch` (`sdpipe.models.random_weights`: the base pipeline, a CLIP model of its size for
aesthetic gradient and evaluate, and for SD 1.5 an image-variations model for CLIP inversion; fp32 by default, never
committed), makes a workspace with the repository's `datasets/` and a `params.yaml` that points every stage at them
(resolution 64, batch 1, 2 steps per method, 1 class image, short samplers), then runs the real stage scripts one
after another, as DVC would: prepare, caption, encode, class_images, train@<method> for every method that applies,
merge (a weighted sum of DreamBooth and fine-tune, a LoRA baked into the base, the LoRA resized), evaluate (each
model; CLIP metrics, no tiny-world oracle), the scoreboard, export, and `sdpipe convert` both ways.

For each stage it prints the wall time and the peak RSS of the stage's process (`wait4`), beside the model's own size
(its weights in memory at the run's dtype) and the baselines measured before the fixes of issue #24 where there are
any. The rule it checks: a stage's peak is its training state plus at most one more copy of the model, and the whole
thing fits a 24 GB machine.

    python benchmarks/real_size.py [--arch sd15|sd2|sdxl] [--work DIR] [--stages prepare,encode,train@lora,...]
        [--dtype fp32|fp16] [--resolution 64]

SDXL runs the methods that train SDXL (no merge: `benchmarks/merge_memory.py --arch sdxl` measures SDXL merges; no
export: its fp32 UNet alone is 10.3 GB, not measured on a 24 GB machine yet) from a checkpoint saved in fp16
with `--dtype fp16` (training computes in fp32 on the CPU), and checks that the LoRA's names are kohya's names of SDXL
base 1.0's layers. Evaluate samples at the model's own size (1024 px for SDXL), which takes a long time on a CPU:
leave its stages out with `--stages` there. Full-weight SDXL training (DreamBooth, fine-tune) is left out of the
default SDXL stages: in fp32 with AdamW it needs about 16 bytes per trained parameter (54 GB for the UNet and both
text encoders), more than a 24 GB machine has.

`--work DIR` keeps the models and the workspace in DIR (built once, reused by later runs with the same DIR);
without it they go to a temporary folder that is removed at the end (SD 1.5 needs about 15 GB of disk).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from sdpipe.methods.registry import METHODS as REGISTERED_METHODS  # light: no torch

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
METHODS = {
    "sd15": list(REGISTERED_METHODS),
    # no image-variations model exists for SD 2.x (its unCLIP takes another conditioning): CLIP inversion is SD 1.5's
    "sd2": [name for name in REGISTERED_METHODS if name != "clip_inversion"],
    "sdxl": [  # full-weight training of SDXL in fp32 with AdamW needs about 54 GB (see above)
        name
        for name, method in REGISTERED_METHODS.items()
        if "sdxl" in method.families and name not in ("dreambooth", "finetune")
    ],
}
MERGE_RECIPES = {
    "dreambooth_finetune": None,  # the default params.yaml's recipe
    "bake_lora": {"method": "lora_bake", "inputs": {"model": "base", "loras": ["train:lora"]}, "strength": 0.8},
    "resize_lora": {"method": "lora_resize", "inputs": {"lora": "train:lora"}, "rank": 4},
}
# Peak RSS in GiB measured on SD 1.5, fp32, 2 CPU cores, before the fixes of issue #24 (the issue's own figures).
BASELINE_GIB = {
    "train@dreambooth": "killed at 22.2 (saving)",
    "class_images": "5.9",
    "convert folder -> single file": "17.1",
    "export": "10.16 (parity at 512 px)",
}
DTYPES = ("fp32", "fp16")


def build_models(arch: str, dtype: str, models_dir: Path) -> dict[str, Path]:
    """The random-weight models of `arch`, built once per `models_dir` (a marker file says they are complete).

    They are built in a child process: a process forked from this one would count this one's memory in its peak."""
    marker = models_dir / f"complete-{arch}-{dtype}.json"
    if marker.is_file():
        return {name: Path(path) for name, path in json.loads(marker.read_text()).items()}
    shutil.rmtree(models_dir, ignore_errors=True)
    started = time.monotonic()
    command = [sys.executable, "-m", "sdpipe.models.random_weights", arch, str(models_dir), dtype]
    printed = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
    paths = {name: Path(path) for name, path in json.loads(printed.strip().splitlines()[-1]).items()}
    marker.write_text(json.dumps({name: str(path) for name, path in paths.items()}))
    print(f"built the {arch} models in {time.monotonic() - started:.0f} s -> {models_dir}", flush=True)
    return paths


def model_size_gib(folder: Path) -> float:
    """The size of the weights of a diffusers folder (its UNet, VAE and text encoder files)."""
    return sum(path.stat().st_size for path in folder.rglob("*.safetensors")) / GIB


def workspace_params(arch: str, models: dict[str, Path], resolution: int) -> dict:
    """The repository's params.yaml, pointed at the real-size models and cut down to a few steps of everything."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    methods = METHODS[arch]
    params["base"].update(base_model=str(models["model"]), resolution=resolution, extra_families=[])
    common = params["train"]["common"]
    common.update(batch_size=1, checkpoint_every=0, sample_every=0, lr_warmup_steps=0)
    train = params["train"]
    train["methods"] = methods
    for method in methods:
        if "max_steps" in train[method]:
            train[method]["max_steps"] = 2
    train["dreambooth"]["class_images"].update(num_images=1, steps=2, batch_size=1)
    train["null_text_inversion"].update(max_images=1, num_inference_steps=2, inner_steps=2)
    train["aesthetic_gradient"]["clip_model"] = str(models["clip"])
    if arch == "sdxl":  # one CLIP per text encoder: ViT-L/14 and OpenCLIP ViT-bigG/14
        train["aesthetic_gradient"]["clip_model"] = [str(models["clip"]), str(models["clip_2"])]
    if "clip_inversion" in methods:
        train["clip_inversion"]["variations_model"] = str(models["variations"])
    default_recipes = params["merge"]["recipes"]
    params["merge"]["recipes"] = {name: recipe or default_recipes[name] for name, recipe in MERGE_RECIPES.items()}
    if arch == "sdxl":
        params["merge"]["recipes"] = {}
    # a real model's evaluation: CLIP metrics, no tiny-world oracle
    params["evaluate"].update(seeds_per_prompt=2, steps=2, batch_size=8, clip_model=str(models["clip"]), oracle=False)
    params["export"].update(check_steps=2)
    return params


def stage_commands(arch: str, models: dict[str, Path]) -> dict[str, list[str]]:
    """Each stage's command (run in the workspace), in DVC's order, and the two `sdpipe convert` directions."""
    def stage(name: str, *args: str) -> list[str]:
        return [sys.executable, str(REPO / "stages" / f"{name}.py"), *args]

    stages = {name: stage(name) for name in ("prepare", "caption", "encode", "class_images")}
    for method in METHODS[arch]:
        stages[f"train@{method}"] = stage("train", method)
    if arch != "sdxl":
        stages["merge"] = stage("merge")
    stages["evaluate_base"] = stage("evaluate", "base")
    for method in METHODS[arch]:
        stages[f"evaluate@{method}"] = stage("evaluate", method)
    if arch != "sdxl":
        for recipe in MERGE_RECIPES:
            stages[f"evaluate_merge@{recipe}"] = stage("evaluate", f"merge-{recipe}")
    stages["scoreboard"] = stage("scoreboard")
    if arch != "sdxl":
        stages["export"] = stage("export")
    convert = [sys.executable, "-m", "sdpipe.cli", "convert", "--overwrite"]
    stages["convert folder -> single file"] = [*convert, str(models["model"]), "converted.safetensors"]
    stages["convert single file -> folder"] = [
        *convert, "converted.safetensors", "converted", "--to", "diffusers", "--config", str(models["model"])
    ]
    return stages


def run_measured(command: list[str], cwd: Path, log_path: Path) -> tuple[int, float, float]:
    """Runs `command`; returns its exit status, wall seconds and peak RSS in GiB (of that process, from wait4)."""
    started = time.monotonic()
    with log_path.open("w") as log:
        process = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, time.monotonic() - started, usage.ru_maxrss * 1024 / GIB


def sdxl_lora_names_check(work: Path) -> str:
    """Whether every layer of the real-size SDXL LoRA has kohya's name of a layer of SDXL base 1.0 (raises if not)."""
    from sdpipe.formats.diffusers_lora import model_module_paths
    from sdpipe.formats.kohya import group_by_layer, load_kohya_lora

    tensors, metadata = load_kohya_lora(work / "artifacts" / "train" / "lora" / "model" / "lora.safetensors")
    real_names = {name for paths in model_module_paths(None, sdxl=True).values() for name in paths}
    layers = group_by_layer(tensors)
    unknown = sorted(set(layers) - real_names)
    if unknown:
        raise SystemExit(f"the SDXL LoRA has {len(unknown)} layer names SDXL base 1.0 lacks: {unknown[:5]}")
    prefixes = sorted({name.split("_")[1] for name in layers})
    return (f"SDXL LoRA: {len(layers)} layers ({', '.join(prefixes)}), every name one of SDXL base 1.0's kohya names; "
            f"ss_base_model_version {metadata.get('ss_base_model_version')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(METHODS), default="sd15")
    parser.add_argument("--work", type=Path, default=None, help="keep models and workspace here (reused)")
    parser.add_argument("--stages", default=None, help="comma-separated stage names (default: all, in order)")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--resolution", type=int, default=64)
    args = parser.parse_args()

    temporary = args.work is None
    root = Path(tempfile.mkdtemp(prefix=f"real-size-{args.arch}-")) if temporary else args.work
    try:
        models = build_models(args.arch, args.dtype, root / "models")
        work = root / "workspace"
        work.mkdir(parents=True, exist_ok=True)
        if not (work / "datasets").exists():
            shutil.copytree(REPO / "datasets", work / "datasets")
        params = workspace_params(args.arch, models, args.resolution)
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        commands = stage_commands(args.arch, models)
        chosen = args.stages.split(",") if args.stages else list(commands)
        unknown = [name for name in chosen if name not in commands]
        if unknown:
            raise SystemExit(f"unknown stages {unknown}; known: {', '.join(commands)}")

        size = model_size_gib(models["model"])
        print(f"{args.arch}, {args.dtype}, {args.resolution} px: the base model's weights are {size:.2f} GiB "
              f"({os.cpu_count()} CPUs)", flush=True)
        print(f"{'stage':28} {'wall s':>8} {'peak RSS GiB':>13} {'x model':>8}  baseline GiB", flush=True)
        results, failed = {}, []
        for name in chosen:
            log_path = work / f"{name.replace('@', '_')}.log"
            status, seconds, peak = run_measured(commands[name], work, log_path)
            results[name] = {"status": status, "seconds": round(seconds, 1), "peak_rss_gib": round(peak, 2)}
            baseline = BASELINE_GIB.get(name, "")
            mark = "" if status == 0 else f"  FAILED (exit {status}, see {log_path})"
            print(f"{name:28} {seconds:8.1f} {peak:13.2f} {peak / size:8.2f}  {baseline}{mark}", flush=True)
            if status != 0:
                failed.append(name)
        if args.arch == "sdxl" and results.get("train@lora", {}).get("status") == 0:
            print(sdxl_lora_names_check(work), flush=True)
        (work / "real_size.json").write_text(json.dumps({"arch": args.arch, "dtype": args.dtype,
                                                         "model_gib": size, "stages": results}, indent=2))
        if failed:
            raise SystemExit(f"failed stages: {', '.join(failed)}")
    finally:
        if temporary:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
