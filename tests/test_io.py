"""`sdpipe.io.save_safetensors` streams one tensor at a time and writes the same bytes as before it streamed."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from sdpipe.io import SafetensorsWriter, atomic_path, save_safetensors, source_date_epoch


def whole_file_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> bytes:
    """The bytes that `save_safetensors` wrote before it streamed (the reference): safetensors' own `save`, its
    header re-written key-sorted and padded to 8 bytes."""
    data = save(tensors, metadata=metadata)
    header_size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_size])
    sorted_header = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    sorted_header += b" " * (-len(sorted_header) % 8)
    return len(sorted_header).to_bytes(8, "little") + sorted_header + data[8 + header_size :]


def mixed_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "b.weight": torch.randn(3, 5, generator=generator).to(torch.bfloat16),
        "a.bias": torch.randn(7, generator=generator).half(),
        "c.scalar": torch.tensor(2.5),
        "d.steps": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "e.mask": torch.tensor([True, False, True]),
        "f.bytes": torch.arange(5, dtype=torch.uint8),
        "g.double": torch.randn(2, 2, generator=generator, dtype=torch.float64),
        "h.empty": torch.zeros(0, 4),
        "i.weight": torch.randn(4, 4, generator=generator),
        "j.index": torch.arange(3, dtype=torch.int32),
        "k.ü": torch.randn(2, generator=generator).half(),  # a non-ASCII key
    }


@pytest.mark.parametrize("metadata", [None, {}, {"format": "pt", "zeta": "ü", "alpha": "1"}])
def test_same_bytes_as_the_whole_file_writer(tmp_path, metadata):
    tensors = mixed_tensors()
    save_safetensors(tensors, tmp_path / "x.safetensors", metadata)
    assert (tmp_path / "x.safetensors").read_bytes() == whole_file_bytes(tensors, metadata)
    # only the keys' order changes the dict, never the file
    save_safetensors(dict(reversed(tensors.items())), tmp_path / "y.safetensors", metadata)
    assert (tmp_path / "y.safetensors").read_bytes() == (tmp_path / "x.safetensors").read_bytes()


def test_safe_open_reads_it_back(tmp_path):
    tensors = mixed_tensors()
    save_safetensors(tensors, tmp_path / "x.safetensors", {"format": "pt"})
    with safe_open(tmp_path / "x.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert sorted(f.keys()) == sorted(tensors)
        for key, tensor in tensors.items():
            read = f.get_tensor(key)
            assert read.dtype == tensor.dtype and torch.equal(read, tensor), key


def test_non_contiguous_and_shared_tensors(tmp_path):
    base = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    tensors = {
        "transposed": base.t(),
        "strided": base[::2, 1:],
        "half_transposed": base.half().t(),
        "bf16_expanded": torch.randn(1, 3).to(torch.bfloat16).expand(4, 3),
        "base": base,
        "same_storage": base.view(4, 6),
    }
    assert not any(tensors[key].is_contiguous() for key in ("transposed", "strided", "half_transposed"))
    save_safetensors(tensors, tmp_path / "x.safetensors")
    contiguous = {key: tensor.contiguous().clone() for key, tensor in tensors.items()}
    assert (tmp_path / "x.safetensors").read_bytes() == whole_file_bytes(contiguous, None)
    loaded = load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(loaded[key], tensors[key]) for key in tensors)


def test_bad_input_is_refused(tmp_path):
    with pytest.raises(ValueError, match="'x' is a list"):
        save_safetensors({"x": [1.0]}, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="complex128"):
        save_safetensors({"x": torch.zeros(2, dtype=torch.complex128)}, tmp_path / "x.safetensors")


def test_writer_checks_order_shapes_and_completeness(tmp_path):
    layout = {"b": ((2,), torch.float32), "a": ((3,), torch.float16)}
    with SafetensorsWriter(tmp_path / "x.safetensors", layout) as writer:
        assert writer.order == ["a", "b"]
        with pytest.raises(ValueError, match="out of order"):
            writer.write("b", torch.zeros(2))
        with pytest.raises(ValueError, match="the header says"):
            writer.write("a", torch.zeros(3))
        writer.write("a", torch.ones(3, dtype=torch.float16))
        writer.write("b", torch.ones(2))
    assert load_file(tmp_path / "x.safetensors")["b"].tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="1 tensors of the header were never written"):
        with SafetensorsWriter(tmp_path / "y.safetensors", layout) as writer:
            writer.write("a", torch.ones(3, dtype=torch.float16))


@pytest.mark.parametrize("dtype", [None, "fp16"])
def test_single_file_writes_the_bytes_of_the_whole_file_writer(tiny_sd_dir, tmp_path, dtype):
    from sdpipe.models.single_file import load_folder_models, pipeline_to_original, save_single_file

    path = save_single_file(tiny_sd_dir, tmp_path / "tiny.safetensors", dtype=dtype, metadata={"note": "x"})
    state_dict = pipeline_to_original(*load_folder_models(tiny_sd_dir))
    cast = {
        key: tensor.half() if dtype == "fp16" and tensor.is_floating_point() else tensor.contiguous()
        for key, tensor in state_dict.items()
    }
    assert path.read_bytes() == whole_file_bytes(cast, {"note": "x"})


def test_atomic_outputs_get_the_umask_mode_whatever_wrote_them(tmp_path):
    """Libraries that write through temporary files (safetensors, onnx) leave mode 0600; an atomic output gets the
    mode a plain open/mkdir gives under the umask (027 here, so that a hard-coded 0644 fails too)."""
    previous = os.umask(0o027)
    try:
        with atomic_path(tmp_path / "out") as folder:
            (folder / "sub").mkdir(parents=True)
            for path in (folder / "a.safetensors", folder / "sub" / "b.pb"):
                path.write_bytes(b"x")
                path.chmod(0o600)
        with atomic_path(tmp_path / "single.safetensors") as file:
            file.write_bytes(b"x")
            file.chmod(0o600)
    finally:
        os.umask(previous)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in tmp_path.rglob("*")}
    assert modes == {"out": 0o750, "sub": 0o750, "a.safetensors": 0o640, "b.pb": 0o640, "single.safetensors": 0o640}


def test_source_date_is_the_data_commit_time_or_source_date_epoch(tmp_path, monkeypatch):
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "star").mkdir()
    (tmp_path / "star" / "a.txt").write_text("a red sks shape")
    assert source_date_epoch([Path("star")]) == 0  # not in a git repository
    environment = {**os.environ, "GIT_AUTHOR_DATE": "@1700000000 +0000", "GIT_COMMITTER_DATE": "@1700000000 +0000",
                   "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                   "GIT_COMMITTER_EMAIL": "t@t"}
    for command in (["git", "init", "-q"], ["git", "add", "star"], ["git", "commit", "-q", "-m", "data"]):
        subprocess.run(command, check=True, env=environment)
    (tmp_path / "other.txt").write_text("a later commit that does not touch the data")
    environment.update(GIT_AUTHOR_DATE="@1800000000 +0000", GIT_COMMITTER_DATE="@1800000000 +0000")
    for command in (["git", "add", "other.txt"], ["git", "commit", "-q", "-m", "other"]):
        subprocess.run(command, check=True, env=environment)
    assert source_date_epoch([Path("star")]) == 1700000000
    assert source_date_epoch([]) == 0
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1234")
    assert source_date_epoch([Path("star")]) == 1234
