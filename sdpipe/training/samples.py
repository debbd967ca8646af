"""Fixed-seed sample images during training: the same prompts and seeds at every sampling step, so that the
images show how the model changes. Each prompt's image is seeded with `seed + its index`; DDIM sampling."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from sdpipe.io import atomic_path
from sdpipe.training.method import Models


@torch.no_grad()
def sample_images(
    vae,
    models: Models,
    prompts: list[str],
    seed: int,
    steps: int,
    guidance_scale: float,
    device: torch.device,
    embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[Image.Image]:
    """One image per prompt, in the models' family's pipeline, with unwrapped models; the models' train/eval modes are
    left as they were.

    `embeddings`: the (conditional, unconditional) UNet contexts of the prompts, for a method whose conditioning
    is not the text encoder's (then the text encoders and tokenizers are not used)."""
    from diffusers import DDIMScheduler

    family, unet = models.family, models.unet
    text_parts = {name: getattr(models, name) for name in (*family.tokenizers, *family.text_encoders)}
    pipeline = family.pipeline(
        vae=vae,
        unet=unet,
        scheduler=DDIMScheduler.from_config(models.noise_scheduler.config, clip_sample=False),  # latents are not in [-1, 1]
        **(text_parts if embeddings is None else dict.fromkeys(text_parts)),
    )
    pipeline.set_progress_bar_config(disable=True)
    modes = [(module, module.training) for module in (*models.text_encoders, unet)]
    for module, _ in modes:
        module.eval()
    try:
        size = unet.config.sample_size * pipeline.vae_scale_factor
        shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        # Drawn on the CPU, one generator per prompt: the same images whatever the device and the prompt count.
        latents = torch.stack(
            [torch.randn(shape, generator=torch.Generator().manual_seed(seed + index)) for index in range(len(prompts))]
        ).to(device)
        if embeddings is None:
            conditioning = {"prompt": prompts}
        else:
            conditioning = {"prompt_embeds": embeddings[0], "negative_prompt_embeds": embeddings[1]}
        return pipeline(
            **conditioning,
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            latents=latents.to(unet.dtype),
        ).images
    finally:
        for module, training in modes:
            module.train(training)


def save_grid(images: list[Image.Image], path: Path) -> None:
    """The images side by side in one PNG, written atomically."""
    width, height = images[0].size
    grid = Image.new("RGB", (width * len(images), height))
    for index, image in enumerate(images):
        grid.paste(image, (index * width, 0))
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
