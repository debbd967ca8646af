"""Randomness as a pure function of the seed and a position: the same (seed, what, step) always draws the same.

Training draws its data order, flips, caption changes, noise and timesteps from generators derived here instead
of from a running global state. A run resumed at step N therefore draws exactly what an uninterrupted run
draws at step N, and two processes never need to exchange random state.
"""

from __future__ import annotations

import hashlib
import random

import torch


def derived_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed for the position `parts` (e.g. `"noise", step, process`) under the run's `seed`."""
    text = ":".join(str(part) for part in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") >> 1


def torch_generator(seed: int, *parts: object) -> torch.Generator:
    """A CPU torch generator for `parts`; draw on the CPU and move the result, so every device draws the same."""
    return torch.Generator().manual_seed(derived_seed(seed, *parts))


def python_rng(seed: int, *parts: object) -> random.Random:
    """A `random.Random` for `parts` (caption tag shuffles and drops)."""
    return random.Random(derived_seed(seed, *parts))
