"""The `encode` stage: prepared images in, one safetensors file of scaled VAE latents out."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageOps

from sdpipe.config.encode import EncodeParams
from sdpipe.encode import encode_dataset, load_latents
from sdpipe.errors import SdpipeError
from sdpipe.models.loading import load_vae, model_fingerprint

REPO = Path(__file__).resolve().parents[1]
SIZES = {"a": (32, 32), "b": (32, 32), "c": (32, 32), "wide": (32, 16)}  # id: (width, height)


def pattern(width: int, height: int, seed: int) -> Image.Image:
    """A non-symmetric RGB image, so that a flip changes it."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x * y + seed * 50) % 256], -1)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def make_prepared(folder: Path) -> Path:
    """A prepared folder as `prepare` writes it: images/<id>.png and manifest.jsonl."""
    (folder / "images").mkdir(parents=True)
    rows = []
    for seed, (image_id, (width, height)) in enumerate(SIZES.items()):
        pattern(width, height, seed).save(folder / "images" / f"{image_id}.png")
        rows.append(
            {
                "id": image_id,
                "file": f"images/{image_id}.png",
                "source": f"{image_id}.png",
                "sha256": "0" * 64,
                "width": width,
                "height": height,
                "caption": f"picture {image_id}",
                "caption_source": "sidecar",
            }
        )
    (folder / "manifest.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return folder


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run faster on one thread


@pytest.fixture(scope="module")
def vae(tiny_sd_dir):
    return load_vae(str(tiny_sd_dir))


@pytest.fixture
def prepared(tmp_path):
    return make_prepared(tmp_path / "prepared" / "x")


def encode(prepared, out_path, vae, tiny_sd_dir, seed=0, **params):
    return encode_dataset(prepared, out_path, vae, EncodeParams(**params), seed, "cpu", str(tiny_sd_dir))


def vae_mean(vae, image: Image.Image) -> torch.Tensor:
    """The reference: the image through the VAE as diffusers' training examples do it (ToTensor, Normalize)."""
    pixels = torch.tensor(np.array(image), dtype=torch.float32).permute(2, 0, 1) / 255 * 2 - 1
    with torch.no_grad():
        return vae.encode(pixels[None]).latent_dist.mean[0] * vae.config.scaling_factor


def test_one_latent_per_image_and_flip(prepared, tmp_path, vae, tiny_sd_dir):
    out_path = tmp_path / "latents" / "x.safetensors"
    summary = encode(prepared, out_path, vae, tiny_sd_dir, batch_size=2)
    latents, metadata = load_latents(out_path)

    assert set(latents) == set(SIZES) | {f"{image_id}.flip" for image_id in SIZES}
    for image_id, (width, height) in SIZES.items():
        assert latents[image_id].shape == (4, height // 4, width // 4)
        assert latents[f"{image_id}.flip"].shape == latents[image_id].shape
        assert latents[image_id].dtype == torch.float32
        assert not torch.allclose(latents[image_id], latents[f"{image_id}.flip"])
    assert summary["images"] == 4 and summary["tensors"] == 8
    assert summary["latent_shapes"] == {"32x32": [4, 8, 8], "32x16": [4, 4, 8]}
    assert metadata == {
        "scaling_factor": str(vae.config.scaling_factor),
        "shift_factor": "none",
        "base_model": str(tiny_sd_dir),
        "model_fingerprint": model_fingerprint(str(tiny_sd_dir)),
        "mode": "mean",
        "flip": "true",
        "count": "4",
    }
    assert [path.name for path in out_path.parent.iterdir()] == ["x.safetensors"]  # no temp files left


def test_latents_are_the_scaled_vae_mean_of_the_image(prepared, tmp_path, vae, tiny_sd_dir):
    out_path = tmp_path / "x.safetensors"
    encode(prepared, out_path, vae, tiny_sd_dir, batch_size=3)
    latents, _ = load_latents(out_path)
    for image_id in ("a", "wide"):
        image = Image.open(prepared / "images" / f"{image_id}.png")
        torch.testing.assert_close(latents[image_id], vae_mean(vae, image), rtol=1e-4, atol=1e-5)
        # left-right, not upside down
        mirrored = vae_mean(vae, ImageOps.mirror(image))
        torch.testing.assert_close(latents[f"{image_id}.flip"], mirrored, rtol=1e-4, atol=1e-5)


def test_no_flip(prepared, tmp_path, vae, tiny_sd_dir):
    out_path = tmp_path / "x.safetensors"
    encode(prepared, out_path, vae, tiny_sd_dir, flip=False)
    latents, metadata = load_latents(out_path)
    assert set(latents) == set(SIZES)
    assert metadata["flip"] == "false"


def test_two_runs_give_identical_files(prepared, tmp_path, vae, tiny_sd_dir):
    for mode in ("mean", "sample"):
        first, second = tmp_path / f"{mode}1.safetensors", tmp_path / f"{mode}2.safetensors"
        encode(prepared, first, vae, tiny_sd_dir, mode=mode, seed=3)
        encode(prepared, second, vae, tiny_sd_dir, mode=mode, seed=3)
        assert first.read_bytes() == second.read_bytes()


def test_sample_mode_is_seeded(prepared, tmp_path, vae, tiny_sd_dir):
    paths = {}
    for name, mode, seed, batch_size in [
        ("mean", "mean", 0, 4),
        ("s0", "sample", 0, 4),
        ("s0_b1", "sample", 0, 1),
        ("s1", "sample", 1, 4),
    ]:
        paths[name] = tmp_path / f"{name}.safetensors"
        encode(prepared, paths[name], vae, tiny_sd_dir, mode=mode, seed=seed, batch_size=batch_size, flip=False)
    latents = {name: load_latents(path)[0]["a"] for name, path in paths.items()}
    assert load_latents(paths["s0"])[1]["mode"] == "sample"
    assert not torch.allclose(latents["s0"], latents["mean"])
    assert not torch.allclose(latents["s0"], latents["s1"])
    # each image has its own draw: the batch it falls in does not change it
    torch.testing.assert_close(latents["s0"], latents["s0_b1"], rtol=1e-4, atol=1e-5)


def test_latents_decode_back_to_the_image_size(prepared, tmp_path, vae, tiny_sd_dir):
    out_path = tmp_path / "x.safetensors"
    encode(prepared, out_path, vae, tiny_sd_dir, flip=False)
    latents, metadata = load_latents(out_path)
    for image_id, (width, height) in SIZES.items():
        with torch.no_grad():
            decoded = vae.decode(latents[image_id][None] / float(metadata["scaling_factor"])).sample
        assert decoded.shape == (1, 3, height, width)
        assert torch.isfinite(decoded).all()


def test_missing_manifest_or_wrong_size_is_a_user_error(prepared, tmp_path, vae, tiny_sd_dir):
    with pytest.raises(SdpipeError, match=r"manifest\.jsonl: no such file; run the `prepare` stage first"):
        encode(tmp_path / "nothing", tmp_path / "x.safetensors", vae, tiny_sd_dir)

    pattern(24, 24, 0).save(prepared / "images" / "b.png")
    with pytest.raises(SdpipeError, match=r"b\.png: the image is 24x24 but manifest\.jsonl says 32x32"):
        encode(prepared, tmp_path / "x.safetensors", vae, tiny_sd_dir)
    assert not (tmp_path / "x.safetensors").exists()

    with pytest.raises(SdpipeError, match=r"no such latents file; run the `encode` stage first"):
        load_latents(tmp_path / "x.safetensors")


@pytest.mark.gpu
def test_cuda_latents_match_the_cpu_ones(prepared, tmp_path, tiny_sd_dir):
    from sdpipe.models.loading import resolve_device, resolve_dtype

    device = resolve_device("auto")
    dtype = resolve_dtype("auto", device)
    cuda_vae = load_vae(str(tiny_sd_dir), dtype=dtype, device=device)
    cpu_vae = load_vae(str(tiny_sd_dir))
    params = EncodeParams(mode="sample")
    encode_dataset(prepared, tmp_path / "cuda.safetensors", cuda_vae, params, 0, device, str(tiny_sd_dir))
    encode_dataset(prepared, tmp_path / "cpu.safetensors", cpu_vae, params, 0, "cpu", str(tiny_sd_dir))
    on_cuda, on_cpu = load_latents(tmp_path / "cuda.safetensors")[0], load_latents(tmp_path / "cpu.safetensors")[0]
    assert set(on_cuda) == set(on_cpu)
    for key, latent in on_cpu.items():
        assert on_cuda[key].dtype == torch.float32
        torch.testing.assert_close(on_cuda[key], latent, rtol=0.05, atol=0.05)  # bf16/fp16 compute


def write_project(folder: Path, base_model: str) -> Path:
    make_prepared(folder / "artifacts" / "prepared" / "x")
    params = {
        "base": {"base_model": base_model, "datasets": ["x"], "device": "cpu"},
        "paths": {},
        "encode": {"batch_size": 2},
    }
    (folder / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    return folder


def test_stage_script(tmp_path, tiny_sd_dir):
    project = write_project(tmp_path / "project", str(tiny_sd_dir))
    result = subprocess.run(
        [sys.executable, str(REPO / "stages" / "encode.py")],
        cwd=project,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    latents, metadata = load_latents(project / "artifacts" / "latents" / "x.safetensors")
    assert len(latents) == 8 and metadata["count"] == "4"


def test_stage_reports_a_missing_base_model(tmp_path, monkeypatch, capsys):
    project = write_project(tmp_path / "project", "./artifacts/pretrain/missing")
    monkeypatch.chdir(project)
    spec = importlib.util.spec_from_file_location("encode_stage", REPO / "stages" / "encode.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    from sdpipe.stage import run_stage

    with pytest.raises(SystemExit) as exit_info:
        run_stage("encode", stage.main)
    assert exit_info.value.code == 1
    assert "base.base_model './artifacts/pretrain/missing': no such file or folder" in capsys.readouterr().err
    assert not (project / "artifacts" / "latents").exists()
