"""Sampling a pipeline for scoring: one image per (prompt, seed), and grids of images to look at."""

from __future__ import annotations

import torch
from PIL import Image


@torch.no_grad()
def sample(
    pipeline,
    prompts: list[str],
    seeds: list[int],
    steps: int = 25,
    guidance_scale: float = 7.5,
    batch_size: int = 64,
) -> list[Image.Image]:
    """One image per (prompt, seed) pair, prompt-major; each image's noise comes from its own seed, so an image does
    not depend on the batch it was drawn in."""
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


def image_grid(images: list[Image.Image], columns: int, scale: int = 2) -> Image.Image:
    """Tiles images row-major into one picture (scaled up with nearest-neighbour, for viewing)."""
    width, height = images[0].size
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
