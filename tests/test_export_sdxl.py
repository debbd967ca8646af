"""ONNX export of SDXL (optimum's folder layout), its onnxruntime runner, and the oracle reading of exported images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from sdpipe.config.export import ExportParams
from sdpipe.export.onnx import export_onnx
from sdpipe.export.onnx_pipeline import OnnxStableDiffusion, OnnxStableDiffusionXL, load_onnx_pipeline
from sdpipe.models.loading import load_pipeline
from sdpipe.tinyworld import oracle
from sdpipe.tinyworld.models import build_random_sdxl_pipeline

REPO = Path(__file__).resolve().parents[1]
SDXL_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return load_pipeline(str(build_random_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "tiny_sdxl")))


@pytest.fixture(scope="module")
def exported(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export") / "onnx"
    report = export_onnx(pipe, folder, ExportParams(check_steps=4), seed=0, model="base")
    return folder, report


def test_the_folder_has_optimums_sdxl_layout(exported, pipe):
    folder, _ = exported
    for component in SDXL_COMPONENTS:
        assert (folder / component / "model.onnx").is_file() and (folder / component / "config.json").is_file()
    for name in ("tokenizer", "tokenizer_2", "scheduler"):
        assert (folder / name).is_dir()
    model_index = json.loads((folder / "model_index.json").read_text())
    assert model_index["_class_name"] == "StableDiffusionXLPipeline"
    assert model_index["force_zeros_for_empty_prompt"] is True
    assert model_index["tokenizer_2"] == ["transformers", "CLIPTokenizer"]


def test_the_graphs_have_optimums_inputs_and_outputs(exported, pipe):
    folder, _ = exported

    def names(values):
        return [value.name for value in values]

    unet = onnx.load(str(folder / "unet" / "model.onnx"), load_external_data=False).graph
    assert names(unet.input) == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    timestep = next(value for value in unet.input if value.name == "timestep")
    assert len(timestep.type.tensor_type.shape.dim) == 0  # a scalar, as optimum's ORTUnet expects
    assert names(unet.output) == ["out_sample"]
    layers = pipe.text_encoder_2.config.num_hidden_layers
    text_encoder_2 = onnx.load(str(folder / "text_encoder_2" / "model.onnx"), load_external_data=False).graph
    hidden = [f"hidden_states.{i}" for i in range(layers + 1)]
    assert names(text_encoder_2.output) == ["text_embeds", "last_hidden_state", *hidden]
    text_encoder = onnx.load(str(folder / "text_encoder" / "model.onnx"), load_external_data=False).graph
    assert names(text_encoder.output)[:2] == ["last_hidden_state", "pooler_output"]


def test_every_component_is_within_the_fp32_tolerance(exported):
    _, report = exported
    assert set(report["components"]) == set(SDXL_COMPONENTS)
    for component, result in report["components"].items():
        assert result["relative_error"] <= 1e-3, component
    assert report["generation"]["mean_abs_pixel_diff"] <= 0.05


@pytest.mark.parametrize("zeros_for_empty_prompt", [True, False])
@pytest.mark.parametrize("negative_prompt", [None, "a blue square"])
def test_the_runner_gives_the_pytorch_pipelines_image(exported, pipe, zeros_for_empty_prompt, negative_prompt):
    folder, _ = exported
    runner = load_onnx_pipeline(folder)
    assert isinstance(runner, OnnxStableDiffusionXL)
    runner.zeros_for_empty_prompt = zeros_for_empty_prompt
    pipe.register_to_config(force_zeros_for_empty_prompt=zeros_for_empty_prompt)
    try:
        prompts = ["a red circle", "a green triangle"]
        onnx_images = runner(prompts, seed=3, steps=3, negative_prompt=negative_prompt)
        torch_images = pipe(
            prompts, negative_prompt=negative_prompt and [negative_prompt] * 2, num_inference_steps=3,
            generator=torch.Generator().manual_seed(3), output_type="np",
        ).images
    finally:
        pipe.register_to_config(force_zeros_for_empty_prompt=True)
    assert onnx_images.shape == torch_images.shape
    assert np.abs(onnx_images - torch_images).max() < 1e-3


def test_an_sd_folder_still_gets_the_sd_runner(tiny_sd_dir, tmp_path):
    folder = tmp_path / "onnx"
    export_onnx(load_pipeline(str(tiny_sd_dir)), folder, ExportParams(check_steps=0), seed=0)
    runner = load_onnx_pipeline(folder)
    assert type(runner) is OnnxStableDiffusion


@pytest.mark.slow
@pytest.mark.parametrize("base", ["tinyworld", "tinyworld_xl"])
def test_onnxruntime_images_read_as_the_pytorch_ones_by_the_oracle(base, tmp_path):
    """The committed tiny-world bases: the oracle reads the same color, shape and style from the onnxruntime images
    as from the PyTorch ones, 8 prompts x 3 seeds at the evaluation's steps."""
    pipe = load_pipeline(str(REPO / "artifacts" / "pretrain" / base))
    folder = tmp_path / "onnx"
    export_onnx(pipe, folder, ExportParams(check_steps=0), seed=0)
    runner = load_onnx_pipeline(folder)
    prompts = [f"a {color} {shape}" for color, shape in (("red", "circle"), ("green", "square"), ("blue", "triangle"),
               ("yellow", "circle"), ("red", "square"), ("green", "triangle"), ("blue", "circle"), ("yellow", "square"))]
    readings = {"onnx": [], "torch": []}
    for seed in range(3):
        onnx_images = runner(prompts, seed=seed, steps=20)
        torch_images = pipe(prompts, num_inference_steps=20, generator=torch.Generator().manual_seed(seed),
                            output_type="np").images
        readings["onnx"] += [oracle.read((image * 255).round().astype(np.uint8)) for image in onnx_images]
        readings["torch"] += [oracle.read((image * 255).round().astype(np.uint8)) for image in torch_images]

    def attributes(reading):
        return (reading.found, reading.color, reading.shape, reading.style)

    assert [attributes(r) for r in readings["onnx"]] == [attributes(r) for r in readings["torch"]]
    assert sum(r.shape == p.split()[-1] for r, p in zip(readings["torch"], prompts * 3)) >= 20  # the base draws them


def test_the_family_view_exports_sdxl_export_model_under_the_families_folder():
    from sdpipe.config import ParamsError, parse_params
    from sdpipe.config.sdxl import family_view

    params = parse_params({"sdxl": {"export_model": "train:lora"}, "export": {"check_steps": 3}})
    view = family_view(params, "sdxl")
    assert view.export.model == "train:lora" and view.export.check_steps == 3
    assert Path(view.paths.export) == Path(params.paths.families) / "sdxl" / "export"
    with pytest.raises(ParamsError, match=r"sdxl: .*export_model is 'train:clip_inversion'"):
        parse_params({"sdxl": {"export_model": "train:clip_inversion"}})
