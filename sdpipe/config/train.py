"""`train`: which training methods run (one `train@<method>` DVC stage each) and their settings."""

from typing import Literal

from pydantic import Field, field_validator

from sdpipe.config.section import Section

METHODS = (
    "finetune",
    "textual_inversion",
    "aesthetic_gradient",
    "custom_diffusion",
    "hypernetwork",
    "null_text_inversion",
    "clip_inversion",
    "dreamartist",
    "dreambooth",
    "lora",
)
BUILT_METHODS: tuple[str, ...] = ()  # methods whose sdpipe.methods module exists; the rest are refused


class TrainParams(Section):
    methods: list[Literal[METHODS]] = Field(default_factory=list)  # type: ignore[valid-type]
    """Methods to train, each as its own `train@<method>` stage writing `artifacts/train/<method>/`."""

    @field_validator("methods")
    @classmethod
    def _methods_are_built(cls, methods: list[str]) -> list[str]:
        missing = [m for m in methods if m not in BUILT_METHODS]
        if missing:
            built = ", ".join(BUILT_METHODS) or "none yet"
            raise ValueError(f"method(s) {', '.join(missing)} not available in this version (available: {built})")
        if len(set(methods)) != len(methods):
            raise ValueError("a method is listed twice")
        return methods
