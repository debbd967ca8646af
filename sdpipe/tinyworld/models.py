"""Architectures of the tiny-world Stable Diffusion: the real diffusers/transformers classes, made small.

The same configs serve the `pretrain` recipe and the randomly initialized pipelines that tests build.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from sdpipe.models.saving import save_pipeline
from sdpipe.tinyworld import world
from sdpipe.tinyworld.tokenizer import MODEL_MAX_LENGTH, build_clip_tokenizer

LATENT_CHANNELS = 4
TEXT_HIDDEN = 64
PROJECTION_DIM = 64
SDXL_TEXT_HIDDEN_2 = 96  # the second text encoder is wider, as OpenCLIP bigG (1280) is beside CLIP ViT-L (768)
SDXL_TIME_EMBED_DIM = 8  # per time id; SDXL's is 256


def vae_config() -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=world.RESOLUTION,
    )


def unet_config() -> dict:
    latent_size = world.RESOLUTION // 4
    return dict(
        sample_size=latent_size,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        layers_per_block=1,
        block_out_channels=(64, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def text_config(tokenizer: CLIPTokenizer, hidden_size: int = TEXT_HIDDEN, **overrides) -> CLIPTextConfig:
    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        projection_dim=PROJECTION_DIM,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextConfig(**{**settings, **overrides})


def sdxl_unet_config() -> dict:
    """SDXL's UNet in miniature: three levels, no attention in the first, a deeper transformer in the last, linear
    projections, and the text-time added conditioning (pooled text embedding and six size/crop ids)."""
    return dict(
        sample_size=world.RESOLUTION // 4,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        layers_per_block=1,
        block_out_channels=(32, 64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 8),
        use_linear_projection=True,
        cross_attention_dim=TEXT_HIDDEN + SDXL_TEXT_HIDDEN_2,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=SDXL_TEXT_HIDDEN_2 + 6 * SDXL_TIME_EMBED_DIM,
        norm_num_groups=16,
    )


def sdxl_text_config_2(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    """SDXL's second text encoder in miniature: wider, GELU, with the text projection whose output is pooled."""
    return text_config(tokenizer, SDXL_TEXT_HIDDEN_2, hidden_act="gelu", projection_dim=SDXL_TEXT_HIDDEN_2)


def vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        image_size=world.RESOLUTION,
        patch_size=4,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        projection_dim=PROJECTION_DIM,
    )


def feature_extractor() -> CLIPImageProcessor:
    return CLIPImageProcessor(
        size={"shortest_edge": world.RESOLUTION},
        crop_size={"height": world.RESOLUTION, "width": world.RESOLUTION},
        resample=3,
    )


def train_scheduler() -> DDPMScheduler:
    """SD 1.x's noise schedule."""
    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False
    )


def sample_scheduler() -> DPMSolverMultistepScheduler:
    """The scheduler the saved pipeline samples with: DPM-Solver++ 2M (A1111's "DPM++ 2M") on SD 1.x's schedule.

    Not SD 1.x's PNDM: its 4th-order multistep extrapolation overshoots at guidance 7.5 on this small UNet (green
    prompts came out red, blue or muddy: color accuracy 0.812 with PNDM, 1.000 with DPM++ 2M or Euler, same weights).
    Not Euler: diffusers 0.42's OnnxStableDiffusionPipeline cannot multiply its numpy latents by Euler's tensor
    `init_noise_sigma`, and the ONNX export carries this scheduler.
    """
    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        algorithm_type="dpmsolver++",
        solver_order=2,
        timestep_spacing="leading",
        steps_offset=1,
    )


def build_random_pipeline(out_dir: str | Path, seed: int = 0) -> Path:
    """Saves a randomly initialized tiny-world pipeline folder (for tests); returns its path."""
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(out_dir / "tokenizer")
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**vae_config()),
        text_encoder=CLIPTextModel(text_config(tokenizer)),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(**unet_config()),
        scheduler=sample_scheduler(),
        safety_checker=None,
        feature_extractor=feature_extractor(),
        requires_safety_checker=False,
    )
    save_pipeline(pipe, out_dir)
    return out_dir


def build_random_sdxl_pipeline(out_dir: str | Path, seed: int = 0) -> Path:
    """Saves a randomly initialized tiny SDXL pipeline folder (diffusers' SDXL layout, for tests); returns its path."""
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(out_dir / "tokenizer")
    tokenizer_2 = build_clip_tokenizer(out_dir / "tokenizer_2", pad_token="!")
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL(**vae_config()),
        text_encoder=CLIPTextModel(text_config(tokenizer)),
        text_encoder_2=CLIPTextModelWithProjection(sdxl_text_config_2(tokenizer_2)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=UNet2DConditionModel(**sdxl_unet_config()),
        scheduler=sample_scheduler(),
        add_watermarker=False,
    )
    save_pipeline(pipe, out_dir)
    return out_dir


def variations_pipeline(vae, image_encoder, unet):
    """A diffusers `StableDiffusionImageVariationPipeline` of the tiny world's parts (no safety checker)."""
    from diffusers import StableDiffusionImageVariationPipeline

    return StableDiffusionImageVariationPipeline(
        vae=vae,
        image_encoder=image_encoder,
        unet=unet,
        scheduler=sample_scheduler(),
        safety_checker=None,
        feature_extractor=feature_extractor(),
        requires_safety_checker=False,
    )


def build_random_variations_pipeline(out_dir: str | Path, seed: int = 0) -> Path:
    """Saves a randomly initialized tiny-world image-variations pipeline folder (for tests); returns its path."""
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    pipe = variations_pipeline(
        AutoencoderKL(**vae_config()), CLIPVisionModelWithProjection(vision_config()), UNet2DConditionModel(**unet_config())
    )
    pipe.save_pretrained(out_dir)
    return out_dir
