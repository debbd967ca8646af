"""DreamBooth's class images: generated once by the base model from the class prompts (the `class_images` stage),
or a dataset the user supplies.

`write_class_images` writes one folder, atomically, laid out like the outputs of `prepare`, `caption` and `encode`,
so that training reads it as any other dataset (`load_class_examples`):

    images/class_NNNN.png        the generated images
    manifest.jsonl               one row per image, in `prepare`'s format (the caption is the class prompt)
    captions/class.jsonl         `caption`'s format
    latents/class.safetensors    `encode`'s format (with `encode`'s settings: flips, mode)
    class_images.json            what made them: the settings, the base model and its fingerprint, seed, resolution, device

Image i is generated from prompt i mod len(prompts), from initial noise drawn on the CPU with a generator seeded by
`base.seed` and i, so the same settings give the same images (bitwise on the CPU) whatever the batch size. When
`class_images.dataset` names a supplied dataset, the folder holds `class_images.json` only and training reads that
dataset's `caption` and `encode` outputs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from PIL import Image

from sdpipe.config.base import BaseParams
from sdpipe.config.encode import EncodeParams
from sdpipe.config.paths import PathsParams
from sdpipe.config.train import ClassImagesParams
from sdpipe.encode import encode_dataset
from sdpipe.errors import SdpipeError
from sdpipe.io import atomic_path, write_json, write_jsonl
from sdpipe.models.loading import load_pipeline, model_fingerprint, resolve_device, resolve_dtype
from sdpipe.progress import log, track
from sdpipe.training.data import Example, PriorPreservation, load_examples
from sdpipe.training.rng import torch_generator

KEY = "train.dreambooth.class_images"
CLASS_DATASET = "class"
RECORD_FILE = "class_images.json"
CAPTION_SOURCE = "class_prompt"


def write_class_images(out_dir: Path, settings: ClassImagesParams, base: BaseParams, encode: EncodeParams) -> dict:
    """The `class_images` stage: generates and encodes the class images into `out_dir` (or, for a supplied dataset,
    records only that). Does nothing when `out_dir` already holds what these settings make. Returns the record."""
    out_dir = Path(out_dir)
    device = resolve_device(base.device)
    record = class_images_record(settings, base, encode, device)
    if read_record(out_dir) == record:
        log(f"class images: {out_dir} is up to date")
        return record
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        if settings.dataset is None:
            generate_class_images(tmp, settings, base, encode, device)
        write_json(tmp / RECORD_FILE, record)
    what = f"the supplied dataset {settings.dataset!r}" if settings.dataset else f"{settings.num_images} images"
    log(f"class images: {what} -> {out_dir}")
    return record


def class_images_record(settings: ClassImagesParams, base: BaseParams, encode: EncodeParams, device) -> dict:
    """Everything that determines the class images (for a supplied dataset: its name)."""
    record = {"class_images": settings.model_dump(mode="json")}
    if settings.dataset is None:
        record |= {
            "base_model": base.base_model,
            "base_model_config": base.base_model_config,
            "model_fingerprint": model_fingerprint(base.base_model),
            "seed": base.seed,
            "resolution": base.resolution,
            "device": torch.device(device).type,
            "precision": str(resolve_dtype(base.precision, device)),
            "encode": encode.model_dump(mode="json"),
        }
    return record


def read_record(folder: Path) -> dict | None:
    try:
        return json.loads((Path(folder) / RECORD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def class_prompts(settings: ClassImagesParams) -> list[str]:
    """The prompt of each class image: the class prompts in turn."""
    return [settings.prompts[index % len(settings.prompts)] for index in range(settings.num_images)]


def generate_class_images(
    folder: Path, settings: ClassImagesParams, base: BaseParams, encode: EncodeParams, device: torch.device
) -> None:
    """Generates the images with the base model and writes them with their manifest, captions and latents."""
    pipeline = load_pipeline(
        base.base_model, base.base_model_config, dtype=resolve_dtype(base.precision, device), device=device
    )
    pipeline.set_progress_bar_config(disable=True)
    prompts = class_prompts(settings)
    images = generate_images(
        pipeline, prompts, base.seed, settings.steps, settings.guidance_scale, settings.batch_size, base.resolution
    )
    rows = save_images(folder, images, prompts)
    write_jsonl(folder / "manifest.jsonl", rows)
    captions = [{key: row[key] for key in ("id", "file", "caption", "caption_source")} for row in rows]
    write_jsonl(folder / "captions" / f"{CLASS_DATASET}.jsonl", captions)
    latents_path = folder / "latents" / f"{CLASS_DATASET}.safetensors"
    encode_dataset(folder, latents_path, pipeline.vae, encode, base.seed, device, base.base_model)


@torch.no_grad()
def generate_images(
    pipeline, prompts: list[str], seed: int, steps: int, guidance_scale: float, batch_size: int, resolution: int
) -> list[Image.Image]:
    """One `resolution`-pixel square image per prompt (the training resolution, so that the class images share the
    instance images' UNet pass); image i starts from noise seeded by (`seed`, i), drawn on the CPU."""
    unet = pipeline.unet
    latent_size = resolution // pipeline.vae_scale_factor
    shape = (unet.config.in_channels, latent_size, latent_size)
    images: list[Image.Image] = []
    for start in track(range(0, len(prompts), batch_size), "class images"):
        chunk = prompts[start : start + batch_size]
        generators = [torch_generator(seed, "class image", start + i) for i in range(len(chunk))]
        noise = [torch.randn(shape, generator=generator) for generator in generators]
        images += pipeline(
            chunk,
            height=resolution,
            width=resolution,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            latents=torch.stack(noise).to(pipeline.device, unet.dtype),
        ).images
    return images


def save_images(folder: Path, images: list[Image.Image], prompts: list[str]) -> list[dict]:
    """Saves `images/class_NNNN.png`; returns their manifest rows (`prepare`'s format, captioned)."""
    (folder / "images").mkdir(parents=True)
    rows = []
    for index, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
        image_id = f"{CLASS_DATASET}_{index:04d}"
        file = f"images/{image_id}.png"
        image.save(folder / file, format="PNG")
        rows.append(
            {
                "id": image_id,
                "file": file,
                "source": f"generated: {prompt}",
                "sha256": hashlib.sha256((folder / file).read_bytes()).hexdigest(),
                "width": image.width,
                "height": image.height,
                "caption": prompt,
                "caption_source": CAPTION_SOURCE,
            }
        )
    return rows


def load_class_examples(
    settings: ClassImagesParams, class_images_dir: Path, latents_dir: Path, captions_dir: Path, base: BaseParams
) -> tuple[list[Example], list[Path]]:
    """The class images training reads, and their files: the supplied dataset's `encode`/`caption` outputs, or the
    generated ones, which must have been made with these settings and base model."""
    if settings.dataset is not None:
        if settings.dataset not in base.datasets:
            raise SdpipeError(
                f"{KEY}.dataset {settings.dataset!r} is not in base.datasets ({', '.join(base.datasets)}); only "
                "those are prepared, captioned and encoded"
            )
        latents_dir, captions_dir, name = Path(latents_dir), Path(captions_dir), settings.dataset
    else:
        check_generated(Path(class_images_dir), settings, base)
        latents_dir, captions_dir = Path(class_images_dir) / "latents", Path(class_images_dir) / "captions"
        name = CLASS_DATASET
    examples = load_examples(latents_dir, captions_dir, [name], base.base_model)
    return examples, [latents_dir / f"{name}.safetensors", captions_dir / f"{name}.jsonl"]


def class_prior(
    settings: ClassImagesParams, loss_weight: float, paths: PathsParams, base: BaseParams
) -> PriorPreservation | None:
    """The class images `settings` describe, trained beside a method's own with `loss_weight`; None when that is 0."""
    if loss_weight == 0:
        return None
    examples, files = load_class_examples(
        settings,
        class_images_dir=Path(paths.class_images),
        latents_dir=Path(paths.latents),
        captions_dir=Path(paths.captions),
        base=base,
    )
    return PriorPreservation(examples=examples, files=files, loss_weight=loss_weight)


def shared_prior_preservation(params, loss_weight: float, datasets: list[str], key: str) -> PriorPreservation | None:
    """For a method other than DreamBooth (`key`, training on `datasets`): the class images the `class_images` stage
    made with `train.dreambooth.class_images`, trained beside its own with `loss_weight`; None when that is 0."""
    settings = params.train.dreambooth.class_images
    if loss_weight != 0 and settings.dataset is not None and settings.dataset in datasets:
        raise SdpipeError(
            f"{KEY}.dataset {settings.dataset!r} is also a dataset {key} trains on; class images must be other "
            "images of the class"
        )
    return class_prior(settings, loss_weight, params.paths, params.base)


def check_generated(class_images_dir: Path, settings: ClassImagesParams, base: BaseParams) -> None:
    record = read_record(class_images_dir)
    if record is None:
        raise SdpipeError(
            f"{class_images_dir}/{RECORD_FILE}: no class images; run the `class_images` stage first "
            "(dvc repro class_images)"
        )
    if record.get("class_images") != settings.model_dump(mode="json") or record.get("base_model") != base.base_model:
        raise SdpipeError(
            f"{class_images_dir}: the class images were made with other {KEY} settings or another base model; "
            "run the `class_images` stage again (dvc repro class_images)"
        )
