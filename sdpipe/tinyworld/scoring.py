"""Scoring a text-to-image pipeline on the tiny world: sample prompts with fixed seeds, read them with the oracle.

Used by the base-model benchmark and by the evaluate stage, so both report the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from sdpipe.tinyworld import oracle, world


@dataclass(frozen=True)
class Probe:
    """One prompt and the attributes the oracle should read from its images (None: not scored)."""

    prompt: str
    color: str | None = None
    shape: str | None = None
    style: str | None = None

    def expected(self) -> dict:
        return {k: v for k, v in (("color", self.color), ("shape", self.shape), ("style", self.style)) if v}


def color_shape_probes(shapes: tuple[str, ...] = world.PRETRAIN_SHAPES) -> list[Probe]:
    """`a <color> <shape>` for every color and shape."""
    return [Probe(f"a {color} {shape}", color=color, shape=shape) for shape in shapes for color in world.COLORS]


@torch.no_grad()
def sample(
    pipeline: StableDiffusionPipeline,
    prompts: list[str],
    seeds: list[int],
    steps: int = 25,
    guidance_scale: float = 7.5,
    batch_size: int = 64,
) -> list[Image.Image]:
    """One image per (prompt, seed) pair, prompt-major; each image's noise comes from its own seed."""
    pairs = [(prompt, seed) for prompt in prompts for seed in seeds]
    height = width = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    images: list[Image.Image] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        generators = [torch.Generator(pipeline.device).manual_seed(seed) for _, seed in chunk]
        result = pipeline(
            [prompt for prompt, _ in chunk],
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generators,
        )
        images.extend(result.images)
    return images


def score_probes(images: list[Image.Image], probes: list[Probe], seeds_per_probe: int) -> dict:
    """Per-attribute accuracy over all images, plus joint accuracy (every scored attribute right)."""
    expected = [probe.expected() for probe in probes for _ in range(seeds_per_probe)]
    return oracle.score(images, expected)


def image_grid(images: list[Image.Image], columns: int, scale: int = 2) -> Image.Image:
    """Tiles images row-major into one picture (scaled up with nearest-neighbour, for viewing)."""
    width, height = images[0].size
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
