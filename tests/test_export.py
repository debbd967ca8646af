"""ONNX export of the random tiny-world pipeline: the folder, parity, onnxruntime sampling, the CLI."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from sdpipe.config import ParamsError, parse_params
from sdpipe.config.export import ExportParams
from sdpipe.errors import SdpipeError
from sdpipe.export import onnx as onnx_export
from sdpipe.export.onnx import export_onnx, torch_generate
from sdpipe.export.onnx_pipeline import OnnxStableDiffusion, execution_providers
from sdpipe.export.source import export_name, fuse_adapters, load_export_pipeline
from sdpipe.io import atomic_path
from sdpipe.models.loading import load_pipeline

REPO = Path(__file__).resolve().parents[1]
COMPONENTS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run faster on one thread


@pytest.fixture(scope="module")
def pipe(tiny_sd_dir):
    return load_pipeline(str(tiny_sd_dir))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_sd_dir):
    """What the `export` stage writes for the default settings (a 4-step end-to-end check); the export folder."""
    root = tmp_path_factory.mktemp("export")
    params = parse_params(
        {
            "paths": {"export": str(root / "export")},
            "base": {"base_model": str(tiny_sd_dir), "device": "cpu"},
            "export": {"check_steps": 4},
        }
    )
    stage_module().main(params)
    return root / "export"


@pytest.fixture(scope="module")
def runner(exported):
    return OnnxStableDiffusion(exported / "onnx" / "base")


def stage_module():
    spec = importlib.util.spec_from_file_location("export_stage", REPO / "stages" / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_params_defaults_and_bad_values():
    settings = ExportParams()
    assert settings.enabled and settings.model == "base" and settings.exporter == "torchscript"
    with pytest.raises(ParamsError, match=r"export\.model: String should match pattern"):
        parse_params({"export": {"model": "lora"}})
    with pytest.raises(ParamsError, match="opset 17 is not available with the dynamo exporter; use 18 to 23"):
        parse_params({"export": {"exporter": "dynamo"}})
    with pytest.raises(ParamsError, match=r"export\.tolerance\.fp32: Input should be greater than 0"):
        parse_params({"export": {"tolerance": {"fp32": 0}}})
    assert [export_name(m) for m in ("base", "train:lora", "merge:mix")] == ["base", "train-lora", "merge-mix"]


def test_the_stage_writes_the_onnx_folder_with_dynamic_axes(exported):
    folder = exported / "onnx" / "base"
    for component in COMPONENTS:
        assert (folder / component / "model.onnx").is_file()
        assert json.loads((folder / component / "config.json").read_text())
    assert (folder / "tokenizer" / "tokenizer_config.json").is_file()
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "DPMSolverMultistepScheduler"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "OnnxStableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "OnnxRuntimeModel"] and index["safety_checker"] == [None, None]

    unet = onnx.load(str(folder / "unet" / "model.onnx"), load_external_data=False)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in unet.graph.input}
    assert dims["sample"] == ["batch", 4, "height", "width"]
    assert dims["encoder_hidden_states"] == ["batch", "sequence", 64]
    assert not list(folder.glob("*/weights.pb"))  # small components keep their weights inside model.onnx


def test_parity_is_recorded_and_within_tolerance(exported):
    report = json.loads((exported / "onnx" / "base" / "parity.json").read_text())
    assert json.loads((exported / "parity.json").read_text()) == report
    assert set(report["components"]) == set(COMPONENTS)
    for component, result in report["components"].items():
        assert 0 < result["relative_error"] < report["tolerance"] == 1e-3, component
        assert len(result["input_shapes"]) == 2  # the export shape and a wider one with another batch size
    assert report["components"]["unet"]["input_shapes"][0]["timestep"] == [1]  # one timestep, batch of two
    assert report["generation"]["steps"] == 4
    assert report["generation"]["mean_abs_pixel_diff"] < 1e-4


def test_diffusers_onnx_pipeline_loads_the_folder_offline_and_generates(exported, pipe, monkeypatch):
    from diffusers import OnnxStableDiffusionPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    onnx_pipe = OnnxStableDiffusionPipeline.from_pretrained(
        exported / "onnx" / "base", provider="CPUExecutionProvider", provider_options={}, local_files_only=True
    )
    onnx_pipe.set_progress_bar_config(disable=True)
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    # diffusers' ONNX pipeline assumes SD's 8x VAE: 64x64 gives the 8x8 latents of the tiny world's 32x32 images.
    images = onnx_pipe("a green square", height=64, width=64, num_inference_steps=3, latents=latents.numpy()).images
    assert images[0].size == (32, 32)

    expected = torch_generate(pipe, "a green square", seed=5, steps=3)
    difference = np.abs(np.asarray(images[0], dtype=np.float32) / 255 - expected[0])
    assert difference.mean() < 2e-3  # only the 8-bit rounding of the diffusers image is left


def test_onnxruntime_and_pytorch_give_the_same_image_for_a_seed(runner, pipe):
    assert runner.providers == execution_providers()
    onnx_image = runner("a blue circle", seed=3, steps=5)
    torch_image = torch_generate(pipe, "a blue circle", seed=3, steps=5)
    other_seed = runner("a blue circle", seed=4, steps=5)
    assert onnx_image.shape == torch_image.shape == (1, 32, 32, 3)
    assert np.abs(onnx_image - torch_image).mean() < 1e-4
    assert np.abs(onnx_image - other_seed).mean() > 1e-2  # so the agreement above is not a coincidence


def test_released_weights_are_freed_only_after_every_torch_reference_is_taken(tiny_sd_dir, tmp_path):
    """The export stage frees the PyTorch weights before onnxruntime loads the graphs (never both copies at once):
    the checks still compare with PyTorch's outputs, taken before."""
    fresh = load_pipeline(str(tiny_sd_dir))
    report = export_onnx(fresh, tmp_path / "onnx", ExportParams(check_steps=2), release_weights=True)
    assert all(parameter.is_meta for module in (fresh.unet, fresh.vae, fresh.text_encoder) for parameter in module.parameters())
    assert all(0 < result["relative_error"] < 1e-3 for result in report["components"].values())
    assert report["generation"]["mean_abs_pixel_diff"] < 1e-4


def test_a_model_larger_than_the_check_size_is_checked_at_the_check_size_and_runs_at_its_own(
    tiny_sd_dir, tmp_path, monkeypatch
):
    """At real size (SD 1.5's latent 64) the parity inputs and the end-to-end image stay at `CHECK_LATENT_SIZE`,
    which bounds onnxruntime's memory; the graph, with dynamic axes, still runs at the model's own size."""
    monkeypatch.setattr(onnx_export, "CHECK_LATENT_SIZE", 4)
    fresh = load_pipeline(str(tiny_sd_dir))
    own = fresh.unet.config.sample_size
    assert own > 4
    report = export_onnx(fresh, tmp_path / "onnx", ExportParams(check_steps=2))
    assert [case["sample"] for case in report["components"]["unet"]["input_shapes"]] == [[2, 4, 4, 4], [1, 4, 4, 8]]
    assert report["generation"]["mean_abs_pixel_diff"] < 1e-4
    image = OnnxStableDiffusion(tmp_path / "onnx")("a red circle", seed=0, steps=2)
    assert image.shape == (1, own * fresh.vae_scale_factor, own * fresh.vae_scale_factor, 3)


def test_a_failed_parity_check_writes_nothing(pipe, tmp_path):
    settings = ExportParams(tolerance={"fp32": 1e-12})
    out_dir = tmp_path / "export" / "onnx" / "base"
    with pytest.raises(SdpipeError, match=r"text_encoder is out of tolerance: .* > export\.tolerance\.fp32 = 1e-12"):
        export_onnx(pipe, out_dir, settings)
    assert list((tmp_path / "export" / "onnx").iterdir()) == []


def test_an_fp16_component_stays_close_to_the_fp32_module(pipe, tmp_path):
    settings = ExportParams(precision="fp16")
    spec = onnx_export.graph_specs(pipe)["vae_decoder"]
    onnx_export.export_component(pipe, "vae_decoder", spec, tmp_path / "vae_decoder", tmp_path / "scratch", settings, 0)
    path = tmp_path / "vae_decoder" / "model.onnx"
    model = onnx.load(str(path))
    assert onnx.TensorProto.FLOAT16 in {init.data_type for init in model.graph.initializer}
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp32 at the boundary
    cases = onnx_export.parity_cases(pipe, "vae_decoder", spec, 0)
    result = onnx_export.check_component(path, cases, ["CPUExecutionProvider"])
    assert 1e-5 < result["relative_error"] < settings.tolerance.fp16  # really fp16, and close enough


def test_external_data_goes_to_one_weights_file(pipe, tmp_path):
    settings = ExportParams(external_data="always")
    spec = onnx_export.graph_specs(pipe)["vae_decoder"]
    folder = tmp_path / "vae_decoder"
    onnx_export.export_component(pipe, "vae_decoder", spec, folder, tmp_path / "scratch", settings, 0)
    assert sorted(path.name for path in folder.iterdir()) == ["config.json", "model.onnx", "weights.pb"]
    assert (folder / "model.onnx").stat().st_size < 100_000 < (folder / "weights.pb").stat().st_size
    cases = onnx_export.parity_cases(pipe, "vae_decoder", spec, 0)
    result = onnx_export.check_component(folder / "model.onnx", cases, ["CPUExecutionProvider"])
    assert result["relative_error"] < 1e-3


def test_every_exported_file_gets_the_mode_the_umask_gives(exported, pipe, tmp_path):
    """Like any file a program creates, as far as the umask allows; `weights.pb` too, which onnx creates with mode
    0600 whatever the umask (a umask other than 022 here, so that a mode hard-coded to 0644 fails too)."""
    umask = os.umask(0)
    os.umask(umask)
    modes = {path: stat.S_IMODE(path.stat().st_mode) for path in exported.rglob("*") if path.is_file()}
    assert len(modes) > 4 and {path for path, mode in modes.items() if mode != 0o666 & ~umask} == set()

    spec = onnx_export.graph_specs(pipe)["vae_decoder"]
    previous = os.umask(0o027)
    try:
        with atomic_path(tmp_path / "vae_decoder") as folder:  # as the export stage writes its folder
            onnx_export.export_component(pipe, "vae_decoder", spec, folder, tmp_path / "scratch",
                                         ExportParams(external_data="always"), 0)
    finally:
        os.umask(previous)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in (tmp_path / "vae_decoder").iterdir()}
    assert modes == {"config.json": 0o640, "model.onnx": 0o640, "weights.pb": 0o640}


def test_cli_sample_writes_the_onnx_image_and_the_pytorch_one(exported, runner, tiny_sd_dir, tmp_path):
    from typer.testing import CliRunner

    from sdpipe.cli import app

    out = tmp_path / "sample.png"
    folder = str(exported / "onnx" / "base")
    args = ["sample", "--onnx", folder, "--prompt", "a red square", "--seed", "7", "--steps", "3", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    image = np.asarray(Image.open(out))
    assert image.shape == (32, 32, 3)
    expected = runner("a red square", seed=7, steps=3)
    assert np.array_equal(image, (expected[0] * 255).round().astype(np.uint8))

    torch_out = tmp_path / "torch.png"
    args = ["sample", "--model", str(tiny_sd_dir), "--prompt", "a red square", "--seed", "7", "--steps", "3"]
    result = CliRunner().invoke(app, [*args, "--out", str(torch_out)])
    assert result.exit_code == 0, result.output
    torch_image = np.asarray(Image.open(torch_out)).astype(int)
    assert np.abs(torch_image - image).max() <= 1  # the same image, up to 8-bit rounding

    both = CliRunner().invoke(app, ["sample", "--prompt", "x"])
    assert both.exit_code == 2 and "exactly one of --onnx" in both.output


def test_disabled_export_writes_an_empty_folder(tmp_path):
    params = parse_params({"paths": {"export": str(tmp_path / "export")}, "export": {"enabled": False}})
    stage_module().main(params)
    assert list((tmp_path / "export" / "onnx").iterdir()) == []
    assert json.loads((tmp_path / "export" / "parity.json").read_text()) == {"enabled": False}


def test_a_missing_trained_model_is_reported(tmp_path):
    params = parse_params({"paths": {"train": str(tmp_path / "train")}, "export": {"model": "train:textual_inversion"}})
    with pytest.raises(SdpipeError, match=r"export\.model is 'train:textual_inversion' but .* does not exist"):
        load_export_pipeline(params, params.export.model)
    params = parse_params({"export": {"model": "train:nosuchmethod"}})
    with pytest.raises(SdpipeError, match="no training method 'nosuchmethod'"):
        load_export_pipeline(params, params.export.model)


def test_lora_adapters_are_fused_before_export(pipe):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    unet = copy.deepcopy(pipe.unet)
    unet.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False))
    with_lora = StableDiffusionPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=unet, scheduler=pipe.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    inputs = (torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 32, 64))
    with torch.no_grad():
        before = unet(*inputs).sample
        fuse_adapters(with_lora)
        after = unet(*inputs).sample
        base = pipe.unet(*inputs).sample
    assert not any("lora" in name for name, _ in unet.named_modules())
    assert torch.allclose(before, after, atol=1e-5)
    assert not torch.allclose(before, base, atol=1e-3)  # the adapter did change the output


def test_optimize_needs_the_cuda_provider(pipe, tmp_path):
    if "CUDAExecutionProvider" in execution_providers():
        pytest.skip("onnxruntime has CUDA here")
    with pytest.raises(SdpipeError, match="export.optimize is true: the fused graphs run only on onnxruntime's CUDA"):
        export_onnx(pipe, tmp_path / "out", ExportParams(optimize=True))
    assert not (tmp_path / "out").exists()


@pytest.mark.gpu
def test_optimized_fp16_export_on_cuda(pipe, tmp_path):
    if "CUDAExecutionProvider" not in execution_providers():
        pytest.skip("needs onnxruntime-gpu")
    report = export_onnx(pipe, tmp_path / "out", ExportParams(optimize=True, precision="fp16", check_steps=10))
    assert report["provider"] == "CUDAExecutionProvider"
    assert report["components"]["unet"]["fused_operators"].get("MultiHeadAttention", 0) > 0
    assert report["generation"]["mean_abs_pixel_diff"] < 0.05


def test_a_model_with_one_file_per_tensor_is_gathered_into_weights_pb_one_tensor_at_a_time(pipe, tmp_path):
    """Over 2 GB the TorchScript exporter writes each tensor to a file of its own: the export gathers them into one
    `weights.pb` without loading the model, and onnxruntime runs the result like the original."""
    import onnxruntime as ort

    spec = onnx_export.graph_specs(pipe)["vae_decoder"]
    inputs = onnx_export.example_inputs(pipe, "vae_decoder", torch.Generator().manual_seed(0))
    raw = tmp_path / "raw" / "model.onnx"
    raw.parent.mkdir()
    onnx_export.torch_export(spec, inputs, tmp_path / "plain.onnx", "torchscript", 17)
    model = onnx.load(str(tmp_path / "plain.onnx"))
    onnx.save_model(model, str(raw), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    assert onnx_export.has_external_data(raw) and len(list(raw.parent.iterdir())) > 10

    (tmp_path / "out").mkdir()
    onnx_export.gather_external_data(raw, tmp_path / "out" / "model.onnx")
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["model.onnx", "weights.pb"]
    feed = {name: tensor.numpy() for name, tensor in inputs.items()}
    expected, actual = (
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)
        for path in (tmp_path / "plain.onnx", tmp_path / "out" / "model.onnx")
    )
    np.testing.assert_array_equal(actual[0], expected[0])


def test_a_unet_over_protobufs_limit_is_written_with_external_data_and_runs_in_onnxruntime(pipe, tmp_path):
    """A real export past 2 GB (every real UNet in fp32): a wide random UNet of 656M parameters (2.62 GB), exported by
    the TorchScript exporter (which writes one file per tensor), gathered into one `weights.pb`, loaded by
    onnxruntime and checked against PyTorch."""
    import shutil

    from diffusers import UNet2DConditionModel

    if shutil.disk_usage(tmp_path).free < 8 * 2**30:
        pytest.skip("needs 8 GiB free for the 2.2 GB UNet's raw and gathered exports")
    torch.manual_seed(0)
    wide_unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(1536, 1536), layers_per_block=1, norm_num_groups=32,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        cross_attention_dim=pipe.text_encoder.config.hidden_size,  # the middle block attends to the text
    ).eval()
    weight_bytes = sum(parameter.numel() * 4 for parameter in wide_unet.parameters())
    assert weight_bytes > 2**31  # past what one protobuf message can hold
    wide = copy.copy(pipe)
    wide.unet = wide_unet
    spec = onnx_export.graph_specs(wide)["unet"]
    folder = tmp_path / "onnx" / "unet"
    folder.parent.mkdir()
    onnx_export.export_component(wide, "unet", spec, folder, tmp_path / "raw", ExportParams(), seed=0)
    model_file, weights_file = folder / "model.onnx", folder / onnx_export.EXTERNAL_DATA_FILE
    assert sorted(path.name for path in folder.iterdir()) == ["config.json", "model.onnx", onnx_export.EXTERNAL_DATA_FILE]
    assert model_file.stat().st_size < 2**20 and weights_file.stat().st_size > 0.99 * weight_bytes  # small tensors stay inline
    cases = onnx_export.parity_cases(wide, "unet", spec, seed=0)
    del wide_unet, wide, spec
    result = onnx_export.check_component(model_file, cases, execution_providers())
    assert result["relative_error"] < 1e-3
