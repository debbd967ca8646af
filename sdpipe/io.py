"""Atomic writes (a failed or interrupted stage leaves no half-written output for DVC to cache), and a
`.safetensors` writer that streams one tensor at a time."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yields a temporary sibling path to write a file or folder into; on success it replaces `final`.

    On an exception the temporary path is removed and `final` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    tmp = tmp_dir / final.name
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to {tmp} for {final}")
        apply_umask(tmp)
        old = None
        if final.exists() or final.is_symlink():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def apply_umask(path: Path) -> None:
    """Gives `path` (and, for a folder, everything in it) the mode a plain `open`/`mkdir` gives under the process's
    umask: safetensors (0.8) and onnx write through temporary files of mode 0600, which outputs should not keep."""
    umask = os.umask(0)
    os.umask(umask)
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for item in paths:
        if not item.is_symlink():
            item.chmod((0o777 if item.is_dir() else 0o666) & ~umask)


def source_date_epoch(inputs: list[Path]) -> int:
    """The time, in seconds since the epoch, that reproducible outputs record where tools expect a date (kohya's
    `ss_training_started_at`, `modelspec.date`): never the wall clock of the run, so that the same inputs give the
    same bytes. `SOURCE_DATE_EPOCH` when set (the reproducible-builds convention); else the time of the newest git
    commit that touched `inputs` (a method's datasets: when its training data was last changed); else 0
    (1970-01-01), outside a git repository or for inputs git does not track."""
    fixed = os.environ.get("SOURCE_DATE_EPOCH")
    if fixed:
        return int(fixed)
    if not inputs:
        return 0
    command = ["git", "log", "-1", "--format=%ct", "--", *map(str, inputs)]
    try:
        found = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return 0
    return int(found) if found else 0


def write_json(path: str | Path, data: object) -> None:
    """Writes pretty, key-sorted JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Writes one JSON object per line atomically."""
    with atomic_path(path) as tmp:
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, sort_keys=True) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Writes `tensors` as a `.safetensors` file, one tensor at a time (no copy of the whole file in memory).

    The bytes are those of `safetensors.torch.save` with a key-sorted header, so that the same tensors give the
    same bytes (safetensors itself writes the header in hash-map order, which changes from one process to the
    next). Unlike safetensors, non-contiguous tensors and tensors that share memory are accepted: each is
    written as its own contiguous copy, one at a time.
    """
    for key, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{path}: {key!r} is a {type(tensor).__name__}, not a tensor")
    layout = {key: (tuple(tensor.shape), tensor.dtype) for key, tensor in tensors.items()}
    with SafetensorsWriter(Path(path), layout, metadata) as writer:
        for key in writer.order:
            writer.write(key, tensors[key])


# safetensors' dtype names, in the order in which safetensors lays out the tensor data (by dtype in this order,
# then by key): wider items first, which keeps every tensor aligned to its item size. The 8-bit float types
# are only there when this torch has them.
SAFETENSORS_DTYPE_ORDER = (
    ("uint64", "U64"),
    ("int64", "I64"),
    ("float64", "F64"),
    ("complex64", "C64"),
    ("float32", "F32"),
    ("uint32", "U32"),
    ("int32", "I32"),
    ("bfloat16", "BF16"),
    ("float16", "F16"),
    ("uint16", "U16"),
    ("int16", "I16"),
    ("float8_e5m2fnuz", "F8_E5M2FNUZ"),
    ("float8_e4m3fnuz", "F8_E4M3FNUZ"),
    ("float8_e8m0fnu", "F8_E8M0"),
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
    ("int8", "I8"),
    ("uint8", "U8"),
    ("bool", "BOOL"),
)
DTYPE_NAMES = {
    getattr(torch, attribute): name for attribute, name in SAFETENSORS_DTYPE_ORDER if hasattr(torch, attribute)
}
DTYPES_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}
DTYPE_RANKS = {dtype: rank for rank, dtype in enumerate(DTYPE_NAMES)}

Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]


class SafetensorsWriter:
    """Writes a `.safetensors` file one tensor at a time, so that a whole model is never in memory.

    The header (each key's dtype, shape and byte offsets) is given up front by `layout` and written first,
    key-sorted; then the caller writes the tensors in `order` (sorted keys). Each tensor goes to the place that
    `safetensors.torch.save` would give it (grouped by dtype, widest first, then by key), so the file has the
    same bytes as `save_safetensors` ever wrote. Use as a context manager; writing fewer tensors than the
    layout is an error.
    """

    def __init__(self, path: Path, layout: Layout, metadata: dict[str, str] | None = None):
        if sys.byteorder != "little":
            raise ValueError("writing .safetensors files needs a little-endian machine")
        for key, (shape, dtype) in layout.items():
            if dtype not in DTYPE_NAMES:
                raise ValueError(f"{path}: tensor {key!r} is {dtype}, which safetensors files do not hold")
        self.layout = layout
        self.order = sorted(layout)
        header: dict[str, object] = {}
        self.offsets: dict[str, int] = {}
        offset = 0
        for key in sorted(layout, key=lambda key: (DTYPE_RANKS[layout[key][1]], key)):
            shape, dtype = layout[key]
            size = math.prod(shape) * dtype.itemsize
            header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self.offsets[key] = offset
            offset += size
        if metadata is not None:
            header["__metadata__"] = metadata
        encoded = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)  # the tensor data stays 8-byte aligned
        self.data_start = 8 + len(encoded)
        self.file = open(path, "wb")  # noqa: SIM115 (closed by close())
        self.file.write(len(encoded).to_bytes(8, "little") + encoded)
        self.file.truncate(self.data_start + offset)  # the file's full size: every tensor then fills its place
        self.written = 0

    def write(self, key: str, tensor: torch.Tensor) -> None:
        expected = self.order[self.written] if self.written < len(self.order) else None
        if key != expected:
            raise ValueError(f"tensor {key!r} written out of order; the next one is {expected!r}")
        shape, dtype = self.layout[key]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"tensor {key!r} is {tuple(tensor.shape)} {tensor.dtype}; the header says {shape} {dtype}")
        self.file.seek(self.data_start + self.offsets[key])
        self.file.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        self.written += 1

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close()
        if exc_type is None and self.written != len(self.order):
            raise ValueError(f"{len(self.order) - self.written} tensors of the header were never written")
