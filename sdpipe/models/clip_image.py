"""CLIP image embeddings of PIL images, from a CLIP model folder or a diffusers pipeline's image encoder.

Aesthetic gradients average them into a style embedding; CLIP inversion starts its concept vector from their mean.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from sdpipe.errors import SdpipeError

try:  # transformers 5: the PIL image processor, which needs no torchvision
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor
except ImportError:
    from transformers import CLIPImageProcessor

IMAGE_BATCH = 64  # images per forward pass


class ClipImageEncoder:
    """CLIP image embeddings (after the visual projection, not normalized), as `get_image_features` gives them."""

    def __init__(self, model, processor, device: torch.device):
        self.model, self.processor, self.device = model.to(device).eval(), processor, device

    @classmethod
    def load(cls, clip_model: str | None, base_model: str, device: torch.device, key: str) -> ClipImageEncoder:
        """The CLIP model `clip_model` (a folder), or else the `clip/` and `feature_extractor/` beside `base_model`
        (the tiny world's base has them). `key` names the params key of `clip_model`, for the errors."""
        from transformers import CLIPModel

        if clip_model:
            folder = Path(clip_model)
            if not (folder / "config.json").is_file():
                raise SdpipeError(f"{key}: {folder} is not a CLIP model folder (config.json + weights)")
            if not (folder / "preprocessor_config.json").is_file():
                raise SdpipeError(
                    f"{key}: {folder} has no preprocessor_config.json; a CLIP model folder needs its image processor "
                    "(as the Hub's CLIP folders have it)"
                )
            return cls(CLIPModel.from_pretrained(folder, use_safetensors=True), CLIPImageProcessor.from_pretrained(folder), device)
        base = Path(base_model)
        if not (base / "clip" / "config.json").is_file() or not (base / "feature_extractor").is_dir():
            raise SdpipeError(
                f"{key} is null but base.base_model {base_model!r} has no clip/ and feature_extractor/ "
                "beside it; set clip_model to the CLIP model of its text encoder"
            )
        model = CLIPModel.from_pretrained(base / "clip", use_safetensors=True)
        return cls(model, CLIPImageProcessor.from_pretrained(base / "feature_extractor"), device)

    @classmethod
    def from_pipeline_folder(cls, folder: str | Path, device: torch.device) -> ClipImageEncoder:
        """The `image_encoder/` and `feature_extractor/` of a diffusers pipeline folder."""
        from transformers import CLIPVisionModelWithProjection

        model = CLIPVisionModelWithProjection.from_pretrained(Path(folder) / "image_encoder", use_safetensors=True)
        return cls(model, CLIPImageProcessor.from_pretrained(Path(folder) / "feature_extractor"), device)

    @torch.no_grad()
    def features(self, images: list[Image.Image]) -> torch.Tensor:
        """[N, dim] fp32 on the CPU."""
        features = []
        for start in range(0, len(images), IMAGE_BATCH):
            pixels = self.processor(images=images[start : start + IMAGE_BATCH], return_tensors="pt").pixel_values
            pixels = pixels.to(self.device)
            if hasattr(self.model, "get_image_features"):
                output = self.model.get_image_features(pixel_values=pixels)
                output = getattr(output, "pooler_output", output)  # transformers 5 returns an output object
            else:
                output = self.model(pixel_values=pixels).image_embeds
            features.append(output.float().cpu())
        return torch.cat(features)
