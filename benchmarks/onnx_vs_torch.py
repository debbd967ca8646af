"""onnxruntime vs PyTorch eager: one UNet step and a whole 25-step generation, same inputs, same machine.

    python benchmarks/onnx_vs_torch.py                 # the tiny world (random weights), fp32, on the CPU
    python benchmarks/onnx_vs_torch.py --sd15          # also SD 1.5 size (random weights, fp16), needs CUDA
                                                       # and onnxruntime-gpu
    python benchmarks/onnx_vs_torch.py --oracle artifacts/pretrain/tinyworld
                                                       # also: does the oracle score the onnxruntime images
                                                       # like the PyTorch ones (a trained tiny-world model)?

Each side runs its own way on the same device: PyTorch eager (SDPA attention) against the exported ONNX
graphs in onnxruntime (CPU: fp32 as exported, the same thread count; CUDA: fp16 with onnxruntime's Stable
Diffusion fusions, against PyTorch in fp16). The UNet step is timed with the inputs of a guided step (batch 2,
one timestep); the generation is prompt to image, 25 steps of the model's own sampler (DPM++ 2M) at guidance 7.5,
the same seed. Times are medians; the ratio is PyTorch time / onnxruntime time (above 1: onnxruntime is faster).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from sdpipe.config.export import ExportParams
from sdpipe.export.onnx import export_onnx
from sdpipe.export.onnx_pipeline import OnnxStableDiffusion, to_pil
from sdpipe.models.sd15 import SD15_TEXT, SD15_UNET, SD15_VAE
from sdpipe.tinyworld.models import build_random_pipeline, sample_scheduler
from sdpipe.tinyworld.tokenizer import build_clip_tokenizer

PROMPT = "a red circle"
STEPS = 25



def tiny_pipeline(folder: Path) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(build_random_pipeline(folder / "tiny", seed=0), safety_checker=None)


def sd15_pipeline(folder: Path) -> StableDiffusionPipeline:
    """SD 1.5's UNet, VAE and text encoder sizes with random weights; the tiny world's tokenizer, padded to 77
    tokens (only the sequence length matters for speed)."""
    torch.manual_seed(0)
    tokenizer = build_clip_tokenizer(folder / "tokenizer")
    tokenizer.model_max_length = 77
    text_config = CLIPTextConfig(
        **{
            **SD15_TEXT,
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
    )
    return StableDiffusionPipeline(
        vae=AutoencoderKL(**SD15_VAE),
        text_encoder=CLIPTextModel(text_config),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(**SD15_UNET),
        scheduler=sample_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def median_seconds(run, repeats: int, warmup: int, sync=lambda: None) -> float:
    for _ in range(warmup):
        run()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def unet_inputs(pipe) -> dict[str, np.ndarray]:
    """A guided step's inputs: the latents twice, one timestep, the text states of the negative and the prompt."""
    generator = torch.Generator().manual_seed(0)
    config = pipe.unet.config
    latents = torch.randn(1, config.in_channels, config.sample_size, config.sample_size, generator=generator)
    states = torch.randn(2, pipe.tokenizer.model_max_length, config.cross_attention_dim, generator=generator)
    return {
        "sample": torch.cat([latents] * 2).numpy(),
        "timestep": np.array([500.0], np.float32),
        "encoder_hidden_states": states.numpy(),
    }


def benchmark(
    name: str, pipe, settings: ExportParams, device: str, dtype: torch.dtype, threads: int | None, repeats: int
) -> dict:
    """Exports `pipe`, then times the UNet step and the generation in PyTorch and in onnxruntime."""
    with tempfile.TemporaryDirectory(prefix="onnx-bench-") as scratch:
        folder = Path(scratch) / name
        start = time.perf_counter()
        parity = export_onnx(pipe, folder, settings, seed=0, model=name)
        export_s = time.perf_counter() - start
        runner = OnnxStableDiffusion(folder, threads=threads)

        if device != "cpu" or dtype != torch.float32:
            pipe = pipe.to(device, dtype)
        pipe.set_progress_bar_config(disable=True)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        inputs = unet_inputs(pipe)
        torch_inputs = [torch.from_numpy(array).to(device, dtype) for array in inputs.values()]

        @torch.no_grad()
        def torch_step():
            pipe.unet(*torch_inputs, return_dict=False)

        @torch.no_grad()
        def torch_generation():
            pipe(PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="np")

        result = {
            "model": name,
            "device": device,
            "torch_dtype": str(dtype).removeprefix("torch."),
            "onnx_precision": settings.precision,
            "onnx_provider": runner.providers[0],
            "threads": threads,
            "export_s": round(export_s, 1),
            "parity": {key: value["relative_error"] for key, value in parity["components"].items()},
            "unet_step_ms": {
                "torch": 1000 * median_seconds(torch_step, repeats * 4, 3, sync),
                "onnxruntime": 1000 * median_seconds(lambda: runner.unet(**inputs), repeats * 4, 3),
            },
            "generation_s": {
                "torch": median_seconds(torch_generation, repeats, 1, sync),
                "onnxruntime": median_seconds(lambda: runner(PROMPT, seed=0, steps=STEPS), repeats, 1),
            },
        }
    for key in ("unet_step_ms", "generation_s"):
        result[key]["ratio"] = result[key]["torch"] / result[key]["onnxruntime"]
    return result


def oracle_comparison(model: str, seeds: int, steps: int) -> dict:
    """The oracle's accuracy on `a <color> <shape>` images of `model` from PyTorch and from its ONNX export, with
    the same seeds (one per image, as the evaluate stage draws them)."""
    from sdpipe import sampling
    from sdpipe.models.loading import load_pipeline
    from sdpipe.tinyworld import scoring

    pipe = load_pipeline(model)
    probes = scoring.color_shape_probes()
    prompts, seed_list = [probe.prompt for probe in probes], list(range(seeds))
    with tempfile.TemporaryDirectory(prefix="onnx-oracle-") as scratch:
        export_onnx(pipe, Path(scratch) / "onnx", ExportParams(check_steps=0), model=model)
        runner = OnnxStableDiffusion(Path(scratch) / "onnx")
        onnx_images = [to_pil(runner(prompt, seed=seed, steps=steps))[0] for prompt in prompts for seed in seed_list]
    pipe.set_progress_bar_config(disable=True)
    torch_images = sampling.sample(pipe, prompts, seed_list, steps=steps)
    differences = [
        np.abs(np.asarray(a, float) - np.asarray(b, float)).mean() / 255 for a, b in zip(onnx_images, torch_images)
    ]
    return {
        "model": model,
        "images": len(onnx_images),
        "torch": scoring.score_probes(torch_images, probes, seeds),
        "onnxruntime": scoring.score_probes(onnx_images, probes, seeds),
        "mean_abs_pixel_diff": float(np.mean(differences)),
    }


def print_result(result: dict) -> None:
    print(
        f"\n{result['model']} on {result['device']} (PyTorch {result['torch_dtype']} eager vs onnxruntime "
        f"{result['onnx_precision']} {result['onnx_provider']}, threads {result['threads']}); "
        f"export {result['export_s']} s"
    )
    print("  parity (relative error): " + ", ".join(f"{k} {v:.2g}" for k, v in result["parity"].items()))
    for key, unit in (("unet_step_ms", "ms"), ("generation_s", "s")):
        row = result[key]
        label = "UNet step" if key == "unet_step_ms" else f"{STEPS}-step generation"
        print(
            f"  {label:<20} PyTorch {row['torch']:8.2f} {unit}   onnxruntime {row['onnxruntime']:8.2f} {unit}   "
            f"ratio {row['ratio']:.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sd15", action="store_true", help="also benchmark SD 1.5 size in fp16 (needs CUDA)")
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per side (UNet steps: 4x)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads for both sides")
    parser.add_argument("--oracle", metavar="MODEL", help="also compare oracle scores of a trained tiny-world model")
    parser.add_argument("--oracle-seeds", type=int, default=2, help="images per prompt for --oracle")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory(prefix="onnx-bench-models-") as models:
        tiny = tiny_pipeline(Path(models))
        settings = ExportParams(check_steps=0)
        results.append(benchmark("tinyworld", tiny, settings, "cpu", torch.float32, args.threads, args.repeats))
        print_result(results[-1])
        if args.sd15:
            if not torch.cuda.is_available():
                raise SystemExit("--sd15 needs a CUDA device (PyTorch fp16 and onnxruntime's CUDAExecutionProvider)")
            # Random SD-size weights: a looser fp16 bound than a trained model needs; the errors are printed.
            settings = ExportParams(precision="fp16", optimize=True, check_steps=0, tolerance={"fp16": 0.1})
            sd15 = sd15_pipeline(Path(models))
            results.append(benchmark("sd15-size", sd15, settings, "cuda", torch.float16, None, args.repeats))
            print_result(results[-1])
    if args.oracle:
        results.append(oracle_comparison(args.oracle, args.oracle_seeds, STEPS))
        scores = {side: results[-1][side] for side in ("torch", "onnxruntime")}
        print(f"\noracle on {results[-1]['images']} images of {args.oracle}: {json.dumps(scores)}")
        print(f"  mean abs pixel difference onnxruntime vs PyTorch: {results[-1]['mean_abs_pixel_diff']:.2g}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
