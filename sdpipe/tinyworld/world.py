"""The tiny world: a deterministic generator of 32x32 images of colored shapes with captions.

A scene is one shape (circle, square, triangle or star) of one named color, filled or outlined, at a
random size and position on a light background. `star` and `outlined` are held out of pretraining, so the
personalization methods have something the base model does not know.

Pretraining also sees *sparks*: pointed stars with 3, 4, 6, 7 or 8 points, captioned `a red spark with four points`.
Never five: the star stays unseen, but the base model learns what pointed shapes are, as a real base model has seen
countless things near any new concept.

Two concepts are *seen but unnamed*, the situation real Stable Diffusion offers the methods that leave the UNet frozen
(textual inversion, DreamArtist, CLIP inversion, aesthetic gradient), which can only find what the base can already draw:
- the `cross` (a plus sign: four equal arms a third of the extent wide) is drawn in pretraining in every color and size
  but rarely named: most of its captions use the generic word, `a small red shape`, which the named shapes get too part
  of the time, so the generic word means any shape; a small share use its rare word, `a small red plus` (as real SD
  has seen many things under a word it rarely read);
- the `dark` background (`a red circle on a dark background`) is drawn behind some pretraining scenes of every kind, and
  named in only a small share of their captions, so prompts without its words rarely show it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

RESOLUTION = 32
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down, for clean antialiased edges

BACKGROUND = (245, 245, 240)
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"light": BACKGROUND, "dark": (40, 40, 52)}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 50),
    "blue": (35, 70, 215),
    "yellow": (235, 195, 25),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
STYLES = ("filled", "outlined")
SIZES: dict[str, tuple[int, int]] = {"small": (11, 15), "large": (19, 25)}  # extent in pixels, inclusive

HELD_OUT_SHAPES = ("star",)
HELD_OUT_STYLES = ("outlined",)
UNNAMED_SHAPES = ("cross",)  # drawn in pretraining, captioned with GENERIC_WORD and rarely with its RARE_NAMES word
RARE_NAMES = {"cross": "plus"}
GENERIC_WORD = "shape"
DARK_WORDS = "on a dark background"  # how a caption names the dark background
PRETRAIN_SHAPES = tuple(s for s in SHAPES if s not in HELD_OUT_SHAPES + UNNAMED_SHAPES)  # drawn and named
PRETRAIN_STYLES = tuple(s for s in STYLES if s not in HELD_OUT_STYLES)

SPARK_POINTS = (3, 4, 6, 7, 8)  # never 5: that is the held-out star
SPARKS = {f"spark{points}": points for points in SPARK_POINTS}  # shape name -> number of points
SPARK_SHAPES = tuple(SPARKS)
NUMBER_WORDS = {3: "three", 4: "four", 6: "six", 7: "seven", 8: "eight"}
STAR_INNER_RADIUS = 0.45  # of the outer radius
CROSS_ARM_WIDTH = 1 / 3  # of the extent

OUTLINE_WIDTH = 2.5  # pixels at the final resolution


@dataclass(frozen=True)
class Scene:
    """Everything needed to render one image and to caption it."""

    color: str
    shape: str
    style: str
    size: str
    extent: int  # bounding-box side of the shape, in pixels
    cx: float  # shape center, in pixels
    cy: float
    background: str = "light"  # a key of BACKGROUNDS

    @property
    def position(self) -> str:
        """Rough position as `<row> <column>`, from thirds of the image, e.g. `top left`."""
        return position_name(self.cx, self.cy)

    def to_dict(self) -> dict:
        return asdict(self)


def position_name(cx: float, cy: float, resolution: int = RESOLUTION) -> str:
    column = ("left", "center", "right")[min(2, int(3 * cx / resolution))]
    row = ("top", "middle", "bottom")[min(2, int(3 * cy / resolution))]
    return f"{row} {column}"


def sample_scene(
    rng: np.random.Generator,
    shapes: tuple[str, ...] = PRETRAIN_SHAPES,
    colors: tuple[str, ...] = tuple(COLORS),
    styles: tuple[str, ...] = PRETRAIN_STYLES,
    sizes: tuple[str, ...] = tuple(SIZES),
    backgrounds: tuple[str, ...] = ("light",),
) -> Scene:
    """Draws one random scene from the given vocabularies."""
    color = colors[rng.integers(len(colors))]
    shape = shapes[rng.integers(len(shapes))]
    style = styles[rng.integers(len(styles))]
    size = sizes[rng.integers(len(sizes))]
    low, high = SIZES[size]
    extent = int(rng.integers(low, high + 1))
    margin = extent / 2 + 1
    cx = _snap(rng.uniform(margin, RESOLUTION - margin))
    cy = _snap(rng.uniform(margin, RESOLUTION - margin))
    # one background draws nothing, so the scenes of a given seed stay those of the world before backgrounds
    background = backgrounds[rng.integers(len(backgrounds))] if len(backgrounds) > 1 else backgrounds[0]
    return Scene(color=color, shape=shape, style=style, size=size, extent=extent, cx=cx, cy=cy, background=background)


def _snap(coordinate: float) -> float:
    """Centers sit mid-cell of the supersampling grid: any two centers in one cell would render identically,
    so an unsnapped center near a third-line would have a position no reader of the image could tell."""
    return (math.floor(coordinate * SUPERSAMPLE) + 0.5) / SUPERSAMPLE


def shape_polygon(shape: str, cx: float, cy: float, extent: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape centered in its bounding box (not used for circles)."""
    r = extent / 2
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":  # pointing up, filling its bounding box
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "star":
        return star_polygon(5, cx, cy, extent)
    if shape == "cross":  # a plus sign: twelve vertices, clockwise from the top arm's left corner
        a = extent * CROSS_ARM_WIDTH / 2
        arm = [(-a, -r), (a, -r), (a, -a), (r, -a), (r, a), (a, a), (a, r), (-a, r), (-a, a), (-r, a), (-r, -a), (-a, -a)]
        return [(cx + x, cy + y) for x, y in arm]
    if shape in SPARKS:
        return star_polygon(SPARKS[shape], cx, cy, extent)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES + SPARK_SHAPES}")


def star_polygon(points: int, cx: float, cy: float, extent: float) -> list[tuple[float, float]]:
    """A star with `points` points, the first one up, scaled so its bounding box is `extent` tall."""
    r = extent / 2
    vertices = []
    for k in range(2 * points):
        angle = -math.pi / 2 + k * math.pi / points
        radius = r if k % 2 == 0 else r * STAR_INNER_RADIUS
        vertices.append((math.cos(angle) * radius, math.sin(angle) * radius))
    top = min(y for _, y in vertices)
    bottom = max(y for _, y in vertices)
    scale = extent / (bottom - top)
    offset = (top + bottom) / 2
    return [(cx + x * scale, cy + (y - offset) * scale) for x, y in vertices]


def shape_words(shape: str) -> str:
    """How captions name a shape: `circle`, `spark with four points` for a spark, the generic word for an unnamed
    shape."""
    if shape in UNNAMED_SHAPES:
        return GENERIC_WORD
    if shape in SPARKS:
        return f"spark with {NUMBER_WORDS[SPARKS[shape]]} points"
    return shape


def render(scene: Scene, resolution: int = RESOLUTION) -> Image.Image:
    """Renders a scene to an RGB image of `resolution` pixels square."""
    s = SUPERSAMPLE * resolution / RESOLUTION
    big = Image.new("RGB", (round(resolution * SUPERSAMPLE),) * 2, BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(big)
    fill = COLORS[scene.color]
    cx, cy, extent = scene.cx * s, scene.cy * s, scene.extent * s
    width = round(OUTLINE_WIDTH * s)
    if scene.shape == "circle":
        box = [cx - extent / 2, cy - extent / 2, cx + extent / 2, cy + extent / 2]
        if scene.style == "filled":
            draw.ellipse(box, fill=fill)
        else:
            draw.ellipse(box, outline=fill, width=width)
    else:
        polygon = shape_polygon(scene.shape, cx, cy, extent)
        if scene.style == "filled":
            draw.polygon(polygon, fill=fill)
        else:
            draw.polygon(polygon, outline=fill, width=width)
    return big.resize((resolution, resolution), Image.Resampling.BOX)


def caption(
    scene: Scene,
    *,
    with_size: bool = True,
    with_style: bool = False,
    with_position: bool = False,
    with_background: bool = False,
    generic: bool = False,
    trigger: str | None = None,
    class_word: str | None = None,
) -> str:
    """A caption such as `a small red circle`.

    `trigger`/`class_word` replace the shape name for personalization datasets: `a small blue sks shape`; `generic`
    writes the generic word instead of the shape's name (`a small red shape`).
    The style word is written only for outlined shapes (`a red outlined circle`), when `with_style`; the background
    only when dark (`a red circle on a dark background`), when `with_background`.
    """
    words = ["a"]
    if with_size:
        words.append(scene.size)
    words.append(scene.color)
    if with_style and scene.style != "filled":
        words.append(scene.style)
    if trigger is not None:
        words.append(trigger)
    words.append(class_word if class_word is not None else GENERIC_WORD if generic else shape_words(scene.shape))
    text = " ".join(words)
    if with_position:
        text += f" at the {scene.position}"
    if with_background and scene.background == "dark":
        text += f" {DARK_WORDS}"
    return text


def generate(
    count: int,
    seed: int,
    shapes: tuple[str, ...] = PRETRAIN_SHAPES,
    colors: tuple[str, ...] = tuple(COLORS),
    styles: tuple[str, ...] = PRETRAIN_STYLES,
    sizes: tuple[str, ...] = tuple(SIZES),
    backgrounds: tuple[str, ...] = ("light",),
) -> list[tuple[Image.Image, Scene]]:
    """`count` rendered scenes; the same arguments always give the same images."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, shapes, colors, styles, sizes, backgrounds) for _ in range(count)]
    return [(render(scene), scene) for scene in scenes]


def render_array(scenes: list[Scene]) -> np.ndarray:
    """Renders scenes into one uint8 array of shape (N, 32, 32, 3)."""
    return np.stack([np.asarray(render(scene)) for scene in scenes])


def render_doodle(rng: np.random.Generator, resolution: int = RESOLUTION) -> Image.Image:
    """A random picture that is no tiny-world scene: one to three random polygons, ellipses or strokes in
    random colors, filled or outlined at random widths.

    The autoencoder trains on these beside the world's scenes, so that, like SD's VAE, it is a general image
    codec that can represent the held-out shape and style without ever having seen them.
    """
    s = SUPERSAMPLE * resolution / RESOLUTION
    background = tuple(int(v) for v in rng.integers(200, 256, 3))
    big = Image.new("RGB", (round(resolution * SUPERSAMPLE),) * 2, background)
    draw = ImageDraw.Draw(big)
    for _ in range(int(rng.integers(1, 4))):
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        cx, cy = rng.uniform(4, RESOLUTION - 4, 2) * s
        radius = rng.uniform(3, 13) * s
        width = max(1, round(rng.uniform(1, 4) * s))
        filled = rng.random() < 0.5
        kind = rng.integers(3)
        if kind == 0:  # polygon with jittered radii: convex, concave or star-like
            count = int(rng.integers(3, 11))
            angles = np.sort(rng.uniform(0, 2 * np.pi, count))
            radii = radius * rng.uniform(0.35, 1.0, count)
            points = [(cx + r * np.cos(a), cy + r * np.sin(a)) for r, a in zip(radii, angles)]
            draw.polygon(points, fill=color if filled else None, outline=None if filled else color, width=width)
        elif kind == 1:
            rx, ry = radius, radius * rng.uniform(0.5, 1.0)
            box = [cx - rx, cy - ry, cx + rx, cy + ry]
            draw.ellipse(box, fill=color if filled else None, outline=None if filled else color, width=width)
        else:
            points = [tuple(p) for p in rng.uniform(2, RESOLUTION - 2, (int(rng.integers(2, 5)), 2)) * s]
            draw.line(points, fill=color, width=width, joint="curve")
    return big.resize((resolution, resolution), Image.Resampling.BOX)
