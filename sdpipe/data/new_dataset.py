"""`sdpipe datasets add`: start a dataset folder `datasets/<name>/` the way `prepare` reads it.

It creates the folder, copies the images (checked to open as images) and their sidecar `.txt` captions (and a
`metadata.jsonl`) from a source folder when given one, and writes a `.dataset.yaml` notes template. The
template is a hidden file because `prepare` leaves hidden files out; a visible README.md would be reported as
an unsupported file (and fail `prepare.strict: true`).

Versioning: in this project the `datasets/` folder as a whole is a dependency of the `prepare` stage in
`dvc.yaml`, and its files are committed to git. `dvc add datasets/<name>` would split that one dependency
between two trackers (git for the other datasets, a `.dvc` file and the DVC cache for this one), and it fails
for files git already tracks. So by default nothing is run: the next steps are printed (add the name to
`base.datasets`, `git add` the folder). `--dvc` runs `dvc add` only in a project that tracks its datasets with
`.dvc` files (`datasets.dvc`, or `datasets/<other>.dvc`), and refuses otherwise.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from sdpipe.config.prepare import PrepareParams
from sdpipe.errors import SdpipeError
from sdpipe.io import atomic_path

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
NOTES_FILE = ".dataset.yaml"
METADATA_FILE = "metadata.jsonl"


def add_dataset(
    name: str,
    root: str | Path = "datasets",
    source: str | Path | None = None,
    token: str | None = None,
    class_word: str | None = None,
) -> dict:
    """Creates `<root>/<name>/` (copying `source`'s images and captions) and returns what was done:
    `{"folder", "images", "captions", "ignored"}` (`ignored`: source files that are neither).

    Raises `SdpipeError` for a bad name, an existing non-empty folder, or a source file with an image
    extension that does not open as an image; nothing is written then.
    """
    if not NAME.match(name):
        raise SdpipeError(
            f"dataset name {name!r}: use letters, digits, '_', '-' and '.', starting with a letter or digit"
        )
    folder = Path(root) / name
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise SdpipeError(f"{folder} already exists and is not empty; choose another name or remove it")
    images, captions, ignored = [], [], []
    if source is not None:
        images, captions, ignored = source_files(Path(source))
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        for file in images + captions:
            shutil.copy2(Path(source) / file, tmp / file.name)
        (tmp / NOTES_FILE).write_text(notes_template(name, source, token, class_word, len(images)), encoding="utf-8")
    return {
        "folder": str(folder),
        "images": len(images),
        "captions": len(captions),
        "ignored": [str(f) for f in ignored],
    }


def source_files(source: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """The images, captions (`.txt` sidecars of those images, `metadata.jsonl`) and other files directly in `source`."""
    if not source.is_dir():
        raise SdpipeError(f"--from {source}: no such folder")
    extensions = PrepareParams().extensions
    files = sorted(
        path.relative_to(source) for path in source.iterdir() if path.is_file() and not path.name.startswith(".")
    )
    images = [file for file in files if file.suffix.lower() in extensions]
    broken = [f"{file} ({problem})" for file in images if (problem := image_problem(source / file))]
    if broken:
        raise SdpipeError(f"--from {source}: {len(broken)} file(s) are not readable images: {', '.join(broken[:5])}")
    if not images:
        raise SdpipeError(f"--from {source}: no images ({', '.join(extensions)})")
    stems = {file.stem for file in images}
    captions = [file for file in files if (file.suffix == ".txt" and file.stem in stems) or file.name == METADATA_FILE]
    ignored = [file for file in files if file not in images and file not in captions]
    return images, captions, ignored


def image_problem(path: Path) -> str | None:
    try:
        with Image.open(path) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        return str(error) or type(error).__name__
    return None


def notes_template(name: str, source, token: str | None, class_word: str | None, images: int) -> str:
    """The `.dataset.yaml` notes (values JSON-quoted, which YAML reads as they are)."""

    def value(text) -> str:
        return json.dumps(str(text)) if text else "null"

    return (
        f"# Notes on the dataset {name} (sdpipe reads none of this; prepare skips hidden files).\n"
        f"name: {value(name)}\n"
        f"source: {value(source)}  # where the images came from\n"
        "license: null\n"
        f"images: {images}\n"
        f"token: {value(token)}  # the trigger word in captions (params.yaml caption.token)\n"
        f"class_word: {value(class_word)}  # what the subject is (caption.class_word, DreamBooth's class)\n"
        "description: >-\n"
        "  What the images show, how they were chosen and captioned.\n"
    )


def dvc_add_target(root: Path, name: str) -> Path | None:
    """What to `dvc add` for the dataset `name` when the project tracks datasets with `.dvc` files, else None:
    `root` itself (re-added) when `<root>.dvc` exists, the dataset folder when `<root>/*.dvc` files exist."""
    if root.with_name(root.name + ".dvc").is_file():
        return root
    if any(root.glob("*.dvc")):
        return root / name
    return None


def dvc_add_command(name: str, root: str | Path = "datasets") -> list[str]:
    """The `dvc add` command for the dataset, when the project tracks datasets with `.dvc` files; else `SdpipeError`."""
    root = Path(root)
    target = dvc_add_target(root, name)
    if target is None:
        raise SdpipeError(
            f"--dvc: {root}/ is not tracked with .dvc files here (it is a dependency of the prepare stage in "
            f"dvc.yaml and its files are in git), so `dvc add {root / name}` would conflict; "
            f"use `git add {root / name}`"
        )
    return ["dvc", "add", str(target)]


def run_command(command: list[str]) -> None:
    try:
        subprocess.run(command, check=True)
    except (OSError, subprocess.CalledProcessError) as error:
        raise SdpipeError(f"`{' '.join(command)}` failed ({error})") from None


def next_steps(
    name: str,
    root: str | Path = "datasets",
    params_file: str | Path = "params.yaml",
    token: str | None = None,
    class_word: str | None = None,
    images: int = 0,
) -> list[str]:
    """What to do after `add_dataset`, as lines to print (the params file is read, never changed)."""
    folder = Path(root) / name
    listed = listed_datasets(Path(params_file))
    steps = []
    if not images:
        steps.append(f"put images (png/jpg/webp) and optional <stem>.txt captions in {folder}/")
    if name not in listed:
        steps.append(f"add it to {params_file}: base.datasets: [{', '.join([*listed, name])}]")
    steps.append(f"to train a method on it alone: train.<method>.datasets: [{name}] in {params_file}")
    if token or class_word:
        steps.append(
            "images without a caption get caption.template (`a {token} {class_word}`): set "
            f"caption.token: {token or '…'} and caption.class_word: {class_word or '…'} in {params_file}"
        )
    steps.append(f"git add {folder}   ({root}/ is committed to git and is the prepare stage's dependency)")
    steps.append("dvc repro   (prepare, caption and encode pick the new dataset up)")
    return steps


def listed_datasets(params_file: Path) -> list[str]:
    """`base.datasets` of a params file, or [] when it cannot be read."""
    import yaml

    try:
        params = yaml.safe_load(params_file.read_text(encoding="utf-8")) or {}
        datasets = params.get("base", {}).get("datasets", [])
    except (OSError, yaml.YAMLError, AttributeError):
        return []
    return [str(name) for name in datasets] if isinstance(datasets, list) else []
