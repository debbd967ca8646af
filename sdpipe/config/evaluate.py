"""`evaluate`: sampling every model with the same prompts and seeds and scoring it."""

from pydantic import Field

from sdpipe.config.section import Section


class EvaluateParams(Section):
    seeds_per_prompt: int = Field(default=8, ge=1)
    """Images sampled per prompt (seeds 0..N-1, the same for every model)."""
    steps: int = Field(default=25, ge=1)
    """Sampler steps per image."""
    guidance_scale: float = Field(default=7.5, ge=1.0)
    """Classifier-free guidance scale."""
    batch_size: int = Field(default=64, ge=1)
    """Images sampled per pipeline call."""
