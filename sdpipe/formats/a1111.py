"""Fields of A1111's own file formats that several writers fill in (embeddings, hypernetworks)."""

from __future__ import annotations

from sdpipe.errors import SdpipeError
from sdpipe.models.loading import model_fingerprint


def checkpoint_hash(base_model: str) -> str:
    """A short hash of the base model's files, for A1111's `sd_checkpoint` field (informative only)."""
    try:
        return model_fingerprint(base_model)[:10]
    except SdpipeError:
        return ""
