"""What a model family is: the parts of Stable Diffusion that differ between SD 1.x/2.x, SDXL and later families.

A family owns its pipeline class, its tokenizers and text encoders (a list: SDXL has two), how captions become the
UNet's conditioning (`Conditioning`: the cross-attention context, plus SDXL's pooled embedding and size/crop time
ids) and how the UNet is called with it. The training core, sampling and evaluation go through a family instead of
naming SD 1.x components, so a new family is one new module beside `sd.py` and `sdxl.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Conditioning:
    """The UNet's conditioning for a batch of captions, row i for caption i.

    `context`: the cross-attention context (`encoder_hidden_states`), [B, T, D]. `pooled`: SDXL's pooled text
    embedding ([B, P], the `text_embeds` of its added conditioning), None for SD 1.x/2.x.
    """

    context: torch.Tensor
    pooled: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.context)

    def rows(self, index) -> Conditioning:
        """The conditioning of the rows `index` selects (an int keeps the batch dimension)."""
        index = slice(index, index + 1) if isinstance(index, int) else index
        return Conditioning(self.context[index], None if self.pooled is None else self.pooled[index])

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        pooled = [part.pooled for part in parts]
        return Conditioning(
            torch.cat([part.context for part in parts]),
            None if pooled[0] is None else torch.cat(pooled),
        )


class ModelFamily:
    """One model family. Subclasses set the attributes and implement `encode` and `unet_kwargs`."""

    name: str = ""
    """How `base.family` names it."""
    title: str = ""
    """How messages name it (`Stable Diffusion 1.x/2.x`)."""
    pipeline_class: str = ""
    """The diffusers pipeline class sdpipe loads its models with and writes its folders as."""
    folder_classes: tuple[str, ...] = ()
    """Every `model_index.json` `_class_name` of its folders (text-to-image, img2img, inpainting)."""
    tokenizers: tuple[str, ...] = ()
    """Its tokenizers' component names, in the order of `text_encoders`."""
    text_encoders: tuple[str, ...] = ()
    """Its text encoders' component names."""
    text_encoder_classes: tuple[str, ...] = ()
    """The transformers class of each text encoder."""
    size_conditioning: bool = False
    """Its UNet takes each image's original size and crop (SDXL's time ids): `encode` caches them beside the latents."""
    single_file_text_prefixes: tuple[str, ...] = ()
    """Where its original-layout single files keep the text encoders' weights."""
    pipeline_kwargs: dict = {}
    """What sdpipe passes when it builds or loads the family's pipeline, besides its components (SD 1.x: no
    safety checker)."""

    @property
    def components(self) -> tuple[str, ...]:
        """The components of its diffusers folders that sdpipe loads."""
        return ("unet", "vae", "scheduler", *self.tokenizers, *self.text_encoders)

    def pipeline(self, **components):
        """A new pipeline of the family's class made of `components` (those not given are None)."""
        import diffusers

        pipeline_class = getattr(diffusers, self.pipeline_class)
        return pipeline_class(**{"feature_extractor": None, **self.pipeline_kwargs, **components})

    def encode(self, tokenizers: list, text_encoders: list, captions: list[str], device: torch.device) -> Conditioning:
        """The conditioning of `captions`, computed as the family's diffusers pipeline computes it."""
        raise NotImplementedError

    def pipeline_conditioning(self, pipeline, prompts: list[str], device) -> Conditioning:
        """The conditioning of `prompts` as a loaded pipeline of the family computes it (`encode_prompt`, which also
        expands textual-inversion tokens and may be a method's own, e.g. aesthetic gradients'), without guidance."""
        raise NotImplementedError

    def unet_kwargs(self, conditioning: Conditioning, time_ids: torch.Tensor | None) -> dict:
        """The UNet's keyword arguments besides the latents and timesteps."""
        raise NotImplementedError

    def predict(
        self, unet, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning, time_ids=None
    ) -> torch.Tensor:
        """The UNet's prediction for noisy `latents` at `timesteps`."""
        return unet(latents, timesteps, **self.unet_kwargs(conditioning, time_ids), return_dict=False)[0]

    def __repr__(self) -> str:
        return f"<family {self.name}>"


def token_ids(tokenizer, captions: list[str]) -> torch.Tensor:
    """`captions` padded (or cut) to the tokenizer's length, as every SD pipeline tokenizes a prompt."""
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
