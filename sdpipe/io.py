"""Atomic writes: a failed or interrupted stage leaves no half-written output for DVC to cache."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save


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
        old = None
        if final.exists() or final.is_symlink():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


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
    """`safetensors.torch.save_file` with a key-sorted header, so that the same tensors give the same bytes.

    safetensors writes the metadata in hash-map order, which changes from one process to the next.
    """
    data = save(tensors, metadata=metadata)
    header_size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_size])
    sorted_header = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    sorted_header += b" " * (-len(sorted_header) % 8)  # the tensor data stays 8-byte aligned
    Path(path).write_bytes(len(sorted_header).to_bytes(8, "little") + sorted_header + data[8 + header_size :])
