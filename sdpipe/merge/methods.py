"""The tensor math of each merge method, for one tensor (the same key of every input).

Inputs are fp32 tensors of one shape; weights are Python floats. The recipe runner (`sdpipe.merge.recipe`) reads
the inputs key by key and calls these, so that a merge never holds more than one tensor per input.
"""

from __future__ import annotations

import hashlib
import math

import torch

# SLERP falls back to a weighted sum when the two tensors are this close to parallel (or anti-parallel)
SLERP_PARALLEL = 0.9995


def weighted_sum(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1 - alpha) * A + alpha * B."""
    return (1 - alpha) * a + alpha * b


def add_difference(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, alpha: float) -> torch.Tensor:
    """A + alpha * (B - C)."""
    return a + alpha * (b - c)


def triple_sum(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """(1 - alpha - beta) * A + alpha * B + beta * C."""
    return (1 - alpha - beta) * a + alpha * b + beta * c


def sum_twice(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """(1 - beta) * ((1 - alpha) * A + alpha * B) + beta * C."""
    return weighted_sum(weighted_sum(a, b, alpha), c, beta)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical linear interpolation from A (t = 0) to B (t = 1), each tensor taken as one flat vector.

    The result follows the great circle between the two directions, with the norms interpolated along; where the
    vectors are (nearly) parallel or one is zero, the arc is a line and this is a weighted sum.
    """
    a64, b64 = a.flatten().double(), b.flatten().double()
    norm_a, norm_b = a64.norm().item(), b64.norm().item()
    if norm_a == 0 or norm_b == 0:
        return weighted_sum(a, b, t)
    cosine = min(max((a64 @ b64).item() / (norm_a * norm_b), -1.0), 1.0)
    if abs(cosine) > SLERP_PARALLEL:
        return weighted_sum(a, b, t)
    angle = math.acos(cosine)
    sin_angle = math.sin(angle)
    return (math.sin((1 - t) * angle) / sin_angle) * a + (math.sin(t * angle) / sin_angle) * b


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """The cosine of the angle between two tensors taken as flat vectors (1 for equal tensors, zero ones included)."""
    if torch.equal(a, b):
        return 1.0
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def similarity_range(similarities: list[float]) -> tuple[float, float]:
    """The 1st and 99th percentiles of a model's per-tensor similarities (outliers aside, as supermerger does)."""
    values = torch.tensor(similarities, dtype=torch.float64)
    return torch.quantile(values, 0.01).item(), torch.quantile(values, 0.99).item()


def cosine_adaptive(
    a: torch.Tensor, b: torch.Tensor, alpha: float, similarity: float, low: float, high: float
) -> torch.Tensor:
    """k * A + (1 - k) * B with k = clip(s - alpha, 0, 1), s = `similarity` scaled from [low, high] to [0, 1].

    `similarity` is this tensor's `cosine_similarity` of A and B and [low, high] the `similarity_range` of the
    whole model: the more alike A and B are here compared with the rest of the model, the more of A is kept.
    """
    scaled = (similarity - low) / (high - low) if high > low else 1.0
    keep_a = min(max(scaled - alpha, 0.0), 1.0)
    return keep_a * a + (1 - keep_a) * b


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim step: keeps the `density` share of the entries with the largest magnitude, zeroes the others."""
    if density >= 1:
        return delta
    count = max(1, math.ceil(density * delta.numel()))
    flat = delta.flatten()
    keep = torch.zeros(flat.shape, dtype=torch.bool)
    keep[flat.abs().topk(count).indices] = True
    return torch.where(keep, flat, 0.0).view_as(delta)


def ties(
    base: torch.Tensor,
    models: list[torch.Tensor],
    weights: list[float],
    density: float,
    scale: float = 1.0,
    target: torch.Tensor | None = None,
) -> torch.Tensor:
    """TIES-merging: target + scale * the sign-agreeing weighted mean of the trimmed differences from `base`.

    Per entry: the elected sign is the sign of the weighted sum of the trimmed differences; the merged difference
    is the weighted mean of those differences that are non-zero and have that sign (0 where none has).
    """
    deltas = torch.stack([trim(model - base, density) for model in models])
    model_weights = torch.tensor(weights, dtype=deltas.dtype).view(-1, *([1] * base.dim()))
    weighted = deltas * model_weights
    elected = torch.sign(weighted.sum(dim=0))
    agrees = (torch.sign(deltas) == elected) & (deltas != 0)
    agreeing_weight = (model_weights * agrees).sum(dim=0)
    merged = torch.where(
        agreeing_weight > 0,
        (weighted * agrees).sum(dim=0) / agreeing_weight.clamp_min(torch.finfo(deltas.dtype).tiny),
        0.0,
    )
    return (base if target is None else target) + scale * merged


def dare(
    base: torch.Tensor,
    models: list[torch.Tensor],
    weights: list[float],
    drop_rate: float,
    generator: torch.Generator,
    target: torch.Tensor | None = None,
) -> torch.Tensor:
    """DARE: target + sum of weight * (model - base), each difference with a random `drop_rate` share of its
    entries zeroed and the others divided by (1 - drop_rate), so that its expected value is unchanged."""
    merged = (base if target is None else target).clone()
    for model, weight in zip(models, weights, strict=True):
        delta = model - base
        if drop_rate > 0:
            kept = torch.rand(delta.shape, generator=generator) >= drop_rate
            delta = torch.where(kept, delta / (1 - drop_rate), 0.0)
        merged += weight * delta
    return merged


def key_generator(seed: int, key: str) -> torch.Generator:
    """A generator for one key's random draws that depends on the seed and the key only, not on the order of keys."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
