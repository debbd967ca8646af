"""The tiny-world oracle: reads color, shape, fill style, size and position from an image, no learning.

It is the ground-truth metric of the tiny world, so it must be near perfect on rendered images and also
robust on what small diffusion models produce (blur, color shifts, a noisy background, imperfect shapes):

1. The background color is the median of the border pixels. Every pixel gets a *coverage* in [0, 1]: its
   distance from the background relative to the shape's own color (the typical strong pixel).
2. "The shape" is the largest 8-connected component of pixels covered at least half. Its walls (a fainter
   threshold, so that thin outlines stay closed) and everything they enclose make the *filled shape*.
3. Fill style: the mean coverage inside the filled shape, away from its edges; an outline leaves it low.
4. Shape: the k-fold symmetry of the filled shape, from the normalized complex moments
   sum w (z - c)^k / sum w |z - c|^k for k = 3, 4, 5 (z = x + iy, w = coverage, c = centroid): the magnitude for
   k = 3 and 5, the real part for k = 4 (the world's shapes are axis-aligned: a square's corners make it negative, a
   cross's arms positive). They are scale invariant and, for k >= 1, unchanged by a symmetric blur. A circle has
   none, a square and a cross a strong 4th (of opposite signs), a star a strong 5th and the (isosceles) triangle a
   strong 3rd. The nearest of the prototypes, measured once on large renders of the world's own shapes (and of the
   four-pointed spark, the cross's nearest lookalike), wins.
5. Color: the nearest named color by hue of the median strongly covered pixel (robust to brightness and
   saturation shifts); a gray shape has no named color.
6. Background: `dark` when the border's median is darker than mid-gray, else `light`.
7. Size and position: the extent follows from the filled area, the center from the coverage-weighted
   centroid, moved by where the centroid sits in that shape (a triangle's is a sixth of its height low).

An image with no clear shape (blank, noise) reads as `found=False` with every attribute None.

Position on rendered images is limited by the renderer: shapes are drawn on a 4x grid, so a center within
1/8 pixel of a third-line renders the same image on both sides of it; about 1% of positions are undecidable.
"""

from __future__ import annotations

import colorsys
import functools
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from sdpipe.tinyworld import world

ATTRIBUTES = ("color", "shape", "style", "size", "position", "background")
PROTOTYPE_SHAPES = world.SHAPES + ("spark4",)  # the four-pointed spark is the cross's lookalike; other sparks read as
# the nearest world shape

MIN_CONTRAST = 40.0  # RGB distance from the background below which nothing counts as drawn
NOISE_FACTOR = 4.0  # the shape must stand out this many times more than the border's own noise
MIN_PIXELS = 8  # a smaller component is a speck, not a shape
WALL_COVERAGE = 0.35  # coverage that still counts as an outline's wall when looking for its inside
OUTLINED_BELOW = 0.92  # mean coverage inside the filled shape under which it is outlined
MIN_SATURATION = 0.15  # below this the shape is gray: none of the named colors
LARGE_FROM = (world.SIZES["small"][1] + world.SIZES["large"][0]) / 2  # extent (at 32 px) between sizes
SYMMETRY_ORDERS = (3, 4, 5)

_NEIGHBORS_4 = ((-1, 0), (1, 0), (0, -1), (0, 1))
_NEIGHBORS_8 = _NEIGHBORS_4 + ((-1, -1), (-1, 1), (1, -1), (1, 1))


@dataclass(frozen=True)
class Reading:
    """What the oracle reads from one image; every attribute is None when no shape was found."""

    found: bool
    color: str | None = None
    shape: str | None = None
    style: str | None = None
    size: str | None = None
    position: str | None = None
    background: str | None = None
    confidence: float = 0.0  # 0..1: the smallest margin of the color, shape and style decisions

    def to_dict(self) -> dict:
        return asdict(self)


NOT_FOUND = Reading(found=False)


def scene_attributes(scene: world.Scene) -> dict[str, str]:
    """The attributes the oracle should read from a rendered scene, for `score`."""
    return {attribute: getattr(scene, attribute) for attribute in ATTRIBUTES}


# ---------------------------------------------------------------------------------------------------
# Boolean-mask morphology, numpy only (32x32 masks: a few microseconds per step).


def _dilate(mask: np.ndarray, neighbors=_NEIGHBORS_8, outside: bool = False) -> np.ndarray:
    height, width = mask.shape
    padded = np.full((height + 2, width + 2), outside)
    padded[1:-1, 1:-1] = mask
    grown = mask.copy()
    for dy, dx in neighbors:
        grown |= padded[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]
    return grown


def _erode(mask: np.ndarray, neighbors=_NEIGHBORS_8) -> np.ndarray:
    return ~_dilate(~mask, neighbors, outside=True)


def _flood(allowed: np.ndarray, seeds: np.ndarray, neighbors=_NEIGHBORS_8) -> np.ndarray:
    """Pixels of `allowed` connected to `seeds` (dilation inside `allowed` until nothing changes)."""
    reached = seeds & allowed
    while True:
        grown = _dilate(reached, neighbors) & allowed
        if (grown == reached).all():
            return reached
        reached = grown


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of `mask` (empty if `mask` is)."""
    best = np.zeros_like(mask)
    remaining = mask.copy()
    while remaining.sum() > best.sum():
        seed = np.zeros_like(mask)
        seed.flat[np.argmax(remaining)] = True
        component = _flood(remaining, seed)
        if component.sum() > best.sum():
            best = component
        remaining &= ~component
    return best


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """`mask` plus everything it encloses (the outside is 4-connected: diagonal gaps do not leak)."""
    border = np.zeros_like(mask)
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
    return ~_flood(~mask, border, _NEIGHBORS_4)


# ---------------------------------------------------------------------------------------------------
# Measures.


def as_array(image) -> np.ndarray:
    """An HxWx3 float array from a PIL image or an HxWx3 (or HxWx4) uint8 array."""
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"expected an HxWx3 RGB image, got an array of shape {array.shape}")
    return array[..., :3].astype(np.float32)


def _border(pixels: np.ndarray) -> np.ndarray:
    return np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])


def _read_background(pixels: np.ndarray) -> str:
    return "dark" if float(np.median(_border(pixels).mean(axis=-1))) < 128 else "light"


def _coverage(pixels: np.ndarray) -> np.ndarray | None:
    """Per-pixel coverage in [0, 1]; None when nothing stands out from the background's own noise."""
    border = _border(pixels)
    background = np.median(border, axis=0)
    distance = np.linalg.norm(pixels - background, axis=-1)
    border_noise = float(np.median(np.linalg.norm(border - background, axis=-1)))
    peak = float(np.percentile(distance, 99.5))
    if peak < max(MIN_CONTRAST, NOISE_FACTOR * border_noise):
        return None
    # The shape's own color is the typical strong pixel, not the strongest one, which noise inflates.
    contrast = float(np.median(distance[distance >= 0.75 * peak]))
    return np.clip(distance / contrast, 0.0, 1.0)


def _symmetry(weights: np.ndarray) -> tuple[np.ndarray, complex]:
    """The normalized complex moments of `SYMMETRY_ORDERS`, and the centroid as x + iy."""
    ys, xs = np.indices(weights.shape) + 0.5  # pixel centers
    z = xs + 1j * ys
    centroid = (weights * z).sum() / weights.sum()
    z = z - centroid
    moments = [(weights * z**k).sum() / (weights * abs(z) ** k).sum() for k in SYMMETRY_ORDERS]
    features = [moment.real if k == 4 else abs(moment) for k, moment in zip(SYMMETRY_ORDERS, moments)]
    return np.array(features), complex(centroid)


@dataclass(frozen=True)
class _Prototype:
    """A world shape as the oracle measures it: symmetry moments and scale-free geometry."""

    symmetry: np.ndarray
    area: float  # filled area / extent^2
    centroid_dy: float  # centroid below the bounding-box center, in extents


@functools.cache
def _prototypes() -> dict[str, _Prototype]:
    """Measured on large, clean renders of each world shape (scale 8x), so they match the renderer."""
    resolution, extent, center = 256, 24, world.RESOLUTION / 2
    scale = resolution / world.RESOLUTION
    background = np.array(world.BACKGROUND, dtype=np.float32)
    prototypes = {}
    for shape in PROTOTYPE_SHAPES:
        scene = world.Scene("red", shape, "filled", "large", extent, center, center)
        ink = np.array(world.COLORS[scene.color], dtype=np.float32) - background
        coverage = (as_array(world.render(scene, resolution)) - background) @ ink / (ink @ ink)
        symmetry, centroid = _symmetry(coverage)
        prototypes[shape] = _Prototype(
            symmetry=symmetry,
            area=float(coverage.sum()) / (extent * scale) ** 2,
            centroid_dy=(centroid.imag - center * scale) / (extent * scale),
        )
    return prototypes


def _nearest(distances: dict[str, float]) -> tuple[str, float]:
    """The nearest name and the decision's margin in [0, 1] (1 - nearest / second nearest distance)."""
    (nearest, name), (second, _) = sorted((d, n) for n, d in distances.items())[:2]
    return name, 1.0 - nearest / max(second, 1e-9)


_NAMED_HUES = {name: colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] for name, rgb in world.COLORS.items()}


def _read_color(core_pixels: np.ndarray) -> tuple[str | None, float]:
    """Nearest named color by hue of the median core pixel, and the decision's margin."""
    hue, saturation, _ = colorsys.rgb_to_hsv(*(np.median(core_pixels, axis=0) / 255))
    if saturation < MIN_SATURATION:
        return None, 0.0
    hue_distances = {name: min(abs(hue - h), 1 - abs(hue - h)) for name, h in _NAMED_HUES.items()}
    return _nearest(hue_distances)


def _read_style(coverage: np.ndarray, interior: np.ndarray) -> tuple[str, float]:
    """Filled or outlined from the mean coverage inside the filled shape, and the decision's margin."""
    deep = _erode(interior, _NEIGHBORS_4)  # further from the edges that blur darkens, when big enough
    style_score = float(coverage[deep if deep.sum() >= 3 else interior].mean())
    style = "filled" if style_score >= OUTLINED_BELOW else "outlined"
    return style, min(1.0, abs(style_score - OUTLINED_BELOW) / 0.08)


def _read_shape(filled_coverage: np.ndarray) -> tuple[str, float, float, complex]:
    """The nearest prototype by symmetry moments, the decision's margin, the extent and the center."""
    symmetry, centroid = _symmetry(filled_coverage)
    prototypes = _prototypes()
    distances = {name: float(np.linalg.norm(symmetry - p.symmetry)) for name, p in prototypes.items()}
    shape, margin = _nearest(distances)
    extent = math.sqrt(filled_coverage.sum() / prototypes[shape].area)
    center = centroid - 1j * prototypes[shape].centroid_dy * extent
    return shape, margin, extent, center


def read(image) -> Reading:
    """Reads one image (a PIL image or an HxWx3 uint8 array)."""
    pixels = as_array(image)
    coverage = _coverage(pixels)
    if coverage is None:
        return NOT_FOUND
    component = _largest_component(coverage >= 0.5)
    if component.sum() < MIN_PIXELS:
        return NOT_FOUND
    walls = _flood(coverage >= WALL_COVERAGE, component)
    filled = _fill_holes(walls)
    interior = _erode(filled, _NEIGHBORS_4)
    if not interior.any():
        interior = filled
    style, style_margin = _read_style(coverage, interior)

    # The filled shape's coverage: fully covered inside, as measured on its antialiased rim.
    filled_coverage = np.where(interior | (filled & ~walls), 1.0, coverage) * _dilate(filled)
    shape, shape_margin, extent, center = _read_shape(filled_coverage)

    core = component & (coverage >= 0.75)
    color, color_margin = _read_color(pixels[core if core.any() else component])

    resolution = pixels.shape[1]
    large = extent * world.RESOLUTION / resolution >= LARGE_FROM
    return Reading(
        found=True,
        color=color,
        shape=shape,
        style=style,
        size="large" if large else "small",
        position=world.position_name(center.real, center.imag, resolution=resolution),
        background=_read_background(pixels),
        confidence=round(min(color_margin, shape_margin, style_margin), 4),
    )


STYLES = {"outlined": ("style", "outlined"), "dark": ("background", "dark")}  # style -> the reading that shows it


def shows_style(reading: Reading, style: str) -> bool:
    """Whether a reading shows one of `STYLES`: outlined (the fill style) or dark (the background)."""
    attribute, value = STYLES[style]
    return getattr(reading, attribute) == value


def read_batch(images: Iterable) -> list[Reading]:
    """Reads every image of a list (or of an NxHxWx3 array)."""
    return [read(image) for image in images]


def score(images: Iterable, expected: list[dict]) -> dict[str, float]:
    """Per-attribute accuracy over a batch, plus `all` (every given attribute right) and `found`.

    Each expected dict holds any of `ATTRIBUTES`; only the attributes it gives are scored for its image,
    and an attribute is reported only if some image was scored on it. An image already read may be given as its
    `Reading`.
    """
    readings = [image if isinstance(image, Reading) else read(image) for image in images]
    if len(readings) != len(expected):
        raise ValueError(f"score got {len(readings)} images but {len(expected)} expected dicts")
    right: dict[str, list[bool]] = {attribute: [] for attribute in ATTRIBUTES}
    all_right = []
    for reading, wanted in zip(readings, expected):
        unknown = set(wanted) - set(ATTRIBUTES)
        if unknown:
            raise ValueError(f"unknown attributes {sorted(unknown)}; expected some of {ATTRIBUTES}")
        checks = [getattr(reading, attribute) == value for attribute, value in wanted.items()]
        for attribute, ok in zip(wanted, checks):
            right[attribute].append(ok)
        all_right.append(all(checks))
    result = {attribute: float(np.mean(oks)) for attribute, oks in right.items() if oks}
    result["all"] = float(np.mean(all_right)) if all_right else 0.0
    result["found"] = float(np.mean([reading.found for reading in readings])) if readings else 0.0
    return result
