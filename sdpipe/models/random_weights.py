"""Real-size models with random weights: the architectures of Stable Diffusion 1.5, 2.x and XL (and the CLIP models
their users evaluate with), built from their configs, so that benchmarks and tests measure the memory, time and key names
of real checkpoints without downloading any.

`save_random_models(arch, folder)` writes, under `folder`:

- `model/`: a diffusers `StableDiffusionPipeline` folder (SD 1.5: runwayml/stable-diffusion-v1-5's configs; SD 2.x:
  stabilityai/stable-diffusion-2-1's, v-prediction), or for `sdxl` a `StableDiffusionXLPipeline` folder
  (stabilityai/stable-diffusion-xl-base-1.0's configs: `sdpipe.models.sdxl_configs`);
- `clip/`: a `CLIPModel` of the size the base's text encoder comes from (OpenAI CLIP ViT-L/14 for SD 1.5 and SDXL,
  OpenCLIP ViT-H/14 for SD 2.x), for aesthetic gradient and evaluate's CLIP metrics;
- `clip_2/` (SDXL only): an OpenCLIP ViT-bigG/14-size `CLIPModel` whose text tower has the second text encoder's
  architecture, the other CLIP of SDXL's aesthetic gradients;
- `variations/` (SD 1.5 only): a `StableDiffusionImageVariationPipeline` (lambdalabs/sd-image-variations-diffusers'
  architecture: the SD 1.5 UNet conditioned on CLIP ViT-L/14 image embeddings), for CLIP inversion.

Every text model uses the tiny world's tokenizer padded to 77 tokens: only the sequence length matters for memory and
speed, and the vocabulary keeps CLIP's 49,408 entries.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    StableDiffusionImageVariationPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
)

from sdpipe.models.saving import save_pipeline, save_tokenizer
from sdpipe.models.sd15 import SD15_TEXT, SD15_UNET, SD15_VAE
from sdpipe.models.sdxl_configs import SDXL_TEXT, SDXL_TEXT_2, SDXL_UNET, SDXL_VAE

SD2_UNET = dict(
    SD15_UNET,
    sample_size=96,
    cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
)
SD2_TEXT = dict(  # OpenCLIP ViT-H/14's text tower, as SD 2.x ships it (23 of its 24 layers)
    vocab_size=49408,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=512,
)
CLIP_L_VISION = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14,
    image_size=224, projection_dim=768,
)
CLIP_H_VISION = dict(
    hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, patch_size=14,
    image_size=224, projection_dim=1024,
)
CLIP_BIGG_VISION = dict(
    hidden_size=1664, intermediate_size=8192, num_hidden_layers=48, num_attention_heads=16, patch_size=14,
    image_size=224, projection_dim=1280,
)
ARCHITECTURES = {
    # name: (UNet, text encoder, CLIP text tower, CLIP vision tower, scheduler prediction type)
    "sd15": (SD15_UNET, SD15_TEXT, SD15_TEXT, CLIP_L_VISION, "epsilon"),
    "sd2": (SD2_UNET, SD2_TEXT, dict(SD2_TEXT, num_hidden_layers=24, projection_dim=1024), CLIP_H_VISION, "v_prediction"),
    "sdxl": (SDXL_UNET, SDXL_TEXT, SD15_TEXT, CLIP_L_VISION, "epsilon"),
}


def save_random_models(
    arch: str, folder: str | Path, dtype: torch.dtype = torch.float32, extras: bool = True
) -> dict[str, Path]:
    """Builds `arch`'s models with random weights (seed 0), saves them under `folder` in `dtype`; returns their paths.
    Without `extras`, only the base pipeline (`model/`)."""
    from transformers import CLIPImageProcessor

    from sdpipe.tinyworld.models import sample_scheduler
    from sdpipe.tinyworld.tokenizer import build_clip_tokenizer

    unet_config, text_config, clip_text_config, vision_config, prediction_type = ARCHITECTURES[arch]
    folder = Path(folder)
    paths = {"model": folder / "model", "clip": folder / "clip"}
    torch.manual_seed(0)
    tokenizer = build_clip_tokenizer(folder / "tokenizer")
    tokenizer.model_max_length = 77
    token_ids = {
        "vocab_size": 49408,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    scheduler = sample_scheduler()
    scheduler.register_to_config(prediction_type=prediction_type)
    # each model in `dtype` as soon as it is built: SDXL's in fp32 together would take 14 GB
    vae = AutoencoderKL(**(SDXL_VAE if arch == "sdxl" else SD15_VAE)).to(dtype)
    text_encoder = CLIPTextModel(CLIPTextConfig(**{**text_config, **token_ids})).to(dtype)
    unet = UNet2DConditionModel(**unet_config).to(dtype)
    if arch == "sdxl":
        tokenizer_2 = build_clip_tokenizer(folder / "tokenizer_2", pad_token="!")
        tokenizer_2.model_max_length = 77
        text_config_2 = {**SDXL_TEXT_2, **token_ids, "pad_token_id": tokenizer_2.pad_token_id}
        pipeline = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text_config_2)).to(dtype),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
    else:
        pipeline = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    save_pipeline(pipeline, paths["model"])
    del pipeline
    if not extras:
        return {"model": paths["model"]}

    clip_config = CLIPConfig(
        text_config={**clip_text_config, **token_ids},
        vision_config=vision_config,
        projection_dim=vision_config["projection_dim"],
    )
    clip = CLIPModel(clip_config)
    clip.to(dtype).save_pretrained(paths["clip"])
    save_tokenizer(tokenizer, paths["clip"])
    feature_extractor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    feature_extractor.save_pretrained(paths["clip"])
    del clip

    if arch == "sdxl":
        paths["clip_2"] = folder / "clip_2"
        text_config_2 = {**SDXL_TEXT_2, **token_ids, "pad_token_id": tokenizer_2.pad_token_id}
        clip_2 = CLIPModel(CLIPConfig(text_config=text_config_2, vision_config=CLIP_BIGG_VISION, projection_dim=1280))
        clip_2.to(dtype).save_pretrained(paths["clip_2"])
        save_tokenizer(tokenizer_2, paths["clip_2"])
        feature_extractor.save_pretrained(paths["clip_2"])
        del clip_2

    if arch == "sd15":
        from transformers import CLIPVisionModelWithProjection

        paths["variations"] = folder / "variations"
        variations = StableDiffusionImageVariationPipeline(
            vae=vae,
            image_encoder=CLIPVisionModelWithProjection(CLIPVisionConfig(**vision_config)),
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=feature_extractor,
            requires_safety_checker=False,
        )
        variations.to(dtype).save_pretrained(paths["variations"])
    return paths


if __name__ == "__main__":  # python -m sdpipe.models.random_weights ARCH FOLDER [fp32|fp16] [--model-only]
    import json
    import sys

    arch, folder, dtype = sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "fp32"
    dtypes = {"fp32": torch.float32, "fp16": torch.float16}
    saved = save_random_models(arch, folder, dtypes[dtype], extras="--model-only" not in sys.argv)
    print(json.dumps({name: str(path) for name, path in saved.items()}))
