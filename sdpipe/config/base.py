"""`base`: what every stage shares: the base model, the seed, device and precision."""

from typing import Annotated, Literal

from pydantic import Field

from sdpipe.config.section import Section


class BaseParams(Section):
    base_model: str = "artifacts/pretrain/tinyworld"
    """The model to customize: a diffusers folder, a single-file `.safetensors` checkpoint, or a hub id."""

    base_model_config: str | None = None
    """For a single-file checkpoint: a local diffusers folder (or its config files) describing its architecture."""

    extra_families: list[Literal["sdxl"]] = Field(default_factory=list)
    """Model families built and scored beside `base_model`'s, each on its own base (`sdxl.base_model`) with its own
    methods (`sdxl.methods`): the tiny world's params.yaml has `[sdxl]` (the tiny SDXL beside the tiny SD 1.x); `[]`
    builds `base_model` only."""

    seed: int = Field(default=0, ge=0, lt=2**63)
    """Seed for every random choice in every stage (below 2**63: torch seeds are 64-bit); the same seed gives the
    same outputs."""

    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    """`auto` (CUDA when present, else CPU), `cpu`, `cuda`, `cuda:N` or `mps`."""

    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    """Compute precision: `auto` is bf16 on CUDA that supports it, fp16 on other CUDA, fp32 on CPU."""

    resolution: int = Field(default=32, ge=8, le=4096, multiple_of=8)
    """Training resolution in pixels (square side, or the bucket area's side when buckets are on)."""

    datasets: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]] = Field(
        default_factory=lambda: ["star", "star_val", "outlined"], min_length=1
    )
    """Dataset folder names under `datasets/` that the pipeline prepares, captions and encodes."""
