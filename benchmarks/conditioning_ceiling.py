"""What the methods that leave the UNet frozen can reach on a base model: the conditioning ceiling.

Textual inversion, DreamArtist and aesthetic gradient change only the text UNet's conditioning; CLIP inversion only
the image-variations UNet's. This benchmark gives a conditioning every advantage those methods lack: for each image
of a dataset it optimizes the *whole* context the UNet attends to (every token's hidden state; for the variations
model its image-embedding token) against that one image's latents with the diffusion loss, then samples each learned
context with fixed seeds and reads the samples with the oracle. A method that learns one shared embedding for all
images and all prompts has far fewer degrees of freedom, so the fraction printed estimates an upper bound for it on
this base: if the free per-image context cannot make the frozen UNet draw the concept, no embedding will.

Rows, each beside the issue's target for the frozen-UNet methods it bounds:
- text UNet, `star` dataset: samples the oracle reads as a star (textual inversion, DreamArtist);
- text UNet, `outlined` dataset: samples read as outlined in the image's own color (aesthetic gradient);
- image-variations UNet, `star` dataset: samples read as a star (CLIP inversion);
- the same for the seen-but-unnamed concepts the frozen-UNet methods are scored on: `cross` (text and variations
  UNets) and `dark` (text UNet, samples on the dark background).

Needs the prepared datasets (`dvc repro prepare`). About 7 minutes on two CPU cores at the defaults.

    python benchmarks/conditioning_ceiling.py [--steps 1500] [--seeds 2] [--grid ceiling.png] [--datasets cross dark]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from sdpipe import sampling
from sdpipe.encode import dataset_images, encode_pixels, load_pixels, read_manifest
from sdpipe.models.clip_image import ClipImageEncoder
from sdpipe.tinyworld import oracle
from sdpipe.tinyworld.pretrain import encode_text


def dataset_latents(vae, prepared_dir: Path) -> torch.Tensor:
    """The scaled latents of every prepared image, in manifest order, as the `encode` stage computes them."""
    rows = read_manifest(prepared_dir)
    pixels = torch.stack([load_pixels(prepared_dir, row, flip=False) for row in rows])
    with torch.no_grad():
        return torch.stack(encode_pixels(vae, pixels, [row["file"] for row in rows], "mean", 0, "cpu"))


def fit_contexts(unet, scheduler, latents: torch.Tensor, start: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    """One free context per image (initialized at `start`), trained with the epsilon loss through the frozen UNet."""
    unet.requires_grad_(False)
    contexts = torch.nn.Parameter(start.clone())
    optimizer = torch.optim.Adam([contexts], lr=lr)
    for _ in range(steps):
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),))
        prediction = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, contexts).sample
        loss = torch.nn.functional.mse_loss(prediction, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"  final loss {loss.item():.4f}")
    return contexts.detach()


def sample_contexts(pipeline, contexts: torch.Tensor, unconditional: torch.Tensor, seeds: int) -> list:
    """`seeds` images per context, image-major, sampled as the evaluate stage samples (25 steps, guidance 7.5)."""
    size = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    images = []
    for context in contexts:
        for seed in range(seeds):
            images += pipeline(
                prompt_embeds=context[None],
                negative_prompt_embeds=unconditional,
                height=size,
                width=size,
                num_inference_steps=25,
                guidance_scale=7.5,
                generator=torch.Generator().manual_seed(seed),
            ).images
    return images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="artifacts/pretrain/tinyworld")
    parser.add_argument("--variations", default="artifacts/pretrain/tinyworld_variations")
    parser.add_argument("--prepared", default="artifacts/prepared")
    parser.add_argument("--steps", type=int, default=1500, help="optimizer steps per dataset")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seeds", type=int, default=2, help="samples per learned context")
    parser.add_argument("--grid", default=None, help="also save every sample as a PNG grid, case after case")
    parser.add_argument("--datasets", nargs="*", default=None, help="only the cases on these datasets")
    args = parser.parse_args()

    torch.manual_seed(0)
    pipeline = StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    text_unet = pipeline.unet
    scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)

    cases = [  # (what it bounds, UNet, dataset, does a sample count)
        ("textual inversion, DreamArtist", "text", "star", 0.6, lambda read, image: read.shape == "star"),
        ("aesthetic gradient", "text", "outlined", 0.6,
         lambda read, image: read.style == "outlined" and read.color == image.color),
        ("CLIP inversion", "variations", "star", 0.6, lambda read, image: read.shape == "star"),
        ("textual inversion, DreamArtist", "text", "cross", 0.8, lambda read, image: read.shape == "cross"),
        ("aesthetic gradient", "text", "dark", 0.6, lambda read, image: read.background == "dark"),
        ("CLIP inversion", "variations", "cross", 0.7, lambda read, image: read.shape == "cross"),
    ]
    cases = [case for case in cases if args.datasets is None or case[2] in args.datasets]
    results, grid_rows = [], []
    for bounds, unet_kind, dataset, target, counts in cases:
        start_time = time.perf_counter()
        prepared = Path(args.prepared) / dataset
        images = dataset_images(prepared)
        readings = oracle.read_batch(images)
        latents = dataset_latents(pipeline.vae, prepared)
        print(f"{unet_kind} UNet, {dataset} ({len(images)} images): fitting {args.steps} steps")
        if unet_kind == "text":
            pipeline.unet = text_unet
            start = encode_text(pipeline.text_encoder, pipeline.tokenizer, [f"a {r.color} shape" for r in readings])
            unconditional = encode_text(pipeline.text_encoder, pipeline.tokenizer, [""])
        else:
            pipeline.unet = UNet2DConditionModel.from_pretrained(args.variations, subfolder="unet")
            image_encoder = ClipImageEncoder.from_pipeline_folder(args.variations, torch.device("cpu"))
            start = image_encoder.features(images)[:, None]
            unconditional = torch.zeros_like(start[:1])  # the variations model's unconditional input
        contexts = fit_contexts(pipeline.unet, scheduler, latents, start, args.steps, args.lr)
        samples = sample_contexts(pipeline, contexts, unconditional, args.seeds)
        sample_readings = oracle.read_batch(samples)
        hits = sum(counts(read, readings[i // args.seeds]) for i, read in enumerate(sample_readings))
        results.append((f"{unet_kind} UNet", dataset, bounds, hits / len(samples), len(samples), target))
        print(f"  {hits}/{len(samples)} samples count, {time.perf_counter() - start_time:.0f} s")
        grid_rows.append(samples)

    print(f"\n{'UNet':<17}{'dataset':<10}{'ceiling':>9}{'samples':>9}{'target':>8}  bounds")
    for unet_name, dataset, bounds, ceiling, count, target in results:
        print(f"{unet_name:<17}{dataset:<10}{ceiling:>9.3f}{count:>9}{target:>8.2f}  {bounds}")
    if args.grid:
        sampling.image_grid([image for row in grid_rows for image in row], columns=16).save(args.grid)
        print(f"grid: {args.grid}")


if __name__ == "__main__":
    main()
