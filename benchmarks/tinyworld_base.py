"""Benchmark: how well the tiny-world base model draws what it is asked, scored by the oracle.

Generates with the plain diffusers StableDiffusionPipeline (25 steps, guidance 7.5, native resolution,
fixed seeds) for every `a <color> <shape>` prompt, and `a <color> star` (a shape held out of pretraining),
and prints the oracle's color, shape and joint accuracy beside chance level and the target.

    python benchmarks/tinyworld_base.py [--model artifacts/pretrain/tinyworld] [--seeds 8] [--grid grid.png]
                                        [--scheduler PNDMScheduler]   # another diffusers sampler on the same weights
"""

from __future__ import annotations

import argparse
import time

import diffusers
import torch
from diffusers import StableDiffusionPipeline

from sdpipe import sampling
from sdpipe.tinyworld import scoring, world


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="artifacts/pretrain/tinyworld")
    parser.add_argument("--seeds", type=int, default=8, help="images per prompt")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--grid", default=None, help="also save a sample grid PNG here")
    parser.add_argument("--scheduler", default=None, help="a diffusers scheduler class to sample with instead of the model's")
    args = parser.parse_args()

    torch.manual_seed(0)
    pipeline = StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    if args.scheduler:
        pipeline.scheduler = getattr(diffusers, args.scheduler).from_config(pipeline.scheduler.config)
    seeds = list(range(args.seeds))

    held_in = scoring.color_shape_probes(world.PRETRAIN_SHAPES)
    held_out = scoring.color_shape_probes(world.HELD_OUT_SHAPES)
    start = time.perf_counter()
    held_in_images = sampling.sample(pipeline, [p.prompt for p in held_in], seeds, args.steps, args.guidance)
    held_out_images = sampling.sample(pipeline, [p.prompt for p in held_out], seeds, args.steps, args.guidance)
    seconds = time.perf_counter() - start
    held_in_scores = scoring.score_probes(held_in_images, held_in, len(seeds))
    held_out_scores = scoring.score_probes(held_out_images, held_out, len(seeds))
    count = len(held_in_images) + len(held_out_images)

    chance_color = 1 / len(world.COLORS)
    chance_shape = 1 / len(world.PRETRAIN_SHAPES)
    sampler = type(pipeline.scheduler).__name__
    print(f"model {args.model}: {count} images, {sampler} {args.steps} steps, guidance {args.guidance}, {seconds:.1f} s")
    print(f"{'prompts':<28}{'metric':<10}{'accuracy':>10}{'chance':>10}{'target':>10}")
    rows = [
        ("a <color> <held-in shape>", "color", held_in_scores["color"], chance_color, ">= 0.90"),
        ("a <color> <held-in shape>", "shape", held_in_scores["shape"], chance_shape, ">= 0.90"),
        ("a <color> <held-in shape>", "joint", held_in_scores["all"], chance_color * chance_shape, ""),
        ("a <color> star (held out)", "color", held_out_scores["color"], chance_color, ""),
        ("a <color> star (held out)", "shape", held_out_scores["shape"], 1 / len(world.SHAPES), "low"),
    ]
    for prompts, metric, value, chance, target in rows:
        print(f"{prompts:<28}{metric:<10}{value:>10.3f}{chance:>10.3f}{target:>10}")
    for shape in world.PRETRAIN_SHAPES:
        per_shape = [p for p in held_in if p.shape == shape]
        images = [im for p, im in zip([p for p in held_in for _ in seeds], held_in_images) if p.shape == shape]
        scores = scoring.score_probes(images, per_shape, len(seeds))
        print(f"  {shape:<10} color {scores['color']:.3f}  shape {scores['shape']:.3f}")
    if args.grid:
        sampling.image_grid(held_in_images + held_out_images, columns=len(seeds) * 2).save(args.grid)
        print(f"grid: {args.grid}")


if __name__ == "__main__":
    main()
