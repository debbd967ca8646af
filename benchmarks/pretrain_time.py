"""Benchmark: how long the frozen `pretrain` stage takes from scratch on this machine, without running it all.

Times `--steps` optimizer steps of each phase (autoencoder, CLIP, UNet, image-variations UNet) with the batch sizes of `params.yaml`
through the same functions the stage runs, after `--warmup` untimed steps, and extrapolates each phase to its
configured step count. Rendering and encoding, which the stage does once, are timed whole. Prints the estimate beside
the time the committed model's own run recorded (`artifacts/pretrain/metrics.json`) and the 90-minute budget.

    python benchmarks/pretrain_time.py [--steps 20] [--warmup 3]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml
from diffusers import UNet2DConditionModel
from transformers import CLIPVisionModelWithProjection

from sdpipe.config import parse_params
from sdpipe.tinyworld import models, pretrain
from sdpipe.tinyworld.tokenizer import build_clip_tokenizer

BUDGET_MINUTES = 90


def timed(function) -> tuple[object, float]:
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def seconds_per_step(train_phase, params, phase: str, steps: int, warmup: int) -> float:
    """Mean seconds per step of `train_phase` over `steps` steps, after `warmup` untimed ones."""
    short = params.model_copy(update={f"{phase}_steps": warmup})
    timed(lambda: train_phase(short))
    short = params.model_copy(update={f"{phase}_steps": steps})
    return timed(lambda: train_phase(short))[1] / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per phase")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per phase first")
    args = parser.parse_args()

    full = parse_params(yaml.safe_load(Path(args.params).read_text(encoding="utf-8")))
    params, seed = full.pretrain, full.base.seed
    torch.manual_seed(seed)
    (pixels, scenes, captions), render_s = timed(lambda: pretrain.make_training_set(params, seed))
    doodles, doodle_s = timed(lambda: pretrain.make_doodles(params.vae_doodles, seed + 3))
    vae_pixels = torch.cat([pixels, doodles])
    tokenizer = build_clip_tokenizer(Path("/tmp") / "sdpipe-pretrain-time-tokenizer")
    generator = torch.Generator().manual_seed(seed)

    vae_step = seconds_per_step(lambda p: pretrain.train_vae(vae_pixels, p, generator), params, "vae", args.steps, args.warmup)
    vae = pretrain.train_vae(vae_pixels, params.model_copy(update={"vae_steps": 1}), generator)
    clip_step = seconds_per_step(
        lambda p: pretrain.train_clip(pixels, captions, tokenizer, p, generator), params, "clip", args.steps, args.warmup
    )
    (latents, scaling_factor), encode_s = timed(lambda: pretrain.encode_latents(vae, pixels))
    caption_ids = torch.zeros((len(latents), len(captions[0])), dtype=torch.long)
    # shapes only: the cost of a step does not depend on the values
    caption_states = torch.randn(2, tokenizer.model_max_length, models.unet_config()["cross_attention_dim"])
    text_unet = UNet2DConditionModel(**models.unet_config())

    def unet_phase(p):
        condition = pretrain.text_condition(caption_ids, caption_states)
        return pretrain.train_unet(
            text_unet, latents, condition, p.unet_steps, p.unet_batch_size, p.unet_lr, p.caption_dropout, p, generator
        )

    unet_step = seconds_per_step(unet_phase, params, "unet", args.steps, args.warmup)
    image_encoder = CLIPVisionModelWithProjection(models.vision_config())
    (variation_latents, variation_pixels), variations_encode_s = timed(
        lambda: pretrain.variations_training_set(vae, latents, scaling_factor, pixels, doodles, params)
    )
    variations_step = seconds_per_step(
        lambda p: pretrain.train_variations(text_unet, image_encoder, vae, variation_latents, variation_pixels, p, generator),
        params, "variations", args.steps, args.warmup,
    )

    phases = {
        "render (world, sparks, crosses) + doodles": render_s + doodle_s,
        f"vae ({params.vae_steps} steps x {vae_step:.3f} s)": params.vae_steps * vae_step,
        f"clip ({params.clip_steps} steps x {clip_step:.3f} s)": params.clip_steps * clip_step,
        "encode latents": encode_s + variations_encode_s,
        f"unet ({params.unet_steps} steps x {unet_step:.3f} s)": params.unet_steps * unet_step,
        f"variations ({params.variations_steps} steps x {variations_step:.3f} s)": params.variations_steps * variations_step,
    }
    total = sum(phases.values())
    print(f"pretrain from scratch, estimated from {args.steps} timed steps per phase ({torch.get_num_threads()} threads)")
    for name, seconds in phases.items():
        print(f"  {name:<40}{seconds / 60:>8.1f} min")
    print(f"  {'total':<40}{total / 60:>8.1f} min   (budget {BUDGET_MINUTES} min)")
    metrics_path = Path(full.paths.pretrain_metrics)
    if metrics_path.is_file():
        recorded = json.loads(metrics_path.read_text())["seconds"]
        parts = ", ".join(f"{k} {v / 60:.1f} min" for k, v in recorded.items() if k != "this_run")
        print(f"  recorded by the committed model's run: {parts}")


if __name__ == "__main__":
    main()
