"""Bad datasets, one fault per case: broken images, captions in wrong encodings, metadata pointing outside the
dataset folder, malformed metadata, duplicate names. Without `prepare.strict` each is skipped or warned about in
the report; with it the stage fails naming the file; never is a partial output left (see also test_prepare.py).
Also the caption stage's and the trainer's reading of bad manifests and caption files."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdpipe.config.caption import CaptionParams
from sdpipe.config.prepare import PrepareParams
from sdpipe.data.captions import caption_dataset, load_captions
from sdpipe.data.prepare import prepare_dataset
from sdpipe.errors import SdpipeError
from sdpipe.io import read_jsonl

SECRET = "root:x:0:0:SECRET-MARKER"


def noise(seed: int, size: int = 40) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")


def encoded(image: Image.Image, format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def flipped_byte(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


def lossless_webp(path: Path) -> bytes:
    """The same pixels as the image at `path`, in other bytes."""
    with Image.open(path) as image:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="WEBP", lossless=True)
    return buffer.getvalue()


def write_metadata(folder: Path, *lines: str) -> None:
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


# Each fault writes its files into a dataset folder that already holds a good `good.png`; `outside` is a folder
# beside the dataset holding `secret.txt` and `private.png`.
Fault = Callable[[Path, Path], None]

# (id, fault, where it is reported, its source, its reason)
FAULTS: list[tuple[str, Fault, str, str, str]] = [
    # broken images
    ("truncated-png", lambda d, o: (d / "x.png").write_bytes(encoded(noise(1), "PNG")[:600]),
     "skipped", "x.png", "corrupt or truncated image"),
    ("bad-crc-png", lambda d, o: (d / "x.png").write_bytes(flipped_byte(encoded(noise(1), "PNG"), 100)),
     "skipped", "x.png", "corrupt or truncated image"),
    ("truncated-jpeg", lambda d, o: (d / "x.jpg").write_bytes(encoded(noise(1), "JPEG")[:300]),
     "skipped", "x.jpg", "corrupt or truncated image"),
    ("truncated-webp", lambda d, o: (d / "x.webp").write_bytes(encoded(noise(1), "WEBP")[:60]),
     "skipped", "x.webp", "corrupt or truncated image"),
    ("png-signature-only", lambda d, o: (d / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n"),
     "skipped", "x.png", "not an image"),
    ("empty-image", lambda d, o: (d / "x.png").write_bytes(b""), "skipped", "x.png", "empty file"),
    # not images, whatever the extension says
    ("executable-as-png", lambda d, o: (d / "x.png").write_bytes(b"MZ\x90\x00" + bytes(range(256)) * 4),
     "skipped", "x.png", "not an image"),
    ("text-as-jpg", lambda d, o: (d / "x.jpg").write_text("<html>not a photo</html>"), "skipped", "x.jpg", "not an image"),
    ("tiff-as-png", lambda d, o: (d / "x.png").write_bytes(encoded(noise(1), "TIFF")),  # no TIFF decoder is allowed
     "skipped", "x.png", "not an image"),
    # captions in wrong encodings
    ("latin-1-caption", lambda d, o: (d / "good.txt").write_bytes("un caf\xe9".encode("latin-1")),
     "warnings", "good.txt", "caption is not UTF-8 text; the image has no caption"),
    ("utf-16-caption", lambda d, o: (d / "good.txt").write_bytes("a red star".encode("utf-16")),
     "warnings", "good.txt", "caption is not UTF-8 text; the image has no caption"),
    ("invalid-bytes-caption", lambda d, o: (d / "good.txt").write_bytes(b"a \xff\xfe\x80 star"),
     "warnings", "good.txt", "caption is not UTF-8 text; the image has no caption"),
    ("latin-1-metadata", lambda d, o: (d / "metadata.jsonl").write_bytes(b'{"file_name": "good.png", "text": "caf\xe9"}\n'),
     "warnings", "metadata.jsonl", "not UTF-8 text; its captions are not used"),
    # metadata entries pointing outside the dataset folder
    ("metadata-dotdot", lambda d, o: write_metadata(d, '{"file_name": "../../etc/passwd", "text": "x"}'),
     "warnings", "metadata.jsonl", "line 1: file_name `../../etc/passwd` points outside the dataset folder; refused"),
    ("metadata-absolute", lambda d, o: write_metadata(d, json.dumps({"file_name": str(o / "private.png")})),
     "warnings", "metadata.jsonl", "points outside the dataset folder; refused"),
    ("metadata-windows-drive", lambda d, o: write_metadata(d, json.dumps({"file_name": "C:\\Windows\\win.ini"})),
     "warnings", "metadata.jsonl", "points outside the dataset folder; refused"),
    ("metadata-nul-byte", lambda d, o: write_metadata(d, json.dumps({"file_name": "good.png\x00.txt"})),
     "warnings", "metadata.jsonl", "points outside the dataset folder; refused"),
    ("metadata-through-folder-link", lambda d, o: (os.symlink(o, d / "linked"),
     write_metadata(d, '{"file_name": "linked/private.png", "text": "x"}')),
     "warnings", "metadata.jsonl", "line 1: file_name `linked/private.png` is not an image of this dataset"),
    # symbolic links escaping the folder
    ("image-link-outside", lambda d, o: os.symlink(o / "private.png", d / "x.png"),
     "skipped", "x.png", "symbolic link to a file outside the dataset folder; refused"),
    ("caption-link-outside", lambda d, o: os.symlink(o / "secret.txt", d / "good.txt"),
     "skipped", "good.txt", "symbolic link to a file outside the dataset folder; refused"),
    ("metadata-link-outside", lambda d, o: os.symlink(o / "metadata.jsonl", d / "metadata.jsonl"),
     "skipped", "metadata.jsonl", "symbolic link to a file outside the dataset folder; refused"),
    ("dangling-link", lambda d, o: os.symlink(d / "nowhere.png", d / "x.png"),
     "skipped", "x.png", "cannot be read (No such file or directory)"),
    # malformed metadata lines
    ("metadata-not-json", lambda d, o: write_metadata(d, "{file_name: good.png}"),
     "warnings", "metadata.jsonl", "line 1: not valid JSON"),
    ("metadata-array", lambda d, o: write_metadata(d, '["good.png", "a caption"]'),
     "warnings", "metadata.jsonl", "line 1: not a JSON object"),
    ("metadata-no-file-name", lambda d, o: write_metadata(d, '{"text": "a caption"}'),
     "warnings", "metadata.jsonl", "line 1: no `file_name`"),
    ("metadata-number-file-name", lambda d, o: write_metadata(d, '{"file_name": 7, "text": "a caption"}'),
     "warnings", "metadata.jsonl", "line 1: no `file_name`"),
    ("metadata-text-not-string", lambda d, o: write_metadata(d, '{"file_name": "good.png", "text": ["a", "b"]}'),
     "warnings", "metadata.jsonl", "line 1: `text` of good.png is not a string"),
    ("metadata-missing-image", lambda d, o: write_metadata(d, '{"file_name": "gone.png", "text": "x"}'),
     "warnings", "metadata.jsonl", "line 1: file_name `gone.png` is not an image of this dataset"),
    # duplicates
    ("metadata-two-rows", lambda d, o: write_metadata(
        d, '{"file_name": "good.png", "text": "first"}', '{"file_name": "./good.png", "text": "second"}'),
     "warnings", "metadata.jsonl", "line 2: a second row for good.png; the first one is used"),
    ("same-bytes", lambda d, o: (d / "zz.png").write_bytes((d / "good.png").read_bytes()),
     "skipped", "zz.png", "duplicate of good.png"),
    ("same-pixels-other-format", lambda d, o: (d / "zz.webp").write_bytes(lossless_webp(d / "good.png")),
     "skipped", "zz.webp", "duplicate of good.png"),
    ("link-to-an-image-inside", lambda d, o: os.symlink(d / "good.png", d / "zz.png"),
     "skipped", "zz.png", "duplicate of good.png"),
    ("caption-without-image", lambda d, o: (d / "orphan.txt").write_text("a lonely caption"),
     "warnings", "orphan.txt", "caption file without an image of the same name"),
]


@pytest.fixture
def outside(tmp_path) -> Path:
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret.txt").write_text(SECRET, encoding="utf-8")
    noise(99).save(folder / "private.png")
    write_metadata(folder, json.dumps({"file_name": "good.png", "text": SECRET}))
    return folder


def dataset_with(fault: Fault, root: Path, outside: Path) -> Path:
    folder = root / "datasets" / "faulty"
    folder.mkdir(parents=True)
    noise(0).save(folder / "good.png")
    fault(folder, outside)
    return folder


def names(problems: list, source: str, reason: str) -> bool:
    """Whether a problem (a report item, or a `  <source>: <reason>` line of an error message) is this one."""
    lines = [f"{item['source']}: {item['reason']}" if isinstance(item, dict) else item.strip() for item in problems]
    return any(line.startswith(f"{source}: ") and reason in line for line in lines)


def output_files(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.parametrize(
    "fault, kind, source, reason", [case[1:] for case in FAULTS], ids=[case[0] for case in FAULTS]
)
def test_fault_is_reported_without_strict(tmp_path, outside, fault, kind, source, reason):
    dataset = dataset_with(fault, tmp_path, outside)
    out = tmp_path / "prepared" / "faulty"
    report = prepare_dataset(dataset, out, resolution=32, params=PrepareParams())

    assert names(report[kind], source, reason), report
    assert json.loads((out / "report.json").read_text()) == report
    manifest = read_jsonl(out / "manifest.jsonl")
    assert [row["source"] for row in manifest] == ["good.png"]  # the good image is still prepared
    # nothing from outside the dataset folder reaches the output, and the outside files are unchanged
    assert all(SECRET.encode() not in data for data in output_files(out).values())
    assert (outside / "secret.txt").read_text() == SECRET


@pytest.mark.parametrize(
    "fault, kind, source, reason", [case[1:] for case in FAULTS], ids=[case[0] for case in FAULTS]
)
def test_fault_fails_strict_mode_and_leaves_the_output_as_it_was(tmp_path, outside, fault, kind, source, reason):
    dataset = dataset_with(fault, tmp_path, outside)
    out = tmp_path / "prepared" / "faulty"
    out.mkdir(parents=True)
    (out / "manifest.jsonl").write_text('{"id": "from-an-earlier-run"}\n')
    before = output_files(tmp_path / "prepared")

    with pytest.raises(SdpipeError, match=r"prepare\.strict is true") as caught:
        prepare_dataset(dataset, out, resolution=32, params=PrepareParams(strict=True))
    assert names(str(caught.value).splitlines(), source, reason), caught.value
    assert str(dataset) in str(caught.value)
    assert output_files(tmp_path / "prepared") == before  # no partial output
    assert os.listdir(tmp_path / "prepared") == ["faulty"]  # and no temporary folder left behind
    assert SECRET not in str(caught.value)


def test_a_new_output_is_not_created_on_failure(tmp_path, outside):
    dataset = dataset_with(lambda d, o: (d / "x.png").write_bytes(b""), tmp_path, outside)
    with pytest.raises(SdpipeError, match="x.png: empty file"):
        prepare_dataset(dataset, tmp_path / "prepared" / "faulty", resolution=32, params=PrepareParams(strict=True))
    assert list((tmp_path / "prepared").iterdir()) == []


def test_duplicate_names_with_other_extensions_are_both_kept(tmp_path, outside):
    # `a.jpg` and `a.png` are different images: both are prepared under unique ids and share `a.txt`
    def fault(folder: Path, _: Path) -> None:
        noise(1).save(folder / "a.png")
        noise(2).save(folder / "a.jpg", quality=95)
        (folder / "a.txt").write_text("a shared caption", encoding="utf-8")

    dataset = dataset_with(fault, tmp_path, outside)
    report = prepare_dataset(dataset, tmp_path / "out", resolution=32, params=PrepareParams(strict=True))
    rows = {row["source"]: row for row in read_jsonl(tmp_path / "out" / "manifest.jsonl")}
    assert {source: row["id"] for source, row in rows.items()} == {"a.jpg": "a", "a.png": "a-png", "good.png": "good"}
    assert rows["a.jpg"]["caption"] == rows["a.png"]["caption"] == "a shared caption"
    assert report["skipped"] == [] and report["warnings"] == []


def test_every_fault_at_once(tmp_path, outside):
    """All the faults in one dataset: the report lists each, and only the good images are prepared."""
    dataset = tmp_path / "datasets" / "all"
    dataset.mkdir(parents=True)
    noise(0).save(dataset / "good.png")
    expected = []
    for name, fault, kind, source, reason in FAULTS:
        if source in ("good.txt", "metadata.jsonl") or "good.png" in reason:
            continue  # faults of the dataset's root files, or of its good image
        (dataset / name).mkdir()
        fault(dataset / name, outside)
        expected.append(f"{kind} {name}/{source}: {reason}")
    report = prepare_dataset(dataset, tmp_path / "out", resolution=32, params=PrepareParams())
    found = [f"{kind} {item['source']}: {item['reason']}" for kind in ("skipped", "warnings") for item in report[kind]]
    assert len(found) == len(expected)
    assert all(any(problem.startswith(item) for problem in found) for item in expected), (expected, found)
    assert [row["source"] for row in read_jsonl(tmp_path / "out" / "manifest.jsonl")] == ["good.png"]


# --- reading the stage outputs back: the caption stage reads the manifest, training reads the captions --------

BAD_ROWS = [
    ("not-json", b'{"id": "a", \n', "line 1: not valid JSON"),
    ("latin-1", '{"id": "caf\xe9"}\n'.encode("latin-1"), "not UTF-8 text"),
    ("utf-16", '{"id": "a"}\n'.encode("utf-16"), "not UTF-8 text"),
    ("array-row", b"[1, 2]\n", "line 1: expected a JSON object, got list"),
    ("string-row", b'"a caption"\n', "line 1: expected a JSON object, got str"),
    ("second-row-missing-keys", b'{"id": "a", "file": "images/a.png", "source": "a.png", "caption": null, '
     b'"caption_source": null}\n\n{"id": "b"}\n', "line 3: missing"),
    ("caption-not-string", b'{"id": "a", "file": "images/a.png", "source": "a.png", "caption": 5, '
     b'"caption_source": "txt"}\n', "line 1: `caption` is not a string"),
]


@pytest.mark.parametrize("data, message", [case[1:] for case in BAD_ROWS], ids=[case[0] for case in BAD_ROWS])
def test_bad_manifest_fails_the_caption_stage_cleanly(tmp_path, data, message):
    manifest = tmp_path / "prepared" / "toy" / "manifest.jsonl"
    manifest.parent.mkdir(parents=True)
    manifest.write_bytes(data)
    out = tmp_path / "captions" / "toy.jsonl"
    with pytest.raises(SdpipeError, match="re-run `prepare`") as caught:
        caption_dataset(manifest, out, CaptionParams(), device="cpu")
    assert str(manifest) in str(caught.value) and message in str(caught.value)
    assert not out.exists()


@pytest.mark.parametrize("data, message", [case[1:] for case in BAD_ROWS], ids=[case[0] for case in BAD_ROWS])
def test_bad_captions_file_fails_training_data_loading_cleanly(tmp_path, data, message):
    path = tmp_path / "captions.jsonl"
    path.write_bytes(data.replace(b'"source": "a.png", ', b""))  # caption files have no `source`
    with pytest.raises(SdpipeError, match="run the `caption` stage again") as caught:
        load_captions(path)
    assert str(path) in str(caught.value) and message in str(caught.value)
