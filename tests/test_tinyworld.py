"""The tiny world: generator determinism and held-out sets, the oracle's accuracy, the default datasets."""

import dataclasses
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from sdpipe.tinyworld import datasets, oracle, world

EVERYTHING = {"shapes": world.SHAPES, "styles": world.STYLES, "backgrounds": tuple(world.BACKGROUNDS)}
REPO = Path(__file__).resolve().parents[1]
COLOR_WORDS = "|".join(world.COLORS)


def perturb(image: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """What a small diffusion model might add: mild blur, a per-channel color shift and pixel noise."""
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(0.7))).astype(np.float64)
    pixels = pixels + rng.integers(-10, 11, size=3) + rng.normal(0.0, 6.0, size=pixels.shape)
    return np.clip(pixels.round(), 0, 255).astype(np.uint8)


def accuracy(images, scenes) -> dict[str, float]:
    return oracle.score(images, [oracle.scene_attributes(scene) for scene in scenes])


@pytest.fixture(scope="module")
def fresh_items():
    """2,000 freshly generated images of every shape and style, from several seeds."""
    return [item for seed in (11, 12, 13, 14) for item in world.generate(500, seed=seed, **EVERYTHING)]


# --- generator --------------------------------------------------------------------------------------


def test_same_seed_gives_identical_images_and_another_seed_does_not():
    first = world.generate(16, seed=3, **EVERYTHING)
    again = world.generate(16, seed=3, **EVERYTHING)
    other = world.generate(16, seed=4, **EVERYTHING)
    assert [s for _, s in first] == [s for _, s in again]
    assert [i.tobytes() for i, _ in first] == [i.tobytes() for i, _ in again]
    assert [i.tobytes() for i, _ in first] != [i.tobytes() for i, _ in other]


def test_default_generation_holds_out_star_and_outlined():
    assert set(world.HELD_OUT_SHAPES) == {"star"} and set(world.HELD_OUT_STYLES) == {"outlined"}
    default = [scene for _, scene in world.generate(400, seed=0)]
    assert {s.shape for s in default} == set(world.PRETRAIN_SHAPES) == {"circle", "square", "triangle"}
    assert {s.style for s in default} == {"filled"} and {s.background for s in default} == {"light"}
    everything = [scene for _, scene in world.generate(400, seed=0, **EVERYTHING)]
    assert {s.shape for s in everything} == set(world.SHAPES)
    assert {s.style for s in everything} == set(world.STYLES)
    assert {s.background for s in everything} == {"light", "dark"}


def test_the_cross_is_a_plus_with_arms_a_third_wide_and_never_named():
    cross = world.Scene("red", "cross", "filled", "large", extent=24, cx=16.0, cy=16.0)
    pixels = np.asarray(world.render(cross)).astype(int)
    inked = (np.abs(pixels - world.BACKGROUND).sum(-1) > 150)
    assert inked[16, 4:28].all() and inked[4:28, 16].all()  # both arms span the extent
    assert not inked[6, 6] and not inked[25, 25]  # the corners between the arms are empty
    assert inked[4:28, 16].sum() == inked[16, 4:28].sum() and 7 <= inked[4, :].sum() <= 9  # arm width ~ extent / 3
    assert world.caption(cross) == "a large red shape"
    assert world.caption(dataclasses.replace(cross, shape="circle"), generic=True) == "a large red shape"
    dark = dataclasses.replace(cross, shape="square", background="dark")
    assert world.caption(dark, with_background=True) == "a large red square on a dark background"
    assert world.caption(dark) == "a large red square"


def test_caption_format():
    scene = world.Scene("red", "circle", "outlined", "small", extent=12, cx=6.0, cy=6.0)
    assert world.caption(scene) == "a small red circle"
    assert world.caption(scene, with_style=True) == "a small red outlined circle"
    assert world.caption(scene, with_size=False, with_position=True) == "a red circle at the top left"
    star = dataclasses.replace(scene, color="blue", shape="star", style="filled", size="large")
    assert world.caption(star, with_style=True, trigger="sks", class_word="shape") == "a large blue sks shape"
    pattern = re.compile(rf"^a (small|large) ({COLOR_WORDS}) (circle|square|triangle)$")
    assert all(pattern.match(world.caption(s)) for _, s in world.generate(50, seed=1))


# --- oracle -----------------------------------------------------------------------------------------


def test_oracle_reads_fresh_images(fresh_items):
    images, scenes = zip(*fresh_items)
    result = accuracy(images, scenes)
    for attribute in oracle.ATTRIBUTES:
        assert result[attribute] >= 0.99, result
    assert result["all"] >= 0.99, result
    assert result["found"] == 1.0


def test_oracle_is_robust_to_blur_color_jitter_and_noise(fresh_items):
    rng = np.random.default_rng(0)
    images = [perturb(image, rng) for image, _ in fresh_items[:600]]
    result = accuracy(images, [scene for _, scene in fresh_items[:600]])
    assert min(result[attribute] for attribute in oracle.ATTRIBUTES) >= 0.95, result
    assert result["all"] >= 0.95, result


@pytest.mark.parametrize(
    "name",
    ["background", "white", "black", "uniform noise", "background noise"],
)
def test_images_without_a_shape_are_not_found(name):
    rng = np.random.default_rng(1)
    background = np.array(world.BACKGROUND, dtype=np.float64)
    pixels = {
        "background": np.broadcast_to(background, (32, 32, 3)),
        "white": np.full((32, 32, 3), 255.0),
        "black": np.zeros((32, 32, 3)),
        "uniform noise": rng.integers(0, 256, size=(32, 32, 3)),
        "background noise": background + rng.normal(0.0, 15.0, size=(32, 32, 3)),
    }[name]
    reading = oracle.read(np.clip(pixels, 0, 255).astype(np.uint8))
    assert reading == oracle.NOT_FOUND
    assert reading.shape is None and reading.color is None and reading.confidence == 0.0


def test_a_gray_shape_has_no_named_color():
    pixels = np.full((32, 32, 3), world.BACKGROUND, dtype=np.uint8)
    pixels[8:20, 10:22] = 90
    reading = oracle.read(pixels)
    assert reading.found and reading.shape == "square" and reading.color is None


def test_read_takes_pil_images_arrays_and_batches():
    items = world.generate(6, seed=5, **EVERYTHING)
    readings = oracle.read_batch(np.stack([np.asarray(image) for image, _ in items]))
    assert readings == [oracle.read(image) for image, _ in items]
    for reading, (_, scene) in zip(readings, items):
        assert reading.found and 0.0 < reading.confidence <= 1.0
        assert reading.to_dict()["shape"] == scene.shape
    with pytest.raises(ValueError, match="HxWx3"):
        oracle.read(np.zeros((32, 32), dtype=np.uint8))


def test_score_on_a_mix_scores_only_the_given_attributes():
    circle = world.Scene("red", "circle", "filled", "large", extent=21, cx=16.0, cy=16.0)
    star = world.Scene("blue", "star", "outlined", "small", extent=13, cx=8.0, cy=24.0)
    blank = Image.new("RGB", (32, 32), world.BACKGROUND)
    images = [world.render(circle), world.render(star), blank]
    expected = [
        {"shape": "circle", "color": "red", "position": "middle center"},
        {"shape": "star", "style": "filled", "size": "small"},  # wrong style: it is outlined
        {"shape": None},
    ]
    result = oracle.score(images, expected)
    assert result == pytest.approx(
        {"shape": 1.0, "color": 1.0, "position": 1.0, "style": 0.0, "size": 1.0, "all": 2 / 3, "found": 2 / 3}
    )
    with pytest.raises(ValueError, match="2 images but 3"):
        oracle.score(images[:2], expected)
    with pytest.raises(ValueError, match="unknown attributes"):
        oracle.score(images[:1], [{"hue": "red"}])


# --- default datasets -------------------------------------------------------------------------------


def read_folder(folder: Path) -> dict[str, tuple[bytes, str]]:
    """`{image name: (png bytes, caption)}`; fails if the folder holds anything but images and captions."""
    assert {path.suffix for path in folder.iterdir()} == {".png", ".txt"}
    return {
        png.name: (png.read_bytes(), png.with_suffix(".txt").read_text(encoding="utf-8").strip())
        for png in sorted(folder.glob("*.png"))
    }


def test_committed_datasets_are_what_main_generates(tmp_path):
    datasets.main(["--root", str(tmp_path)])
    for kind in datasets.KINDS:
        assert read_folder(tmp_path / kind) == read_folder(REPO / "datasets" / kind), kind


def test_star_dataset_holds_balanced_filled_stars_with_trigger_captions():
    files = read_folder(REPO / "datasets" / "star")
    assert list(files) == [f"star_{i:02d}.png" for i in range(12)]
    pattern = re.compile(rf"^a (small|large) ({COLOR_WORDS}) sks shape$")
    captions = [pattern.match(caption) for _, caption in files.values()]
    assert all(captions)
    assert Counter(m[2] for m in captions) == {color: 3 for color in world.COLORS}
    assert Counter(m[1] for m in captions) == {"small": 6, "large": 6}
    for name, (_, caption) in files.items():
        reading = oracle.read(Image.open(REPO / "datasets" / "star" / name))
        assert (reading.shape, reading.style, reading.color) == ("star", "filled", caption.split()[2])


@pytest.mark.parametrize("kind, shape, count", [("cross", "cross", 12), ("cross_val", "cross", 8)])
def test_cross_datasets_hold_balanced_filled_crosses_with_trigger_captions(kind, shape, count):
    files = read_folder(REPO / "datasets" / kind)
    assert len(files) == count
    pattern = re.compile(rf"^a (small|large) ({COLOR_WORDS}) sks shape$")
    for name, (_, caption) in files.items():
        assert pattern.match(caption), caption
        reading = oracle.read(Image.open(REPO / "datasets" / kind / name))
        assert (reading.shape, reading.style, reading.color, reading.background) == (
            shape, "filled", caption.split()[2], "light")
    other = read_folder(REPO / "datasets" / ("cross_val" if kind == "cross" else "cross"))
    assert not {png for png, _ in files.values()} & {png for png, _ in other.values()}  # held out: no shared image


@pytest.mark.parametrize("kind, style, background", [("outlined", "outlined", "light"), ("dark", "filled", "dark")])
def test_style_datasets_hold_their_style_captioned_without_its_words(kind, style, background):
    folder = REPO / "datasets" / kind
    files = read_folder(folder)
    assert len(files) == 16
    pattern = re.compile(rf"^a (small|large) ({COLOR_WORDS}) (circle|square|triangle)$")
    for name, (_, caption) in files.items():
        match = pattern.match(caption)
        assert match, caption
        reading = oracle.read(Image.open(folder / name))
        assert (reading.size, reading.color, reading.shape) == match.groups()
        assert (reading.style, reading.background) == (style, background)
    assert Counter(caption.split()[2] for _, caption in files.values()) == {color: 4 for color in world.COLORS}


def test_write_dataset_from_scenes_replaces_the_folder(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "stale.png").write_bytes(b"old")
    scenes = [scene for _, scene in world.generate(3, seed=2)]
    paths = datasets.write_dataset(folder, scenes, trigger="zwx", class_word="thing")
    assert [p.name for p in paths] == ["mine_00.png", "mine_01.png", "mine_02.png"]
    files = read_folder(folder)
    assert list(files) == [p.name for p in paths]
    assert [caption for _, caption in files.values()] == [
        f"a {s.size} {s.color} zwx thing" for s in scenes
    ]
    with pytest.raises(ValueError, match="unknown dataset kind"):
        datasets.write_dataset(tmp_path / "other", "stars")
    assert not (tmp_path / "other").exists()
