"""Checkpoints of the full training state under `<out>/checkpoints/step-NNNNNN/`, and resuming from them.

A checkpoint is accelerate's `save_state` (trained models, optimizer, LR scheduler, RNG states) plus
`sdpipe_run.json`: the step, the per-step losses so far, and a fingerprint of everything that determines the
trained result (params, input files and sdpipe's own code). Only a checkpoint with the current fingerprint is
resumed; the others are stale (made with other params, data or code) and are deleted, as are all checkpoints when
`resume` is off.
A checkpoint is written into a hidden temporary folder and renamed when complete, so an interrupted save leaves
nothing that could be resumed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from sdpipe.io import write_json
from sdpipe.progress import log

RUN_FILE = "sdpipe_run.json"
CHECKPOINT_NAME = re.compile(r"^step-(\d+)$")
SDPIPE_PACKAGE = Path(__file__).resolve().parents[1]

# train.common fields that do not change what is trained, so changing them does not make checkpoints stale.
NOT_TRAINING_SETTINGS = {
    "checkpoint_every",
    "keep_checkpoints",
    "resume",
    "sample_every",
    "sample_prompts",
    "sample_steps",
    "sample_guidance_scale",
}


def run_fingerprint(method: str, method_params, params, input_files: list[Path]) -> str:
    """A hash of everything that determines the trained result of `method` (with its `method_params`) under
    `params` (base and train.common) on `input_files`, by this version of sdpipe."""
    record = {
        "code": code_fingerprint(),
        "method": method,
        "base": params.base.model_dump(mode="json"),
        "common": params.train.common.model_dump(mode="json", exclude=NOT_TRAINING_SETTINGS),
        "method_params": method_params.model_dump(mode="json"),
        "inputs": {str(path): file_sha256(path) for path in sorted(input_files)},
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def code_fingerprint(package: Path = SDPIPE_PACKAGE) -> str:
    """A hash of the Python files of the sdpipe `package`. DVC re-runs a train stage when its code changes; the
    stage must then not finish a run that other code began."""
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode("utf-8") + b"\0")
        digest.update(file_sha256(path).encode("ascii"))
    return digest.hexdigest()[:16]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_path(checkpoints_dir: Path, step: int) -> Path:
    return Path(checkpoints_dir) / f"step-{step:06d}"


def list_checkpoints(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (step, folder), oldest first."""
    if not Path(checkpoints_dir).is_dir():
        return []
    found = []
    for path in Path(checkpoints_dir).iterdir():
        match = CHECKPOINT_NAME.match(path.name)
        if match and path.is_dir() and (path / RUN_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def read_run_info(checkpoint: Path) -> dict | None:
    try:
        return json.loads((checkpoint / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def remove_stale_checkpoints(checkpoints_dir: Path, fingerprint: str | None) -> None:
    """Deletes checkpoints not made with `fingerprint` (all of them when it is None) and interrupted saves."""
    checkpoints_dir = Path(checkpoints_dir)
    for leftover in checkpoints_dir.glob(".step-*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)
    reason = "train.common.resume is off" if fingerprint is None else "made with other params or data"
    for _, path in list_checkpoints(checkpoints_dir):
        info = read_run_info(path)
        if fingerprint is None or info is None or info.get("fingerprint") != fingerprint:
            log(f"{path}: deleted, not resumable ({reason})")
            shutil.rmtree(path)


def latest_checkpoint(checkpoints_dir: Path, fingerprint: str) -> tuple[Path, dict] | None:
    """The latest checkpoint made with `fingerprint`, and its run info."""
    latest = None
    for _, path in list_checkpoints(checkpoints_dir):
        info = read_run_info(path)
        if info is not None and info.get("fingerprint") == fingerprint:
            latest = (path, info)
    return latest


HISTORY_DIR = "history"
"""Inside a checkpoint: copies of the run's outputs so far (DVCLive metrics, sample images). `dvc repro` deletes a
stage's outputs before it runs the stage again, so a resumed run restores them from here and ends with the same
files as an uninterrupted one."""


def save_checkpoint(
    accelerator, checkpoints_dir: Path, step: int, run_info: dict, keep: int, history: dict[str, Path] | None = None
) -> Path:
    """Saves the training state after `step` optimizer steps (call on every process); keeps the last `keep`.
    `history` ({name: folder}) are output folders copied into the checkpoint (`restore_history` puts them back)."""
    final = checkpoint_path(checkpoints_dir, step)
    tmp = final.parent / f".{final.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        for name, folder in (history or {}).items():
            if Path(folder).is_dir():
                shutil.copytree(folder, tmp / HISTORY_DIR / name)
        write_json(tmp / RUN_FILE, {**run_info, "step": step})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in list_checkpoints(checkpoints_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def restore_history(checkpoint: Path, history: dict[str, Path]) -> None:
    """Replaces each output folder of `history` ({name: folder}) with its copy in `checkpoint`, when it has one."""
    for name, folder in history.items():
        saved = Path(checkpoint) / HISTORY_DIR / name
        if saved.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(saved, folder)
