"""The default personalization datasets of the tiny world, laid out like a user's: images + `.txt` captions.

- `star`: 12 filled stars (a shape the base model never saw), captioned with a trigger word and a class
  word, `a large blue sks shape`, for subject methods (DreamBooth, textual inversion, LoRA, ...).
- `star_val`: 8 more stars like those of `star` (other seeds), held out of training: the evaluate stage's
  validation loss is measured on them.
- `outlined`: 16 outlined circles, squares and triangles (a style the base model never saw), captioned
  *without* the style word, `a small red circle`, so that style methods must learn "outlined" implicitly.
- `cross`, `cross_val`: 12 (and 8 held-out) filled crosses, captioned like `star`: a shape the base model drew in
  pretraining but rarely named, for the methods that leave the UNet frozen (textual inversion, DreamArtist, CLIP
  inversion).
- `dark`: 16 filled circles, squares and triangles on the dark background (a style the base model saw but rarely
  heard named), captioned without it, for aesthetic gradient.

All are deterministic: `python -m sdpipe.tinyworld.datasets` rewrites them byte for byte.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sdpipe.io import atomic_path
from sdpipe.progress import log
from sdpipe.tinyworld import world

TRIGGER = "sks"
CLASS_WORD = "shape"
SIZES = tuple(world.SIZES)  # ("small", "large")


def subject_scenes(shape: str = "star", count: int = 12, seed: int = 1) -> list[world.Scene]:
    """Filled `shape`s; colors cycle through all four and every color comes in both sizes."""
    rng = np.random.default_rng(seed)
    colors = tuple(world.COLORS)
    scenes = []
    for i in range(count):
        color = colors[i % len(colors)]
        size = SIZES[(i + i // len(colors)) % len(SIZES)]
        scenes.append(world.sample_scene(rng, (shape,), (color,), ("filled",), (size,)))
    return scenes


def style_scenes(style: str = "outlined", background: str = "light", count: int = 16, seed: int = 2) -> list[world.Scene]:
    """Circles, squares and triangles in `style` on `background`; shapes, colors and sizes cycle, so all are
    balanced."""
    rng = np.random.default_rng(seed)
    shapes = ("circle", "square", "triangle")
    colors = tuple(world.COLORS)
    scenes = []
    for i in range(count):
        shape, color, size = shapes[i % len(shapes)], colors[i % len(colors)], SIZES[(i // 4) % len(SIZES)]
        scenes.append(world.sample_scene(rng, (shape,), (color,), (style,), (size,), (background,)))
    return scenes


SUBJECT_CAPTIONS = {"trigger": TRIGGER, "class_word": CLASS_WORD}
# name -> (scenes, caption options for `world.caption`)
KINDS = {
    "star": (subject_scenes, SUBJECT_CAPTIONS),
    "star_val": (lambda: subject_scenes(count=8, seed=3), SUBJECT_CAPTIONS),
    "outlined": (style_scenes, {}),
    "cross": (lambda: subject_scenes("cross", seed=4), SUBJECT_CAPTIONS),
    "cross_val": (lambda: subject_scenes("cross", count=8, seed=5), SUBJECT_CAPTIONS),
    "dark": (lambda: style_scenes("filled", "dark", seed=6), {}),
}


def write_dataset(
    folder: str | Path,
    scenes_or_kind: str | Sequence[world.Scene],
    *,
    prefix: str | None = None,
    **caption_options,
) -> list[Path]:
    """Writes `<prefix>_NN.png` images with `<prefix>_NN.txt` captions into `folder`, replacing it.

    `scenes_or_kind` is a list of scenes, or the name of a default dataset (`star`, `outlined`), whose
    caption options `caption_options` may override. Captions come from `world.caption(scene, **options)`.
    Returns the image paths.
    """
    if isinstance(scenes_or_kind, str):
        if scenes_or_kind not in KINDS:
            raise ValueError(f"unknown dataset kind {scenes_or_kind!r}; expected one of {sorted(KINDS)}")
        make_scenes, kind_options = KINDS[scenes_or_kind]
        scenes = make_scenes()
        caption_options = {**kind_options, **caption_options}
        prefix = prefix or scenes_or_kind
    else:
        scenes = list(scenes_or_kind)
        prefix = prefix or Path(folder).name
    folder = Path(folder)
    names = [f"{prefix}_{i:02d}" for i in range(len(scenes))]
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        for name, scene in zip(names, scenes):
            world.render(scene).save(tmp / f"{name}.png")
            (tmp / f"{name}.txt").write_text(world.caption(scene, **caption_options) + "\n", encoding="utf-8")
    return [folder / f"{name}.png" for name in names]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="(Re)generate the default tiny-world datasets.")
    parser.add_argument("--root", default="datasets", help="folder that receives one folder per dataset")
    parser.add_argument("kinds", nargs="*", help=f"datasets to write, some of {sorted(KINDS)} (default: all)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.kinds) - set(KINDS))
    if unknown:
        parser.error(f"unknown datasets {unknown}; expected some of {sorted(KINDS)}")
    for kind in args.kinds or sorted(KINDS):
        images = write_dataset(Path(args.root) / kind, kind)
        log(f"wrote {len(images)} images to {Path(args.root) / kind}")


if __name__ == "__main__":
    main()
