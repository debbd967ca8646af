"""Benchmark: how well the tiny-world base model draws what it is asked, scored by the oracle.

Generates with the plain diffusers pipeline of the model's family (`StableDiffusionPipeline`, or
`StableDiffusionXLPipeline` for the tiny SDXL: `--model artifacts/pretrain/tinyworld_xl`) (25 steps, guidance 7.5, native resolution,
fixed seeds) for every `a <color> <shape>` prompt, `a <color> star` (a shape held out of pretraining), the generic
`a <color> shape` and `a <color> sks shape` (the cross is drawn in pretraining but rarely named: how often does the
base draw it unasked?), `a <color> plus` (its rare word) and `a <color> <shape> on a dark background` (the seen style, rarely named), and prints the
oracle's readings beside chance level and the target. The cross and dark shares are the baselines of the methods
that leave the UNet frozen.

    python benchmarks/tinyworld_base.py [--model artifacts/pretrain/tinyworld] [--seeds 8] [--grid grid.png]
                                        [--scheduler PNDMScheduler]   # another diffusers sampler on the same weights
"""

from __future__ import annotations

import argparse
import time

import diffusers
import torch

from sdpipe import sampling
from sdpipe.families import folder_family
from sdpipe.tinyworld import oracle, scoring, world


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
    family = folder_family(args.model, key="--model")
    pipeline_class = getattr(diffusers, family.pipeline_class)
    pipeline = pipeline_class.from_pretrained(args.model, local_files_only=True, **family.pipeline_kwargs)
    pipeline.set_progress_bar_config(disable=True)
    if args.scheduler:
        pipeline.scheduler = getattr(diffusers, args.scheduler).from_config(pipeline.scheduler.config)
    seeds = list(range(args.seeds))

    held_in = scoring.color_shape_probes(world.PRETRAIN_SHAPES)
    held_out = scoring.color_shape_probes(world.HELD_OUT_SHAPES)
    start = time.perf_counter()
    held_in_images = sampling.sample(pipeline, [p.prompt for p in held_in], seeds, args.steps, args.guidance)
    held_out_images = sampling.sample(pipeline, [p.prompt for p in held_out], seeds, args.steps, args.guidance)
    generic_words = ("shape", "sks shape", world.RARE_NAMES["cross"])
    generic_prompts = [f"a {color} {word}" for word in generic_words for color in world.COLORS]
    generic_images = sampling.sample(pipeline, generic_prompts, seeds, args.steps, args.guidance)
    dark_prompts = [f"{probe.prompt} {world.DARK_WORDS}" for probe in held_in]
    dark_images = sampling.sample(pipeline, dark_prompts, seeds, args.steps, args.guidance)
    seconds = time.perf_counter() - start
    held_in_scores = scoring.score_probes(held_in_images, held_in, len(seeds))
    held_out_scores = scoring.score_probes(held_out_images, held_out, len(seeds))
    count = len(held_in_images) + len(held_out_images) + len(generic_images) + len(dark_images)
    per_word = len(generic_images) // len(generic_words)
    generic_readings = oracle.read_batch(generic_images)
    crosses = {
        f"a <color> {word}": sum(r.shape == "cross" for r in generic_readings[i * per_word : (i + 1) * per_word]) / per_word
        for i, word in enumerate(generic_words)
    }
    dark_unnamed = sum(r.background == "dark" for r in oracle.read_batch(held_in_images)) / len(held_in_images)
    dark_readings = oracle.read_batch(dark_images)
    dark_named = sum(r.background == "dark" for r in dark_readings) / len(dark_images)
    dark_named_joint = scoring.score_probes(dark_images, held_in, len(seeds))["all"]

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
        ("a <color> shape", "cross", crosses["a <color> shape"], 1 / len(world.SHAPES), "low"),
        ("a <color> sks shape", "cross", crosses["a <color> sks shape"], 1 / len(world.SHAPES), "low"),
        ("a <color> plus (rare word)", "cross", crosses["a <color> plus"], 1 / len(world.SHAPES), ""),
        ("a <color> <held-in shape>", "dark", dark_unnamed, 0.5, "low"),
        ("... on a dark background", "dark", dark_named, 0.5, "high"),
        ("... on a dark background", "joint", dark_named_joint, chance_color * chance_shape, ""),
    ]
    for prompts, metric, value, chance, target in rows:
        print(f"{prompts:<28}{metric:<10}{value:>10.3f}{chance:>10.3f}{target:>10}")
    for shape in world.PRETRAIN_SHAPES:
        per_shape = [p for p in held_in if p.shape == shape]
        images = [im for p, im in zip([p for p in held_in for _ in seeds], held_in_images) if p.shape == shape]
        scores = scoring.score_probes(images, per_shape, len(seeds))
        print(f"  {shape:<10} color {scores['color']:.3f}  shape {scores['shape']:.3f}")
    if args.grid:
        grid = held_in_images + held_out_images + generic_images + dark_images
        sampling.image_grid(grid, columns=len(seeds) * 2).save(args.grid)
        print(f"grid: {args.grid}")


if __name__ == "__main__":
    main()
