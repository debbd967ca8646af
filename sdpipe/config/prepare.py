"""`prepare`: which files of a dataset are images, how they are checked, and how they are resized."""

from __future__ import annotations

from typing import Literal

from PIL import Image
from pydantic import Field, field_validator, model_validator

from sdpipe.config.section import Section

CAPTION_SUFFIXES = (".txt", ".jsonl")


class BucketParams(Section):
    """Aspect-ratio buckets (kohya style): each image is resized to the bucket whose aspect is closest to its own,
    instead of being cropped to a square. Bucket sides are multiples of `step`, within [`min_side`, `max_side`],
    with an area of at most `base.resolution`².

    The defaults suit the 32-px tiny world. For SD 1.5 at 512 px the usual values are `step: 64`,
    `min_side: 256`, `max_side: 1024`; for SDXL at 1024 px, `step: 64`, `min_side: 512`, `max_side: 2048`.
    """

    enabled: bool = False
    """Resize each image to its closest aspect-ratio bucket instead of a `base.resolution` square."""

    step: int = Field(default=8, ge=8, multiple_of=8)
    """Bucket sides are multiples of this many pixels (a multiple of 8, the VAE's downscale factor). 64 for
    real models (SD 1.5, SDXL)."""

    min_side: int | None = Field(default=None, ge=8)
    """The shortest bucket side in pixels, a multiple of `step`. None: half of `base.resolution` (rounded down to
    a multiple of `step`), which gives 16 at the tiny world's 32 px and 256 at 512 px."""

    max_side: int | None = Field(default=None, ge=8)
    """The longest bucket side in pixels, a multiple of `step`. None: twice `base.resolution` (64 at 32 px,
    1024 at 512 px)."""

    @model_validator(mode="after")
    def _sides_fit_the_step(self) -> BucketParams:
        for name in ("min_side", "max_side"):
            side = getattr(self, name)
            if side is not None and side % self.step:
                raise ValueError(
                    f"prepare.buckets.{name} ({side}) must be a multiple of prepare.buckets.step ({self.step})"
                )
        if self.min_side is not None and self.max_side is not None and self.min_side > self.max_side:
            raise ValueError(
                f"prepare.buckets.min_side ({self.min_side}) must not be larger than "
                f"prepare.buckets.max_side ({self.max_side})"
            )
        return self


class PrepareParams(Section):
    strict: bool = False
    """Fail the stage when any file is skipped (corrupt, too small, duplicate, not an image, ...) or any caption
    or metadata row is unusable, instead of reporting it in `report.json` and going on. Nothing is written."""

    min_size: int = Field(default=8, ge=1)
    """The shortest side, in pixels, that a source image may have; smaller images are skipped."""

    crop: Literal["center", "none"] = "center"
    """How an image gets the target shape: `center` keeps the aspect ratio and crops the middle; `none` resizes
    the whole image to the target shape, squashing it."""

    buckets: BucketParams = Field(default_factory=BucketParams)
    """Aspect-ratio bucketing (off by default: every image becomes a `base.resolution` square)."""

    extensions: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp")
    """File name extensions read as images, compared ignoring case (`.JPG` is `.jpg`). Other files, except
    `.txt` captions and `.jsonl` metadata, are skipped as `unsupported extension`."""

    @field_validator("extensions")
    @classmethod
    def _extensions_are_suffixes(cls, extensions: tuple[str, ...]) -> tuple[str, ...]:
        if not extensions:
            raise ValueError("list at least one image extension, such as .png")
        normalized = []
        for extension in extensions:
            extension = extension.lower()
            if not extension.startswith(".") or len(extension) < 2 or "/" in extension:
                raise ValueError(f"`{extension}` is not a file name extension; write it with its dot, such as `.png`")
            if extension in CAPTION_SUFFIXES:
                raise ValueError(f"`{extension}` is reserved for captions and metadata, not images")
            if extension not in Image.registered_extensions():
                raise ValueError(f"`{extension}` is not an image file extension that Pillow can read")
            if extension not in normalized:
                normalized.append(extension)
        return tuple(normalized)
