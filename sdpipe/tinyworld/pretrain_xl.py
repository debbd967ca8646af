"""Pretraining the tiny-world SDXL: SDXL's architecture in miniature, trained on the same world as the SD base.

SDXL's VAE has SD's architecture and its first text encoder is CLIP ViT-L, the one SD 1.x conditions on, so the tiny
SDXL takes both from the SD base folder (`paths.pretrain`), with its tokenizer. Two phases train what is new:

1. the second text encoder (SDXL's OpenCLIP ViT-bigG in miniature: wider, GELU, with the projection whose output is
   SDXL's pooled embedding), the text tower of a CLIP trained contrastively on the world's images and captions as
   the SD base's CLIP was (its vision tower is dropped); its tokenizer pads with `!`, as SDXL's second does;
2. the SDXL UNet (`models.sdxl_unet_config`) over the SD base's latents, conditioned as diffusers'
   `StableDiffusionXLPipeline` conditions it: both encoders' penultimate hidden states side by side, the second's
   projected pooled output, and the size/crop time ids (every world image is 32x32 and uncropped); with caption
   dropout to the empty caption, min-SNR weighting and EMA (`pretrain`'s settings).

The pipeline is saved with `force_zeros_for_empty_prompt` off, so its unconditional input is the empty caption's
encoding, what the UNet trained on (SDXL's default, zeros, is what SDXL itself was trained to take).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPModel, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sdpipe.config.pretrain import PretrainParams, PretrainXLParams
from sdpipe.families import SDXL
from sdpipe.io import atomic_path, write_json
from sdpipe.models.loading import model_fingerprint
from sdpipe.models.saving import save_pipeline, save_tokenizer
from sdpipe.progress import log
from sdpipe.tinyworld import models
from sdpipe.tinyworld.pretrain import (
    WORLD_VERSION,
    _cached_phase,
    clip_retrieval_accuracy,
    clip_training_captions,
    make_training_set,
    posterior_means,
    text_condition,
    train_clip,
    train_unet,
)
from sdpipe.tinyworld.tokenizer import build_clip_tokenizer, tokenizer_digest

ENCODE_BATCH = 256


def pretrain_xl(
    params: PretrainParams, xl: PretrainXLParams, seed: int, sd_base: Path, out_dir: Path, work_dir: Path,
    metrics_path: Path,
) -> dict:
    """Trains the tiny SDXL's new parts on top of the SD base folder `sd_base` and writes its diffusers folder to
    `out_dir`, atomically."""
    timings: dict[str, float] = {}
    start = time.monotonic()
    torch.manual_seed(seed)
    pixels, scenes, captions = make_training_set(params, seed)
    log(f"pretrain_xl: {len(scenes)} training images rendered")
    clip_captions = clip_training_captions(params, seed, captions)  # as the SD base's CLIP's

    vae = AutoencoderKL.from_pretrained(sd_base, subfolder="vae").eval()
    text_encoder = CLIPTextModel.from_pretrained(sd_base / "text_encoder").eval()
    tokenizer = CLIPTokenizer.from_pretrained(sd_base, subfolder="tokenizer")
    tokenizer_2 = build_clip_tokenizer(work_dir / "tokenizer_2", pad_token="!")

    key = phase_key(params, xl, seed, sd_base, "clip")
    clip = _cached_phase(
        work_dir, "xl_clip", key, CLIPModel,
        lambda: train_clip(
            pixels, clip_captions, tokenizer_2, params, torch.Generator().manual_seed(seed + 11),
            text_config=models.sdxl_text_config_2(tokenizer_2), steps=xl.clip_steps, batch_size=xl.clip_batch_size,
            learning_rate=xl.clip_lr, phase="xl_clip",
        ),
        timings,
    )
    text_encoder_2 = CLIPTextModelWithProjection(clip.config.text_config)
    # transformers 5 made the text transformer the model itself; 4.x wraps it in `.text_model`
    getattr(text_encoder_2, "text_model", text_encoder_2).load_state_dict(clip.text_model.state_dict())
    text_encoder_2.text_projection.load_state_dict(clip.text_projection.state_dict())
    text_encoder_2.eval()

    latents = posterior_means(vae, pixels) * vae.config.scaling_factor
    unique_captions = sorted({text for variants in captions for text in variants})
    caption_index = {text: i for i, text in enumerate(unique_captions)}
    caption_ids = torch.tensor([[caption_index[text] for text in variants] for variants in captions])
    contexts, pooled = encode_captions([tokenizer, tokenizer_2], [text_encoder, text_encoder_2], unique_captions + [""])

    unet = _cached_phase(
        work_dir, "xl_unet", phase_key(params, xl, seed, sd_base, "unet"), UNet2DConditionModel,
        lambda: train_unet(
            UNet2DConditionModel(**models.sdxl_unet_config()), latents, text_condition(caption_ids, contexts, pooled),
            xl.unet_steps, xl.unet_batch_size, xl.unet_lr, params.caption_dropout, params,
            torch.Generator().manual_seed(seed + 12), phase="xl_unet",
        ),
        timings,
    )

    pipeline = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=models.sample_scheduler(),
        force_zeros_for_empty_prompt=False,
        **SDXL.pipeline_kwargs,
    )
    with atomic_path(out_dir) as tmp:
        save_pipeline(pipeline, tmp)

    metrics = {
        "seed": seed,
        "clip_2_retrieval_accuracy": clip_retrieval_accuracy(clip, tokenizer_2, pixels, scenes),
        "seconds": {**timings, "this_run": round(time.monotonic() - start, 1)},
    }
    write_json(metrics_path, metrics)
    log(f"pretrain_xl: done in {metrics['seconds']['this_run']:.0f}s: {json.dumps(metrics)}")
    return metrics


def pretrain_xl_clip(
    params: PretrainParams, xl: PretrainXLParams, seed: int, xl_base: Path, out_dir: Path, metrics_path: Path
) -> dict:
    """Trains a vision tower against each of the tiny SDXL's text encoders, frozen, and writes each pair as a
    `CLIPModel` folder (with the image processor and the tokenizer), `clip_l/` and `clip_g/` under `out_dir`,
    atomically: the CLIPs aesthetic gradients take for SDXL, as SDXL 1.0 users take OpenAI CLIP ViT-L/14 and OpenCLIP
    ViT-bigG/14. (`pretrain_xl` trained its second encoder in a CLIP of its own but kept only the text tower, and took
    its first from the SD base it was built on, whose CLIP is not the current SD base's.)"""
    start = time.monotonic()
    torch.manual_seed(seed)
    pixels, scenes, captions = make_training_set(params, seed)
    clip_captions = clip_training_captions(params, seed, captions)
    encoders = {
        "clip_l": (CLIPTextModel.from_pretrained(xl_base / "text_encoder"), "tokenizer"),
        "clip_g": (CLIPTextModelWithProjection.from_pretrained(xl_base / "text_encoder_2"), "tokenizer_2"),
    }
    metrics = {"seed": seed, "retrieval_accuracy": {}, "seconds": {}}
    with atomic_path(out_dir) as tmp:
        for offset, (name, (text_encoder, tokenizer_folder)) in enumerate(encoders.items()):
            phase_start = time.monotonic()
            tokenizer = CLIPTokenizer.from_pretrained(xl_base, subfolder=tokenizer_folder)
            clip = train_clip(
                pixels, clip_captions, tokenizer, params, torch.Generator().manual_seed(seed + 13 + offset),
                steps=xl.vision_steps, batch_size=xl.clip_batch_size, learning_rate=xl.clip_lr,
                phase=f"xl_vision_{name}", text_tower=text_encoder.eval(),
            )
            clip.save_pretrained(tmp / name)
            models.feature_extractor().save_pretrained(tmp / name)
            save_tokenizer(tokenizer, tmp / name)
            metrics["retrieval_accuracy"][name] = clip_retrieval_accuracy(clip, tokenizer, pixels, scenes)
            metrics["seconds"][name] = round(time.monotonic() - phase_start, 1)
    metrics["seconds"]["this_run"] = round(time.monotonic() - start, 1)
    write_json(metrics_path, metrics)
    log(f"pretrain_xl_clip: done in {metrics['seconds']['this_run']:.0f}s: {json.dumps(metrics)}")
    return metrics


@torch.no_grad()
def encode_captions(tokenizers: list, text_encoders: list, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each caption's SDXL context and pooled embedding, exactly as `StableDiffusionXLPipeline` computes them."""
    parts = [
        SDXL.encode(tokenizers, text_encoders, texts[i : i + ENCODE_BATCH], torch.device("cpu"))
        for i in range(0, len(texts), ENCODE_BATCH)
    ]
    return torch.cat([part.context for part in parts]), torch.cat([part.pooled for part in parts])


def phase_key(params: PretrainParams, xl: PretrainXLParams, seed: int, sd_base: Path, phase: str) -> str:
    """Hash of what shapes a phase: the world and its captions, the SD base it builds on, its own settings (and the
    second text encoder's, for the UNet)."""
    world_fields = {"num_images", "sparks", "crosses", "dark_share", "generic_share", "dark_named_share",
                    "cross_named_share", "clip_cross_named_share", "warmup_steps"}
    if phase == "unet":
        world_fields |= {"caption_dropout", "snr_gamma", "unet_ema_decay"}
    own = xl.model_dump(
        include={f for f in PretrainXLParams.model_fields if f.startswith("clip") or phase == "unet" and f != "vision_steps"}
    )
    payload = {
        "seed": seed, "world": WORLD_VERSION, "phase": phase, "tokenizer": tokenizer_digest(),
        "sd_base": model_fingerprint(str(sd_base)), **params.model_dump(include=world_fields), "xl": own,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]
