"""The `encode` stage: the VAE latents of every prepared image, computed once for every train stage to share.

`encode_dataset` reads a prepared folder (`manifest.jsonl` and `images/`, written by `prepare`) and writes one
safetensors file, atomically:

- `"<id>"`: the latents of the image, fp32, shape `[C, height / f, width / f]` (f: the VAE's downscale factor);
- `"<id>.flip"`: the latents of the image flipped left-right, when `encode.flip` is on;
- `"<id>.time_ids"` (and `"<id>.flip.time_ids"`), for a model family whose UNet takes them (SDXL): the image's
  original height and width, the top and left of its crop and its height and width, as SDXL's training scripts
  compute them (a flipped image's crop is mirrored);
- metadata: `scaling_factor`, `shift_factor` ("none" when the VAE has none), `base_model`, `model_fingerprint`,
  `mode`, `flip` and `count` (the number of images), so that a train stage can check that the latents come from
  its base model.

The latents are already scaled: `(latent_dist.mean - shift_factor) * scaling_factor`, what the UNet is trained on.
Images of different sizes (aspect buckets) are batched by size.
"""

from __future__ import annotations

import hashlib
from itertools import groupby
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open


from sdpipe.config.encode import EncodeParams
from sdpipe.errors import SdpipeError
from sdpipe.io import atomic_path, read_jsonl, save_safetensors
from sdpipe.families.sdxl import time_ids
from sdpipe.models.loading import model_family, model_fingerprint
from sdpipe.progress import log, track

FLIP_SUFFIX = ".flip"
TIME_IDS_SUFFIX = ".time_ids"


def encode_dataset(
    prepared_dir: Path,
    out_path: Path,
    vae,
    params: EncodeParams,
    seed: int,
    device: str | torch.device,
    base_model: str,
) -> dict:
    """Encodes every image of the prepared folder with `vae` (already on `device`) and writes `out_path`.

    `seed` (`base.seed`) seeds the draws of `mode: sample`; `base_model` is recorded in the metadata with its
    fingerprint. Returns a summary: image and tensor counts, and the latent shape of each image size.
    """
    prepared_dir, out_path = Path(prepared_dir), Path(out_path)
    rows = read_manifest(prepared_dir)
    items = [(row["id"], row, False) for row in rows]
    if params.flip:
        items += [(row["id"] + FLIP_SUFFIX, row, True) for row in rows]

    latents: dict[str, torch.Tensor] = {}
    batches = list(size_batches(items, params.batch_size))
    for batch in track(batches, f"encode {prepared_dir.name}"):
        pixels = torch.stack([load_pixels(prepared_dir, row, flip) for _, row, flip in batch])
        keys = [key for key, _, _ in batch]
        latents.update(zip(keys, encode_pixels(vae, pixels, keys, params.mode, seed, device), strict=True))
    if model_family(base_model).size_conditioning:
        latents.update({key + TIME_IDS_SUFFIX: image_time_ids(row, flip) for key, row, flip in items})

    shift_factor = getattr(vae.config, "shift_factor", None)
    metadata = {
        "scaling_factor": str(float(vae.config.scaling_factor)),
        "shift_factor": "none" if shift_factor is None else str(float(shift_factor)),
        "base_model": base_model,
        "model_fingerprint": model_fingerprint(base_model),
        "mode": params.mode,
        "flip": str(params.flip).lower(),
        "count": str(len(rows)),
    }
    with atomic_path(out_path) as tmp:
        save_safetensors(latents, tmp, metadata)

    shapes = {f"{row['width']}x{row['height']}": list(latents[row["id"]].shape) for row in rows}
    log(f"encode {prepared_dir.name}: {len(rows)} images, {len(latents)} latents -> {out_path}")
    return {"images": len(rows), "tensors": len(latents), "latent_shapes": shapes, "out_path": str(out_path)}


def read_manifest(prepared_dir: Path) -> list[dict]:
    manifest = prepared_dir / "manifest.jsonl"
    if not manifest.is_file():
        raise SdpipeError(f"{manifest}: no such file; run the `prepare` stage first (dvc repro prepare)")
    rows = read_jsonl(manifest)
    if not rows:
        raise SdpipeError(f"{manifest}: no images listed; expected one row per prepared image")
    return rows


def dataset_images(prepared_dir: Path) -> list[Image.Image]:
    """The prepared images of a dataset (RGB), in manifest order."""
    images = []
    for row in read_manifest(prepared_dir):
        with Image.open(prepared_dir / row["file"]) as image:
            images.append(image.convert("RGB"))
    return images


def image_time_ids(row: dict, flip: bool) -> torch.Tensor:
    """SDXL's time ids of a prepared image (a manifest row), or of its mirror image. Rows written before `prepare`
    recorded sizes and crops count as uncropped images of their own size."""
    size = (row["width"], row["height"])
    original = (row.get("original_width", size[0]), row.get("original_height", size[1]))
    left, top = row.get("crop_left", 0), row.get("crop_top", 0)
    if flip:  # the crop's left edge in the mirrored scaled image
        scale = max(size[0] / original[0], size[1] / original[1])
        left = round(original[0] * scale - size[0]) - left
    return time_ids([(original[1], original[0])], [(top, left)], (size[1], size[0]))[0]


def size_batches(items: list[tuple], batch_size: int):
    """Batches of at most `batch_size` items whose images have the same size, in (size, key) order."""

    def size(item):
        return item[1]["width"], item[1]["height"]

    for _, same_size in groupby(sorted(items, key=lambda item: (size(item), item[0])), key=size):
        same_size = list(same_size)
        for start in range(0, len(same_size), batch_size):
            yield same_size[start : start + batch_size]


def load_pixels(prepared_dir: Path, row: dict, flip: bool) -> torch.Tensor:
    """The image as a [3, H, W] tensor in [-1, 1], as diffusers' training examples do (ToTensor, Normalize(0.5))."""
    path = prepared_dir / row["file"]
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except (OSError, ValueError) as error:
        raise SdpipeError(f"{path}: cannot read this prepared image ({error}); run the `prepare` stage again") from None
    if image.size != (row["width"], row["height"]):
        raise SdpipeError(
            f"{path}: the image is {image.size[0]}x{image.size[1]} but manifest.jsonl says "
            f"{row['width']}x{row['height']}; run the `prepare` stage again"
        )
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
    pixels = (pixels - 0.5) / 0.5
    return torch.flip(pixels, dims=[-1]) if flip else pixels


@torch.no_grad()
def encode_pixels(vae, pixels: torch.Tensor, keys: list[str], mode: str, seed: int, device) -> list[torch.Tensor]:
    """The scaled fp32 latents of a batch of pixels, one CPU tensor per image."""
    distribution = vae.encode(pixels.to(device, dtype=vae.dtype)).latent_dist
    latents = distribution.mean.float()
    if mode == "sample":
        # One generator per image, on the CPU: a draw depends on the seed and the key only, not on the batch
        # it falls in or the device.
        generators = [image_generator(seed, key) for key in keys]
        noise = torch.stack([torch.randn(latents.shape[1:], generator=generator) for generator in generators])
        latents = latents + distribution.std.float() * noise.to(latents.device)
    shift_factor = getattr(vae.config, "shift_factor", None)
    if shift_factor is not None:
        latents = latents - shift_factor
    latents = latents * vae.config.scaling_factor
    return [latent.cpu().clone(memory_format=torch.contiguous_format) for latent in latents]


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, H, W] in [-1, 1] (fp32) of latents scaled as `encode_pixels` scales them (the scaling and
    shift undone)."""
    latents = latents.float() / vae.config.scaling_factor
    shift_factor = getattr(vae.config, "shift_factor", None)
    if shift_factor is not None:
        latents = latents + shift_factor
    return vae.decode(latents.to(vae.dtype)).sample.float()


def image_generator(seed: int, key: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def load_latents(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The latents written by `encode_dataset` (keyed by image id, and `<id>.flip`) and the file's metadata."""
    path = Path(path)
    if not path.is_file():
        raise SdpipeError(f"{path}: no such latents file; run the `encode` stage first (dvc repro encode)")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            latents = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as error:
        raise SdpipeError(f"{path}: not a readable safetensors latents file ({error}); run `encode` again") from None
    return latents, metadata
