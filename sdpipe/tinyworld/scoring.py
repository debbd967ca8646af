"""Scoring a text-to-image pipeline on the tiny world: the probes' prompts (sampled with `sdpipe.sampling.sample`,
fixed seeds) read with the oracle.

Used by the base-model benchmark and by the evaluate stage, so both report the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from sdpipe.tinyworld import oracle, world


@dataclass(frozen=True)
class Probe:
    """One prompt and the attributes the oracle should read from its images (None: not scored)."""

    prompt: str
    color: str | None = None
    shape: str | None = None
    style: str | None = None

    def expected(self) -> dict:
        return {k: v for k, v in (("color", self.color), ("shape", self.shape), ("style", self.style)) if v}


def color_shape_probes(shapes: tuple[str, ...] = world.PRETRAIN_SHAPES) -> list[Probe]:
    """`a <color> <shape>` for every color and shape."""
    return [Probe(f"a {color} {shape}", color=color, shape=shape) for shape in shapes for color in world.COLORS]


def score_probes(images: list[Image.Image | oracle.Reading], probes: list[Probe], seeds_per_probe: int) -> dict:
    """Per-attribute accuracy over all images (or their oracle readings), plus joint accuracy (every scored attribute
    right)."""
    expected = [probe.expected() for probe in probes for _ in range(seeds_per_probe)]
    return oracle.score(images, expected)

