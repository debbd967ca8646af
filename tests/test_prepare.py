"""The `prepare` stage: a dataset folder of good, bad and odd files in, prepared images + manifest + report out."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from sdpipe.config import parse_params
from sdpipe.config.prepare import BucketParams, PrepareParams
from sdpipe.data.prepare import bucket_sizes, closest_size, dataset_relative, prepare_dataset, to_rgb, unique_id
from sdpipe.errors import SdpipeError
from sdpipe.io import read_jsonl

REPO = Path(__file__).resolve().parents[1]
RED, BLUE = (220, 20, 20), (20, 20, 220)


def pattern(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth, non-symmetric RGB image (so crops and rotations show)."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y + seed * 40) % 256], -1)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def marked_landscape() -> Image.Image:
    """64x32, blue, with the top half of the left half red: where the red lands shows the rotation."""
    image = Image.new("RGB", (64, 32), BLUE)
    image.paste(RED, (0, 0, 32, 16))
    return image


def make_dataset(folder: Path) -> Path:
    folder.mkdir(parents=True)
    pattern(48, 40).save(folder / "good.png")
    (folder / "good.txt").write_text("a good\npicture \n", encoding="utf-8")
    (folder / "zz_copy.png").write_bytes((folder / "good.png").read_bytes())
    pattern(48, 40).save(folder / "zz_same_pixels.png", compress_level=1)  # other bytes, same pixels

    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB")
    truncated = folder / "truncated.png"
    noisy.save(truncated)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.jpg").write_text("not a picture at all\n", encoding="utf-8")
    Image.new("RGB", (1, 1), RED).save(folder / "tiny.png")
    (folder / "README.md").write_text("# my dataset\n", encoding="utf-8")
    (folder / ".DS_Store").write_bytes(b"\x00\x01")

    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    rgba.paste((200, 0, 0, 255), (16, 0, 32, 32))
    rgba.save(folder / "rgba.png")
    (folder / "rgba.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))  # not UTF-8

    Image.new("L", (40, 40), 90).save(folder / "gray.jpg", quality=95)
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(folder / "cmyk.JPG", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    marked_landscape().save(folder / "rotated.jpeg", quality=95, exif=exif)

    (folder / "sub").mkdir()
    pattern(40, 40, seed=1).save(folder / "sub" / "same.png")
    pattern(40, 40, seed=2).save(folder / "sub" / "same.webp", lossless=True)

    metadata = [
        {"file_name": "gray.jpg", "text": "a  gray square"},
        {"file_name": "good.png", "text": "the sidecar wins over this"},
        {"file_name": "../../etc/passwd", "text": "sneaky"},
        {"file_name": "/etc/passwd", "text": "sneaky"},
        {"file_name": "missing.png", "text": "no such file"},
    ]
    lines = [json.dumps(row) for row in metadata] + ["{not json"]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("datasets") / "mixed")


@pytest.fixture(scope="module")
def prepared(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "mixed"
    report = prepare_dataset(dataset, out, resolution=32, params=PrepareParams())
    rows = {row["source"]: row for row in read_jsonl(out / "manifest.jsonl")}
    return out, report, rows


def output_image(out: Path, row: dict) -> Image.Image:
    with Image.open(out / row["file"]) as image:
        image.load()
        return image


def close(pixel, expected, tolerance=40) -> bool:
    return all(abs(int(a) - int(b)) <= tolerance for a, b in zip(pixel, expected))


def test_good_images_are_prepared_as_rgb_squares(prepared):
    out, report, rows = prepared
    assert sorted(rows) == [
        "cmyk.JPG", "good.png", "gray.jpg", "rgba.png", "rotated.jpeg", "sub/same.png", "sub/same.webp"
    ]
    for row in rows.values():
        image = output_image(out, row)
        assert (image.format, image.mode, image.size) == ("PNG", "RGB", (32, 32))
        assert (row["width"], row["height"]) == (32, 32)
        assert "icc_profile" not in image.info and "exif" not in image.info
    assert report["counts"] == {"found": 14, "prepared": 7, "skipped": 7, "duplicates": 2}
    assert report["sizes"] == {"32x32": 7}
    written = sorted(path.name for path in (out / "images").iterdir())
    assert written == sorted(f"{row['id']}.png" for row in rows.values())


def test_bad_files_are_reported_with_their_reason(prepared):
    _, report, _ = prepared
    reasons = {item["source"]: item["reason"] for item in report["skipped"]}
    assert reasons == {
        "README.md": "unsupported extension",
        "empty.png": "empty file",
        "notes.jpg": "not an image",
        "tiny.png": "too small (1x1 < min_size 8)",
        "truncated.png": "corrupt or truncated image",
        "zz_copy.png": "duplicate of good.png",
        "zz_same_pixels.png": "duplicate of good.png",
    }


def test_alpha_is_composited_onto_white(prepared):
    out, _, rows = prepared
    image = output_image(out, rows["rgba.png"])
    assert image.getpixel((4, 16)) == (255, 255, 255)
    assert close(image.getpixel((28, 16)), (200, 0, 0), tolerance=2)


def test_grayscale_and_cmyk_become_rgb(prepared):
    out, _, rows = prepared
    assert close(output_image(out, rows["gray.jpg"]).getpixel((16, 16)), (90, 90, 90), tolerance=3)
    assert close(output_image(out, rows["cmyk.JPG"]).getpixel((16, 16)), (255, 0, 0))


def test_exif_orientation_is_applied(prepared):
    # Stored 64x32 with red in the top-left; rotated 90° clockwise it is 32x64 with red in the top-right,
    # and the center crop keeps its lower half at the top of the output.
    out, _, rows = prepared
    image = output_image(out, rows["rotated.jpeg"])
    assert close(image.getpixel((26, 5)), RED)
    assert close(image.getpixel((5, 5)), BLUE)
    assert close(image.getpixel((26, 26)), BLUE)


def test_captions_and_their_sources(prepared):
    _, report, rows = prepared
    assert (rows["good.png"]["caption"], rows["good.png"]["caption_source"]) == ("a good picture", "txt")
    assert (rows["gray.jpg"]["caption"], rows["gray.jpg"]["caption_source"]) == ("a gray square", "metadata")
    assert (rows["rgba.png"]["caption"], rows["rgba.png"]["caption_source"]) == (None, None)
    warnings = [f"{item['source']}: {item['reason']}" for item in report["warnings"]]
    assert "rgba.txt: caption is not UTF-8 text; the image has no caption" in warnings
    assert "metadata.jsonl: line 3: file_name `../../etc/passwd` points outside the dataset folder; refused" in warnings
    assert "metadata.jsonl: line 4: file_name `/etc/passwd` points outside the dataset folder; refused" in warnings
    assert "metadata.jsonl: line 5: file_name `missing.png` is not an image of this dataset" in warnings
    assert any(warning.startswith("metadata.jsonl: line 6: not valid JSON") for warning in warnings)


def test_manifest_rows(prepared, dataset):
    out, _, rows = prepared
    manifest = read_jsonl(out / "manifest.jsonl")
    assert [row["id"] for row in manifest] == sorted(row["id"] for row in manifest)
    keys = {"id", "file", "source", "sha256", "width", "height", "caption", "caption_source"}
    keys |= {"original_width", "original_height", "crop_left", "crop_top"}
    for row in manifest:
        assert set(row) == keys
        assert row["file"] == f"images/{row['id']}.png"
        assert row["sha256"] == hashlib.sha256((dataset / row["source"]).read_bytes()).hexdigest()
    assert rows["good.png"]["id"] == "good"
    assert rows["sub/same.png"]["id"] == "sub__same"  # the first by path keeps the plain id
    assert rows["sub/same.webp"]["id"] == "sub__same-webp"


def test_two_runs_give_identical_bytes(dataset, tmp_path, prepared):
    first, _, _ = prepared
    second = tmp_path / "again"
    prepare_dataset(dataset, second, resolution=32, params=PrepareParams())
    first_files = sorted(path.relative_to(first) for path in first.rglob("*") if path.is_file())
    second_files = sorted(path.relative_to(second) for path in second.rglob("*") if path.is_file())
    assert first_files == second_files
    for relative in first_files:
        assert (first / relative).read_bytes() == (second / relative).read_bytes(), relative


def test_strict_mode_fails_and_leaves_the_output_as_it_was(dataset, tmp_path):
    out = tmp_path / "prepared"
    with pytest.raises(SdpipeError, match=r"prepare\.strict") as error:
        prepare_dataset(dataset, out, resolution=32, params=PrepareParams(strict=True))
    assert "truncated.png: corrupt or truncated image" in str(error.value)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left behind either

    out.mkdir()
    (out / "old.txt").write_text("previous run", encoding="utf-8")
    with pytest.raises(SdpipeError):
        prepare_dataset(dataset, out, resolution=32, params=PrepareParams(strict=True))
    assert [path.name for path in out.iterdir()] == ["old.txt"]


def test_strict_mode_passes_a_clean_dataset(tmp_path):
    folder = tmp_path / "clean"
    folder.mkdir()
    pattern(40, 40).save(folder / "one.png")
    report = prepare_dataset(folder, tmp_path / "out", resolution=32, params=PrepareParams(strict=True))
    assert report["counts"]["prepared"] == 1 and report["skipped"] == [] and report["warnings"] == []


def test_buckets_fit_a_two_to_one_image(tmp_path):
    folder = tmp_path / "wide"
    folder.mkdir()
    pattern(128, 64).save(folder / "wide.png")
    pattern(40, 40).save(folder / "square.png")
    params = PrepareParams(buckets=BucketParams(enabled=True))
    report = prepare_dataset(folder, tmp_path / "out", resolution=32, params=params)
    rows = {row["source"]: row for row in read_jsonl(tmp_path / "out" / "manifest.jsonl")}
    assert (rows["wide.png"]["width"], rows["wide.png"]["height"]) == (40, 24)
    assert (rows["square.png"]["width"], rows["square.png"]["height"]) == (32, 32)
    # SDXL's size and crop conditioning: 128x64 scaled by 0.375 to 48x24 covers 40x24; the crop starts 4 px in
    wide = rows["wide.png"]
    assert (wide["original_width"], wide["original_height"], wide["crop_left"], wide["crop_top"]) == (128, 64, 4, 0)
    square = rows["square.png"]
    assert (square["original_width"], square["original_height"], square["crop_left"], square["crop_top"]) == (40, 40, 0, 0)
    with Image.open(tmp_path / "out" / rows["wide.png"]["file"]) as image:
        assert image.size == (40, 24)
    assert report["sizes"] == {"32x32": 1, "40x24": 1}


def test_bucket_sizes_follow_kohya():
    sizes = bucket_sizes(512, BucketParams(step=64, min_side=256, max_side=1024))
    assert (512, 512) in sizes and (256, 1024) in sizes and (1024, 256) in sizes and (384, 640) in sizes
    assert all(width * height <= 512 * 512 and width % 64 == 0 and height % 64 == 0 for width, height in sizes)
    assert closest_size((2000, 1000), sizes) == (704, 320)
    assert closest_size((1000, 2000), sizes) == (320, 704)
    assert closest_size((900, 900), sizes) == (512, 512)
    with pytest.raises(SdpipeError, match="min_side"):
        bucket_sizes(32, BucketParams(min_side=48, max_side=64))


def test_crop_none_squashes_the_whole_image(tmp_path):
    folder = tmp_path / "squash"
    folder.mkdir()
    marked_landscape().save(folder / "landscape.png")
    prepare_dataset(folder, tmp_path / "out", resolution=32, params=PrepareParams(crop="none"))
    with Image.open(tmp_path / "out" / "images" / "landscape.png") as image:
        # Red was the top-left quarter of the 64x32 image; squashed, it is still the top-left quarter.
        assert close(image.getpixel((4, 4)), RED, 2) and close(image.getpixel((20, 4)), BLUE, 2)


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    folder = tmp_path / "deep"
    folder.mkdir()
    Image.fromarray(np.full((16, 16), 32768, dtype=np.uint16)).save(folder / "deep.png")
    prepare_dataset(folder, tmp_path / "out", resolution=16, params=PrepareParams())
    with Image.open(tmp_path / "out" / "images" / "deep.png") as image:
        assert image.getpixel((8, 8)) == (128, 128, 128)


def palette_with_transparency() -> Image.Image:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 0, 0, 255])
    image.putpixel((3, 3), 1)
    image.info["transparency"] = 0
    return image


@pytest.mark.parametrize(
    "make_image, corner, opposite",
    [
        (palette_with_transparency, (255, 255, 255), (0, 0, 255)),
        (lambda: Image.new("LA", (4, 4), (50, 0)), (255, 255, 255), (255, 255, 255)),
        (lambda: Image.new("LA", (4, 4), (50, 255)), (50, 50, 50), (50, 50, 50)),
        (lambda: Image.new("1", (4, 4), 1), (255, 255, 255), (255, 255, 255)),
        (lambda: Image.new("I;16", (4, 4), 65535), (255, 255, 255), (255, 255, 255)),
        (lambda: Image.new("I", (4, 4), 257 * 100), (100, 100, 100), (100, 100, 100)),
        (lambda: Image.new("CMYK", (4, 4), (0, 0, 0, 255)), (0, 0, 0), (0, 0, 0)),
        (lambda: Image.new("RGBa", (4, 4), (0, 0, 0, 0)), (255, 255, 255), (255, 255, 255)),
    ],
)
def test_every_color_mode_becomes_rgb(make_image, corner, opposite):
    image, warning = to_rgb(make_image())
    assert image.mode == "RGB" and warning is None
    assert (image.getpixel((0, 0)), image.getpixel((3, 3))) == (corner, opposite)


def test_color_profiles(tmp_path):
    folder = tmp_path / "icc"
    folder.mkdir()
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.new("RGB", (16, 16), (200, 100, 50)).save(folder / "srgb.png", icc_profile=srgb)
    Image.new("RGB", (16, 16), (50, 100, 200)).save(folder / "broken.png", icc_profile=b"not a profile")
    report = prepare_dataset(folder, tmp_path / "out", resolution=16, params=PrepareParams())
    with Image.open(tmp_path / "out" / "images" / "srgb.png") as image:
        assert close(image.getpixel((8, 8)), (200, 100, 50), tolerance=1)
    assert report["counts"]["prepared"] == 2
    assert [item["source"] for item in report["warnings"]] == ["broken.png"]
    with Image.open(tmp_path / "out" / "images" / "broken.png") as image:
        assert "icc_profile" not in image.info  # the broken profile is not copied into the prepared image


def test_too_large_images_are_skipped(tmp_path, monkeypatch):
    folder = tmp_path / "big"
    folder.mkdir()
    pattern(64, 64).save(folder / "big.png")
    pattern(16, 16).save(folder / "small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 is more than twice this: a "bomb"
    report = prepare_dataset(folder, tmp_path / "out", resolution=16, params=PrepareParams())
    assert [item["source"] for item in report["skipped"]] == ["big.png"]
    assert report["skipped"][0]["reason"].startswith("too large")


def test_missing_or_unusable_dataset_folder(tmp_path):
    with pytest.raises(SdpipeError, match="nowhere"):
        prepare_dataset(tmp_path / "nowhere", tmp_path / "out", resolution=32, params=PrepareParams())
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"")
    (folder / "notes.txt").write_text("hello", encoding="utf-8")
    with pytest.raises(SdpipeError, match=r"junk: no usable images"):
        prepare_dataset(folder, tmp_path / "out", resolution=32, params=PrepareParams())
    assert not (tmp_path / "out").exists()


def test_ids_are_safe_and_unique():
    taken: set[str] = set()
    assert unique_id("a.jpg", taken) == "a"
    assert unique_id("a.png", taken) == "a-png"
    assert unique_id("A.PNG", taken) == "A-png-2"  # case-insensitive file systems
    assert unique_id("sub/My Cat (1).png", taken) == "sub__My_Cat_1"
    assert unique_id("-rf.png", taken) == "rf"
    assert unique_id("日本.png", taken).startswith("image-")
    assert unique_id("日本.png", set()) == unique_id("日本.png", set()) != unique_id("中国.png", set())


def test_metadata_paths_outside_the_dataset_are_refused():
    assert dataset_relative("sub/./a.png") == "sub/a.png"
    for escaping in ("../a.png", "/etc/passwd", "sub/../../a.png", "C:\\Windows\\a.png", "\\\\server\\a.png", ""):
        assert dataset_relative(escaping) is None, escaping


def test_params_are_validated():
    def problems(prepare: dict) -> str:
        with pytest.raises(ValueError) as error:
            parse_params({"prepare": prepare})
        return str(error.value)

    assert "min_side (64) must not be larger" in problems({"buckets": {"min_side": 64, "max_side": 32}})
    assert "multiple of prepare.buckets.step" in problems({"buckets": {"min_side": 12}})
    assert "step" in problems({"buckets": {"step": 12}})
    assert "with its dot" in problems({"extensions": ["png"]})
    assert "reserved" in problems({"extensions": [".txt"]})
    assert "prepare.crop" in problems({"crop": "left"})
    assert parse_params({"prepare": {"extensions": [".PNG", ".png"]}}).prepare.extensions == (".png",)


def run_stage_script(project: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "stages" / "prepare.py")], cwd=project, capture_output=True, text=True, timeout=60
    )


def test_stage_script_exit_status(tmp_path):
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    dataset_dir = project / "data" / "x"
    dataset_dir.mkdir()
    pattern(40, 30).save(dataset_dir / "one.png")
    params = {"base": {"datasets": ["x"]}, "paths": {"datasets": "data", "prepared": "out/prepared"}}
    (project / "params.yaml").write_text(json.dumps(params), encoding="utf-8")
    result = run_stage_script(project)
    assert result.returncode == 0, result.stderr
    assert read_jsonl(project / "out" / "prepared" / "x" / "manifest.jsonl")[0]["source"] == "one.png"

    (dataset_dir / "broken.png").write_bytes(b"")
    params["prepare"] = {"strict": True}
    (project / "params.yaml").write_text(json.dumps(params), encoding="utf-8")
    result = run_stage_script(project)
    assert result.returncode == 1
    assert "broken.png: empty file" in result.stderr
    assert "Traceback" not in result.stderr


def test_crop_corner_is_where_the_center_crop_of_the_scaled_image_begins(tmp_path):
    from sdpipe.data.prepare import crop_corner

    assert crop_corner((64, 32), (32, 32)) == (16, 0)  # scaled by 1: 64x32, 16 px cut on each side
    assert crop_corner((100, 300), (32, 32)) == (0, 32)  # scaled to 32x96
    assert crop_corner((32, 32), (32, 32)) == (0, 0)
    folder = tmp_path / "tall"
    folder.mkdir()
    pattern(30, 90).save(folder / "tall.png")
    for crop, corner in [("center", (0, 32)), ("none", (0, 0))]:
        out = tmp_path / crop
        prepare_dataset(folder, out, resolution=32, params=PrepareParams(crop=crop))
        [row] = read_jsonl(out / "manifest.jsonl")
        assert (row["original_width"], row["original_height"]) == (30, 90)
        assert (row["crop_left"], row["crop_top"]) == corner
