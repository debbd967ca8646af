"""Stable Diffusion XL: two CLIP text encoders (CLIP ViT-L and OpenCLIP ViT-bigG with its projection) whose
penultimate hidden states, side by side, are the UNet's context; the second one's projected pooled output and the
image's size and crop (the "time ids") are its added conditioning."""

from __future__ import annotations

import torch

from sdpipe.families.base import Conditioning, ModelFamily, token_ids


class StableDiffusionXL(ModelFamily):
    name = "sdxl"
    title = "Stable Diffusion XL"
    pipeline_class = "StableDiffusionXLPipeline"
    folder_classes = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")
    tokenizers = ("tokenizer", "tokenizer_2")
    text_encoders = ("text_encoder", "text_encoder_2")
    text_encoder_classes = ("CLIPTextModel", "CLIPTextModelWithProjection")
    size_conditioning = True
    single_file_text_prefixes = ("conditioner.embedders.",)
    pipeline_kwargs = {"add_watermarker": False}  # the invisible watermark needs a package sdpipe does not install

    def encode(self, tokenizers, text_encoders, captions, device) -> Conditioning:
        contexts, pooled = [], None
        for tokenizer, text_encoder in zip(tokenizers, text_encoders):
            output = text_encoder(token_ids(tokenizer, captions).to(device), output_hidden_states=True)
            if output[0].ndim == 2:  # the encoder with a projection: its text_embeds are the pooled embedding
                pooled = output[0]
            contexts.append(output.hidden_states[-2])
        return Conditioning(torch.cat(contexts, dim=-1), pooled)

    def pipeline_conditioning(self, pipeline, prompts, device) -> Conditioning:
        context, _, pooled, _ = pipeline.encode_prompt(
            prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return Conditioning(context, pooled)

    def unet_kwargs(self, conditioning: Conditioning, time_ids: torch.Tensor | None) -> dict:
        if time_ids is None:
            raise ValueError("SDXL's UNet needs the time ids (original size, crop, target size) of each image")
        added = {"text_embeds": conditioning.pooled, "time_ids": time_ids.to(conditioning.context)}
        return {"encoder_hidden_states": conditioning.context, "added_cond_kwargs": added}


def time_ids(
    original_sizes: list[tuple[int, int]], crops: list[tuple[int, int]], target_size: tuple[int, int]
) -> torch.Tensor:
    """SDXL's size and crop conditioning, one row per image: (original height, width, crop top, left, target
    height, width), in pixels."""
    rows = [[*original, *crop, *target_size] for original, crop in zip(original_sizes, crops)]
    return torch.tensor(rows, dtype=torch.float32)


SDXL = StableDiffusionXL()
