"""A real-size model: Stable Diffusion 1.5, built from its configs (`sdpipe/models/sd15.py`) with random weights
(nothing is downloaded), goes through encode, LoRA training and sampling at 512x512, and the LoRA loads in diffusers.
Marked `gpu`: a CUDA GPU does it in about a minute; set SDPIPE_REAL_MODEL_ON_CPU=1 to run it on the CPU anyway
(about ten minutes on two cores)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from sdpipe.config import parse_params
from sdpipe.config.encode import EncodeParams
from sdpipe.encode import encode_dataset
from sdpipe.io import write_jsonl
from sdpipe.methods import lora
from sdpipe.models.loading import load_vae, resolve_device, resolve_dtype
from sdpipe.models.sd15 import SD15_TEXT, SD15_UNET, SD15_VAE
from sdpipe.tinyworld import models as tiny_models
from sdpipe.tinyworld import world
from sdpipe.tinyworld.tokenizer import build_clip_tokenizer

RESOLUTION = 512
IMAGES = 2

pytestmark = [] if os.environ.get("SDPIPE_REAL_MODEL_ON_CPU") else [pytest.mark.gpu]


@pytest.fixture(scope="module")
def sd15_dir(tmp_path_factory) -> Path:
    """An SD 1.5-size diffusers folder with random weights, saved in fp16 (2 GB)."""
    folder = tmp_path_factory.mktemp("sd15") / "model"
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**SD15_VAE),
        text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT)),
        tokenizer=build_clip_tokenizer(folder.parent / "tokenizer"),  # any CLIP tokenizer: the tiny world's
        unet=UNet2DConditionModel(**SD15_UNET),
        scheduler=tiny_models.sample_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(torch.float16).save_pretrained(folder)
    return folder


def test_sd15_size_lora_trains_at_512_and_loads_in_diffusers(sd15_dir, tmp_path):
    device = resolve_device("auto")
    prepared = tmp_path / "prepared" / "star"
    (prepared / "images").mkdir(parents=True)
    rows = []
    rng = np.random.default_rng(0)
    for index in range(IMAGES):
        image_id = f"star_{index:02d}"
        scene = world.sample_scene(rng, shapes=("star",))
        world.render(scene, resolution=RESOLUTION).save(prepared / "images" / f"{image_id}.png")
        rows.append({"id": image_id, "file": f"images/{image_id}.png", "width": RESOLUTION, "height": RESOLUTION,
                     "caption": f"a {scene.color} sks shape"})
    write_jsonl(prepared / "manifest.jsonl", rows)
    write_jsonl(tmp_path / "captions" / "star.jsonl", rows)
    vae = load_vae(str(sd15_dir), dtype=resolve_dtype("auto", device), device=device)
    summary = encode_dataset(prepared, tmp_path / "latents" / "star.safetensors", vae, EncodeParams(batch_size=1), 0,
                             device, str(sd15_dir))
    assert summary["images"] == IMAGES
    del vae

    params = parse_params(
        {
            "paths": {key: str(tmp_path / key) for key in ("prepared", "captions", "latents", "train")},
            "base": {"base_model": str(sd15_dir), "datasets": ["star"], "resolution": RESOLUTION},
            "train": {
                "methods": ["lora"],
                "common": {"batch_size": 1, "checkpoint_every": 0, "sample_every": 0, "gradient_checkpointing": True},
                "lora": {"max_steps": 2, "rank": 4, "conv": False, "train_text_encoder": False},
            },
        }
    )
    metrics = lora.train(params, tmp_path / "train" / "lora")
    assert metrics["steps"] == 2 and np.isfinite(metrics["loss"])

    dtype = resolve_dtype("auto", device)
    pipe = StableDiffusionPipeline.from_pretrained(sd15_dir, torch_dtype=dtype, safety_checker=None).to(device)
    pipe.load_lora_weights(str(tmp_path / "train" / "lora" / "model"), weight_name="lora.safetensors")
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a blue sks shape", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (RESOLUTION, RESOLUTION)
