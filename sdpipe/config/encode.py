"""`encode`: caching the VAE latents of every prepared image, once, for every train stage to share."""

from typing import Literal

from pydantic import Field

from sdpipe.config.section import Section


class EncodeParams(Section):
    batch_size: int = Field(default=16, ge=1)
    """Images encoded per VAE forward pass (images of the same size are batched together). Only speed and
    memory depend on it."""

    flip: bool = True
    """Also cache the latents of each image flipped left-right (keys `<id>.flip`), so that training can use
    flip augmentation without running the VAE. Leave on unless the concept is not mirror-symmetric
    (text, asymmetric logos)."""

    mode: Literal["mean", "sample"] = "mean"
    """`mean`: cache the mean of the VAE's latent distribution (deterministic; what most trainers do).
    `sample`: cache one draw from it, seeded by `base.seed` and the image id (as diffusers' training examples,
    which sample, but drawn once instead of at every step)."""
