"""The `prepare` stage: check, orient, convert and resize a dataset's images, and list them in a manifest.

`prepare_dataset` reads a dataset folder (images in any subfolder, `<stem>.txt` caption sidecars, an optional
HuggingFace-imagefolder style `metadata.jsonl`) and writes, atomically, a prepared folder:

- `images/<id>.png`: each usable image, EXIF orientation applied, converted to sRGB RGB (transparency
  composited onto white), cropped and resized to a `resolution` square or to its aspect-ratio bucket;
- `manifest.jsonl`: one row per prepared image, sorted by id (the `caption` and `encode` stages read it), with
  the source image's size and where the crop began (SDXL's size and crop conditioning);
- `report.json`: counts, the skipped files with the reason, and the warnings (unusable captions or metadata).

Files that cannot be used are skipped and reported, never fatal, unless `prepare.strict` is on. Exact duplicates
(same bytes, or same decoded pixels) are dropped, keeping the first by path. Hidden files and folders (names
starting with a dot, such as `.DS_Store`) are ignored, and so are symbolic links to folders. A symbolic link to a
file outside the dataset folder is refused and reported, never read (it could expose any file as a caption).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError
from rich.markup import escape

from sdpipe.config.prepare import BucketParams, PrepareParams
from sdpipe.errors import SdpipeError
from sdpipe.io import atomic_path, write_json, write_jsonl
from sdpipe.progress import log, track

METADATA_FILE = "metadata.jsonl"

# Pillow reads 16-bit grayscale PNGs in one of these modes, with values from 0 to 65535.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class SkippedFile(Exception):
    """A source file that cannot be prepared; the message is the reason written to the report."""


def prepare_dataset(dataset_dir: Path, out_dir: Path, resolution: int, params: PrepareParams) -> dict:
    """Prepares every usable image of `dataset_dir` into `out_dir` and returns the report (also `report.json`).

    Raises `SdpipeError` when the folder is missing, has no usable image, or (with `params.strict`) has any
    skipped file or warning; `out_dir` is then left as it was.
    """
    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    if not dataset_dir.is_dir():
        raise SdpipeError(
            f"{dataset_dir}: no such dataset folder (named in base.datasets); expected a folder of images"
        )
    target_sizes = bucket_sizes(resolution, params.buckets) if params.buckets.enabled else [(resolution, resolution)]

    files, links_out = split_links_outside(dataset_dir, list_dataset_files(dataset_dir))
    image_files, caption_files, skipped = sort_dataset_files(files, params.extensions)
    refused = "symbolic link to a file outside the dataset folder; refused"
    skipped += [{"source": file, "reason": refused} for file in links_out]
    captions, warnings = read_captions(dataset_dir, image_files, caption_files)

    with atomic_path(out_dir) as tmp:
        (tmp / "images").mkdir(parents=True)
        rows, image_skips, image_warnings = write_images(dataset_dir, image_files, tmp, target_sizes, params)
        skipped = sorted(skipped + image_skips, key=lambda item: item["source"])
        warnings = sorted(warnings + image_warnings, key=lambda item: item["source"])
        for row in rows:
            row["caption"], row["caption_source"] = captions.get(row["source"], (None, None))
        report = make_report(dataset_dir, resolution, rows, skipped, warnings)

        if params.strict and (skipped or warnings):
            problems = "\n".join(f"  {item['source']}: {item['reason']}" for item in skipped + warnings)
            raise SdpipeError(
                f"{dataset_dir}: prepare.strict is true and these files cannot be used as they are:\n{problems}\n"
                "Fix or remove them, or set prepare.strict: false to skip them."
            )
        if not rows:
            reasons = "".join(f"\n  {item['source']}: {item['reason']}" for item in skipped[:10])
            raise SdpipeError(
                f"{dataset_dir}: no usable images (expected {', '.join(params.extensions)} files){reasons}"
            )
        write_jsonl(tmp / "manifest.jsonl", sorted(rows, key=lambda row: row["id"]))
        write_json(tmp / "report.json", report)

    for item in skipped:
        log(f"[yellow]skipped[/] {escape(item['source'])}: {escape(item['reason'])}")
    for item in warnings:
        log(f"[yellow]warning[/] {escape(item['source'])}: {escape(item['reason'])}")
    counts = report["counts"]
    log(f"{out_dir}: {counts['prepared']} images prepared, {counts['skipped']} skipped "
        f"({counts['duplicates']} duplicates), {len(warnings)} warnings")
    return report


def make_report(dataset_dir: Path, resolution: int, rows: list[dict], skipped: list, warnings: list) -> dict:
    sizes: dict[str, int] = {}
    for row in rows:
        key = f"{row['width']}x{row['height']}"
        sizes[key] = sizes.get(key, 0) + 1
    duplicates = sum(item["reason"].startswith("duplicate of ") for item in skipped)
    return {
        "dataset": dataset_dir.name,
        "resolution": resolution,
        "counts": {
            "found": len(rows) + len(skipped),
            "prepared": len(rows),
            "skipped": len(skipped),
            "duplicates": duplicates,
        },
        "sizes": dict(sorted(sizes.items())),
        "skipped": skipped,
        "warnings": warnings,
    }


# --- finding the files ---------------------------------------------------------------------------------


def list_dataset_files(dataset_dir: Path) -> list[str]:
    """Every file under `dataset_dir` as a sorted POSIX relative path, hidden files and folders left out."""
    found = []
    for folder, subfolders, files in os.walk(dataset_dir):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        relative_folder = Path(folder).relative_to(dataset_dir)
        found += [(relative_folder / name).as_posix() for name in files if not name.startswith(".")]
    return sorted(found)


def split_links_outside(dataset_dir: Path, files: list[str]) -> tuple[list[str], list[str]]:
    """Splits files into those inside `dataset_dir` and symbolic links that lead out of it."""
    root = dataset_dir.resolve()
    inside, outside = [], []
    for file in files:
        (inside if (dataset_dir / file).resolve().is_relative_to(root) else outside).append(file)
    return inside, outside


def sort_dataset_files(files: list[str], extensions: tuple[str, ...]) -> tuple[list[str], list[str], list[dict]]:
    """Splits files into images, `.txt` captions and skipped ones; `.jsonl` files are metadata, not listed."""
    images, captions, skipped = [], [], []
    for file in files:
        suffix = PurePosixPath(file).suffix.lower()
        if suffix in extensions:
            images.append(file)
        elif suffix == ".txt":
            captions.append(file)
        elif suffix != ".jsonl":
            skipped.append({"source": file, "reason": "unsupported extension"})
    return images, captions, skipped


# --- captions ------------------------------------------------------------------------------------------


def read_captions(dataset_dir: Path, images: list[str], caption_files: list[str]) -> tuple[dict, list[dict]]:
    """Maps each image's relative path to `(caption, caption_source)`: its `.txt` sidecar, else its metadata row.

    Also returns warnings for unreadable sidecars, sidecars without an image, and unusable metadata rows.
    """
    sidecars, warnings = read_sidecars(dataset_dir, caption_files)
    metadata, metadata_warnings = read_metadata(dataset_dir / METADATA_FILE, set(images))
    image_stems = {strip_suffix(image) for image in images}
    for stem, file in sidecars.items():
        if stem not in image_stems:
            warnings.append({"source": file[0], "reason": "caption file without an image of the same name"})

    captions = {}
    for image in images:
        _, sidecar_caption = sidecars.get(strip_suffix(image), (None, None))
        if sidecar_caption:
            captions[image] = (sidecar_caption, "txt")
        elif metadata.get(image):
            captions[image] = (metadata[image], "metadata")
    return captions, warnings + metadata_warnings


def read_sidecars(dataset_dir: Path, caption_files: list[str]) -> tuple[dict, list[dict]]:
    """Maps `<folder>/<stem>` to `(caption file, caption or None)`. A file that is not UTF-8 is a warning."""
    sidecars, warnings = {}, []
    for file in caption_files:
        stem = strip_suffix(file)
        if stem in sidecars:
            continue
        try:
            text = (dataset_dir / file).read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError:
            warnings.append({"source": file, "reason": "caption is not UTF-8 text; the image has no caption"})
            text = ""
        except OSError as error:
            warnings.append({"source": file, "reason": f"caption cannot be read ({error.strerror})"})
            text = ""
        sidecars[stem] = (file, clean_caption(text))
    return sidecars, warnings


def read_metadata(metadata_path: Path, images: set[str]) -> tuple[dict[str, str], list[dict]]:
    """Reads `metadata.jsonl` rows `{"file_name": ..., "text": ...}` into `{image: caption}`.

    A `file_name` is only looked up among the dataset's own images: one that points outside the dataset folder
    (`..`, absolute paths) is refused and reported, never opened.
    """
    if not metadata_path.is_file() or not metadata_path.resolve().is_relative_to(metadata_path.parent.resolve()):
        return {}, []  # a link out of the dataset folder is never read (it is reported with the skipped files)
    source = metadata_path.name
    try:
        lines = metadata_path.read_bytes().decode("utf-8-sig").splitlines()
    except UnicodeDecodeError:
        return {}, [{"source": source, "reason": "not UTF-8 text; its captions are not used"}]

    captions: dict[str, str] = {}
    warnings = []
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            problem = f"not valid JSON ({error.msg})"
        else:
            problem = metadata_row_problem(row, images)
        if problem is None:
            image = dataset_relative(row["file_name"])
            text = clean_caption(row.get("text") or "")
            if image in captions:
                problem = f"a second row for {image}; the first one is used"
            elif text:
                captions[image] = text
        if problem is not None:
            warnings.append({"source": source, "reason": f"line {line_number}: {problem}"})
    return captions, warnings


def metadata_row_problem(row: object, images: set[str]) -> str | None:
    """What is wrong with one parsed metadata row, or None."""
    if not isinstance(row, dict):
        return "not a JSON object"
    file_name = row.get("file_name")
    if not isinstance(file_name, str) or not file_name.strip():
        return "no `file_name`"
    image = dataset_relative(file_name)
    if image is None:
        return f"file_name `{file_name}` points outside the dataset folder; refused"
    if image not in images:
        return f"file_name `{file_name}` is not an image of this dataset"
    if not isinstance(row.get("text"), (str, type(None))):
        return f"`text` of {image} is not a string"
    return None


def dataset_relative(file_name: str) -> str | None:
    """`file_name` as a normalized POSIX path inside the dataset folder, or None if it could leave the folder."""
    if "\x00" in file_name or PureWindowsPath(file_name).drive or PureWindowsPath(file_name).root:
        return None
    parts = [part for part in file_name.replace("\\", "/").split("/") if part not in ("", ".")]
    if not parts or ".." in parts or file_name.startswith(("/", "\\")):
        return None
    return "/".join(parts)


def clean_caption(text: str) -> str | None:
    """The caption with runs of whitespace (newlines included) made single spaces; None when empty."""
    return " ".join(text.split()) or None


def strip_suffix(path: str) -> str:
    return str(PurePosixPath(path).with_suffix(""))


# --- images --------------------------------------------------------------------------------------------


def write_images(
    dataset_dir: Path, image_files: list[str], out_dir: Path, target_sizes: list[tuple[int, int]], params: PrepareParams
) -> tuple[list[dict], list[dict], list[dict]]:
    """Prepares each image into `out_dir/images/`; returns manifest rows (no captions yet), skips and warnings."""
    formats = allowed_formats(params.extensions)
    rows, skipped, warnings = [], [], []
    first_with_bytes: dict[str, str] = {}
    first_with_pixels: dict[str, str] = {}
    taken_ids: set[str] = set()
    for source in track(image_files, f"prepare {dataset_dir.name}"):
        try:
            data = (dataset_dir / source).read_bytes()
            sha256 = hashlib.sha256(data).hexdigest()
            if sha256 in first_with_bytes:
                raise SkippedFile(f"duplicate of {first_with_bytes[sha256]}")
            image, warning = read_rgb_image(data, formats, params.min_size)
            pixels_hash = hashlib.sha256(f"{image.size}".encode() + image.tobytes()).hexdigest()
            if pixels_hash in first_with_pixels:
                raise SkippedFile(f"duplicate of {first_with_pixels[pixels_hash]}")
        except SkippedFile as skip:
            skipped.append({"source": source, "reason": str(skip)})
            continue
        except OSError as error:
            skipped.append({"source": source, "reason": f"cannot be read ({error.strerror})"})
            continue
        first_with_bytes[sha256] = first_with_pixels[pixels_hash] = source
        if warning:
            warnings.append({"source": source, "reason": warning})

        size = closest_size(image.size, target_sizes)
        original = image.size
        crop_left, crop_top = crop_corner(original, size) if params.crop == "center" else (0, 0)
        if params.crop == "center":
            image = ImageOps.fit(image, size, method=Image.Resampling.LANCZOS)
        else:
            image = image.resize(size, resample=Image.Resampling.LANCZOS)
        image_id = unique_id(source, taken_ids)
        file = f"images/{image_id}.png"
        image.save(out_dir / file, format="PNG")
        rows.append(
            {
                "id": image_id,
                "file": file,
                "source": source,
                "sha256": sha256,
                "width": size[0],
                "height": size[1],
                "original_width": original[0],
                "original_height": original[1],
                "crop_left": crop_left,
                "crop_top": crop_top,
            }
        )
    return rows, skipped, warnings


def allowed_formats(extensions: tuple[str, ...]) -> list[str]:
    """The Pillow formats the extensions name. Only these are decoded, whatever a file's extension says (a PNG
    saved as `.jpg` is fine), so that no other Pillow plugin ever parses dataset files."""
    registered = Image.registered_extensions()
    return sorted({registered[extension] for extension in extensions if extension in registered})


def read_rgb_image(data: bytes, formats: list[str], min_size: int) -> tuple[Image.Image, str | None]:
    """Decodes an image fully, applies its EXIF orientation and converts it to RGB; raises `SkippedFile`.

    Returns the image and a warning, or None.
    """
    if not data:
        raise SkippedFile("empty file")
    try:
        image = Image.open(io.BytesIO(data), formats=formats)
        image.load()  # decode now, so that truncated files fail here
        image = ImageOps.exif_transpose(image)
    except Image.DecompressionBombError as error:
        raise SkippedFile(f"too large ({error})") from None
    except UnidentifiedImageError:
        raise SkippedFile("not an image") from None
    except (OSError, SyntaxError, ValueError, EOFError):
        raise SkippedFile("corrupt or truncated image") from None
    width, height = image.size
    if min(width, height) < min_size:
        raise SkippedFile(f"too small ({width}x{height} < min_size {min_size})")
    try:
        return to_rgb(image)
    except ValueError:
        raise SkippedFile(f"unsupported color mode {image.mode}") from None


def to_rgb(image: Image.Image) -> tuple[Image.Image, str | None]:
    """Any Pillow image as 8-bit sRGB RGB, transparency composited onto white; returns it and a warning or None."""
    if image.mode in SIXTEEN_BIT_MODES:
        image = sixteen_to_eight_bit(image)
    elif image.mode in ("1", "F"):
        image = image.convert("L")
    if image.mode in ("P", "PA", "LA", "La", "RGBa") or "transparency" in image.info:
        image = image.convert("RGBA")
    elif image.mode not in ("L", "RGB", "RGBA", "CMYK"):
        image = image.convert("RGB")

    warning = None
    icc_profile = image.info.get("icc_profile")
    if icc_profile:
        try:
            image = to_srgb(image, icc_profile)
        except (ImageCms.PyCMSError, OSError, ValueError):
            warning = "its ICC color profile cannot be applied; colors are used as stored"
    if image.mode == "RGBA":
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image)
    image = image.convert("RGB")
    image.info = {}  # nothing of the source (ICC profile, EXIF) goes into the prepared PNG
    return image, warning


def sixteen_to_eight_bit(image: Image.Image) -> Image.Image:
    """A 16-bit grayscale image as 8-bit `L`, scaled (Pillow's own conversion clips at 255 instead)."""
    values = np.asarray(image).astype(np.int64).clip(0, 65535)
    return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), mode="L")


def to_srgb(image: Image.Image, icc_profile: bytes) -> Image.Image:
    """Converts pixels from the image's embedded color profile to sRGB (phone photos are often Display P3)."""
    source_profile = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile))
    output_mode = "RGBA" if image.mode == "RGBA" else "RGB"
    return ImageCms.profileToProfile(image, source_profile, ImageCms.createProfile("sRGB"), outputMode=output_mode)


def unique_id(source: str, taken: set[str]) -> str:
    """A filesystem-safe id from the source's relative path (`sub/My Cat.png` → `sub__My_Cat`), made unique
    against `taken` (compared ignoring case) with the extension, then a counter (`a`, `a-png`, `a-png-2`)."""
    path = PurePosixPath(source)
    base = safe_name("__".join(path.with_suffix("").parts))
    extension = safe_name(path.suffix.lower().lstrip("."))
    candidates = [base, f"{base}-{extension}"]
    candidates += (f"{base}-{extension}-{number}" for number in range(2, len(taken) + 3))
    for candidate in candidates:
        if candidate.casefold() not in taken:
            taken.add(candidate.casefold())
            return candidate
    raise AssertionError("unreachable: there are more candidates than taken ids")


def safe_name(text: str) -> str:
    """Letters, digits, `.`, `_` and `-` only, no leading or trailing dot, dash or underscore, at most 100
    characters. A name with no letter or digit left (`日本`) becomes `image-<hash of the name>`."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:100].strip("._-")
    if not re.search(r"[A-Za-z0-9]", name):
        return "image-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]
    return name


# --- target sizes --------------------------------------------------------------------------------------


def bucket_sizes(resolution: int, buckets: BucketParams) -> list[tuple[int, int]]:
    """Kohya-style aspect-ratio buckets: `(width, height)` pairs, sides multiples of `step` within
    [min_side, max_side], area at most `resolution`², each side as long as the area allows; plus the square."""
    step = buckets.step
    min_side = buckets.min_side or max(step, resolution // 2 // step * step)
    max_side = buckets.max_side or max(step, resolution * 2 // step * step)
    if min_side > max_side:
        raise SdpipeError(
            f"prepare.buckets: min_side ({min_side}) is larger than max_side ({max_side}) at base.resolution "
            f"{resolution} (a side left out defaults to half or twice the resolution); set both"
        )
    max_area = resolution * resolution
    sizes = set()
    square = resolution // step * step
    if min_side <= square <= max_side:
        sizes.add((square, square))
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, max_area // width // step * step)
        if height >= min_side:
            sizes.update({(width, height), (height, width)})
    if not sizes:
        raise SdpipeError(
            f"prepare.buckets: no bucket has sides in [{min_side}, {max_side}] and an area of at most "
            f"base.resolution² = {resolution}²; lower prepare.buckets.min_side"
        )
    return sorted(sizes)


def crop_corner(original: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
    """Where a center crop of `original` to `size` begins, (left, top), in pixels of the image scaled to cover
    `size`: SDXL's `crops_coords_top_left` (as its training scripts compute it, transposed to (left, top))."""
    scale = max(size[0] / original[0], size[1] / original[1])
    return round((original[0] * scale - size[0]) / 2), round((original[1] * scale - size[1]) / 2)


def closest_size(size: tuple[int, int], target_sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The target size whose aspect ratio is closest to `size`'s (compared as logarithms, so 2:1 and 1:2 are
    equally far from 1:1); on a tie the larger one."""
    aspect = math.log(size[0] / size[1])

    def distance(target: tuple[int, int]) -> tuple:
        return abs(math.log(target[0] / target[1]) - aspect), -target[0] * target[1], target

    return min(target_sizes, key=distance)
