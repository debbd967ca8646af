"""Stable Diffusion 1.x and 2.x: one CLIP text encoder whose last hidden states are the UNet's context."""

from __future__ import annotations

import torch

from sdpipe.families.base import Conditioning, ModelFamily, token_ids


class StableDiffusion(ModelFamily):
    name = "sd"
    title = "Stable Diffusion 1.x/2.x"
    pipeline_class = "StableDiffusionPipeline"
    folder_classes = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline")
    tokenizers = ("tokenizer",)
    text_encoders = ("text_encoder",)
    text_encoder_classes = ("CLIPTextModel",)
    single_file_text_prefixes = ("cond_stage_model.",)
    pipeline_kwargs = {"safety_checker": None, "requires_safety_checker": False}

    def encode(self, tokenizers, text_encoders, captions, device) -> Conditioning:
        [tokenizer], [text_encoder] = tokenizers, text_encoders
        return Conditioning(text_encoder(token_ids(tokenizer, captions).to(device))[0])

    def pipeline_conditioning(self, pipeline, prompts, device) -> Conditioning:
        return Conditioning(pipeline.encode_prompt(prompts, device, 1, False)[0])

    def unet_kwargs(self, conditioning: Conditioning, time_ids: torch.Tensor | None) -> dict:
        return {"encoder_hidden_states": conditioning.context}


SD = StableDiffusion()
