"""Aesthetic gradients: the embedding file, and the steering of prompts at sampling time, on the random tiny world."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig

from sdpipe import sampling
from sdpipe.config import parse_params
from sdpipe.io import write_jsonl
from sdpipe.methods import aesthetic_gradient
from sdpipe.models.clip_image import CLIPImageProcessor
from sdpipe.models.loading import load_pipeline
from sdpipe.tinyworld import models as tiny_models

IMAGES = 5


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run faster on one thread


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_sd_dir):
    """A copy of the random base with a CLIP model beside it (`clip/`), a prepared `outlined` dataset, the stage run."""
    root = tmp_path_factory.mktemp("aesthetic")
    base = root / "base"
    shutil.copytree(tiny_sd_dir, base)
    text_config = CLIPTextConfig.from_pretrained(base / "text_encoder")
    vision_config = tiny_models.vision_config()
    torch.manual_seed(1)
    clip_config = CLIPConfig(
        text_config=text_config.to_dict(), vision_config=vision_config.to_dict(), projection_dim=vision_config.projection_dim
    )
    CLIPModel(clip_config).save_pretrained(base / "clip")

    prepared = root / "prepared" / "outlined"
    (prepared / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for index in range(IMAGES):
        image_id = f"outlined_{index:02d}"
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(prepared / "images" / f"{image_id}.png")
        rows.append({"id": image_id, "file": f"images/{image_id}.png", "width": 32, "height": 32, "caption": "x"})
    write_jsonl(prepared / "manifest.jsonl", rows)

    def make_params(**settings):
        return parse_params(
            {
                "paths": {"prepared": f"{root}/prepared", "train": f"{root}/train"},
                "base": {"base_model": str(base), "datasets": ["outlined"], "device": "cpu"},
                "train": {"methods": ["aesthetic_gradient"], "aesthetic_gradient": settings},
            }
        )

    out_dir = root / "train" / "aesthetic_gradient"
    aesthetic_gradient.train(make_params(), out_dir)
    return {"root": root, "base": base, "out_dir": out_dir, "prepared": prepared, "params": make_params}


def test_embedding_is_the_normalized_mean_image_embedding(world):
    model = CLIPModel.from_pretrained(world["base"] / "clip")  # the CLIP beside the base: aesthetic_gradient's default
    processor = CLIPImageProcessor.from_pretrained(world["base"] / "feature_extractor")
    images = [Image.open(path).convert("RGB") for path in sorted((world["prepared"] / "images").glob("*.png"))]
    with torch.no_grad():
        pixels = processor(images=images, return_tensors="pt").pixel_values
        features = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    expected = features.mean(0, keepdim=True)
    expected = expected / expected.norm()

    model_dir = world["out_dir"] / "model"
    a1111 = torch.load(model_dir / "outlined.pt", weights_only=True)  # the extension's layout: a bare tensor
    assert isinstance(a1111, torch.Tensor) and a1111.shape == (1, model.config.projection_dim)
    torch.testing.assert_close(a1111, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(load_file(model_dir / "outlined.safetensors")["aesthetic_embedding"], a1111)
    metrics = json.loads((world["out_dir"] / "metrics.json").read_text())
    assert metrics["images"] == IMAGES and metrics["embedding_dim"] == model.config.projection_dim


def test_weight_zero_leaves_the_conditioning_unchanged(world):
    params = world["params"](aesthetic_weight=0.0, aesthetic_steps=3, aesthetic_lr=1e-2)
    device = torch.device("cpu")
    pipeline, trigger = aesthetic_gradient.sampling_pipeline(params, world["out_dir"] / "model", device)
    base = load_pipeline(str(world["base"]))
    prompts = ["a red circle", "a blue square"]
    steered = pipeline.encode_prompt(prompts, device, 2, True)
    plain = base.encode_prompt(prompts, device, 2, True)
    assert trigger == params.evaluate.trigger
    for ours, theirs in zip(steered, plain):
        torch.testing.assert_close(ours, theirs)


def test_steering_moves_prompts_toward_the_embedding(world):
    params = world["params"](aesthetic_weight=0.5, aesthetic_steps=4, aesthetic_lr=1e-2)
    device = torch.device("cpu")
    pipeline, _ = aesthetic_gradient.sampling_pipeline(params, world["out_dir"] / "model", device)
    before = {name: p.detach().clone() for name, p in pipeline.text_encoder.named_parameters()}
    projection, embedding = pipeline.aesthetic_projections[0], pipeline.aesthetic_embeddings[0]
    input_ids = pipeline.tokenizer("a red circle", padding="max_length", max_length=pipeline.tokenizer.model_max_length,
                                   return_tensors="pt").input_ids

    def similarity(encoder) -> float:
        with torch.no_grad():
            text = projection(encoder(input_ids).pooler_output)
        return float(torch.nn.functional.normalize(text, dim=-1) @ embedding.T)

    tuned = aesthetic_gradient.tuned_text_encoder(pipeline.text_encoder, projection, input_ids, embedding, 4, 1e-2)
    steered, _ = pipeline.encode_prompt(["a red circle"], device, 1, False)
    assert similarity(tuned) > similarity(pipeline.text_encoder)
    for name, parameter in pipeline.text_encoder.named_parameters():  # the pipeline's own encoder is untouched
        torch.testing.assert_close(parameter, before[name])
    plain, _ = load_pipeline(str(world["base"])).encode_prompt(["a red circle"], device, 1, False)
    assert not torch.allclose(steered, plain)

    # the pipeline works as the evaluate stage calls it, and the same prompt is steered the same way
    images = sampling.sample(pipeline, ["a red circle", "a red circle"], [0], steps=2, batch_size=2)
    assert len(images) == 2 and images[0].size == (32, 32)
    assert np.array_equal(np.asarray(images[0]), np.asarray(images[1]))


# ---------------------------------------------------------------------------------------------------------
# SDXL: one CLIP and one aesthetic embedding per text encoder; the context and the pooled embedding steered


def random_clip(folder, text_encoder_folder, seed: int) -> None:
    """A random CLIP whose text tower has the config of the text encoder in `text_encoder_folder`."""
    text_config = CLIPTextConfig.from_pretrained(text_encoder_folder)
    vision_config = tiny_models.vision_config()
    vision_config.projection_dim = text_config.projection_dim
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=text_config.to_dict(), vision_config=vision_config.to_dict(), projection_dim=text_config.projection_dim
    )
    CLIPModel(config).save_pretrained(folder)
    tiny_models.feature_extractor().save_pretrained(folder)


@pytest.fixture(scope="module")
def xl_world(tmp_path_factory, world):
    root = tmp_path_factory.mktemp("aesthetic_xl")
    base = tiny_models.build_random_sdxl_pipeline(root / "base_xl")
    clips = [root / "clip_l", root / "clip_g"]
    random_clip(clips[0], base / "text_encoder", seed=2)
    random_clip(clips[1], base / "text_encoder_2", seed=3)

    def make_params(**settings):
        return parse_params(
            {
                "paths": {"prepared": str(world["root"] / "prepared"), "train": f"{root}/train"},
                "base": {"base_model": str(base), "datasets": ["outlined"], "device": "cpu"},
                "train": {
                    "methods": ["aesthetic_gradient"],
                    "aesthetic_gradient": {"clip_model": [str(clip) for clip in clips], **settings},
                },
            }
        )

    out_dir = root / "train" / "aesthetic_gradient"
    metrics = aesthetic_gradient.train(make_params(), out_dir)
    return {"base": base, "clips": clips, "out_dir": out_dir, "params": make_params, "metrics": metrics}


def test_sdxl_embedding_file_holds_each_clips_mean_image_embedding(xl_world, world):
    images = [Image.open(path).convert("RGB") for path in sorted((world["prepared"] / "images").glob("*.png"))]
    tensors = load_file(xl_world["out_dir"] / "model" / "outlined.safetensors")
    assert sorted(tensors) == ["clip_g", "clip_l"]
    assert not (xl_world["out_dir"] / "model" / "outlined.pt").exists()  # the A1111 extension has no SDXL form
    for key, clip in zip(("clip_l", "clip_g"), xl_world["clips"]):
        model = CLIPModel.from_pretrained(clip)
        with torch.no_grad():
            pixels = CLIPImageProcessor.from_pretrained(clip)(images=images, return_tensors="pt").pixel_values
            features = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        expected = torch.nn.functional.normalize(features.mean(0, keepdim=True), dim=-1)
        torch.testing.assert_close(tensors[key], expected, atol=1e-5, rtol=1e-5)
        assert xl_world["metrics"]["embedding_dim"][key] == model.config.projection_dim
    assert [e.shape for e in aesthetic_gradient.load_embeddings(xl_world["out_dir"] / "model" / "outlined.safetensors")] == [
        tensors["clip_l"].shape, tensors["clip_g"].shape
    ]


def test_sdxl_steering_moves_both_encoders_and_the_pooled_embedding(xl_world):
    device = torch.device("cpu")
    params = xl_world["params"](aesthetic_weight=0.5, aesthetic_steps=4, aesthetic_lr=1e-2)
    pipeline, _ = aesthetic_gradient.sampling_pipeline(params, xl_world["out_dir"] / "model", device)
    assert isinstance(pipeline, aesthetic_gradient.AestheticGradientXLPipeline)
    plain = load_pipeline(str(xl_world["base"])).encode_prompt("a red circle", device=device)
    steered = pipeline.encode_prompt("a red circle", device=device)
    width_l = pipeline.text_encoder.config.hidden_size
    for part in (slice(None, width_l), slice(width_l, None)):  # each encoder's share of the context moved
        assert not torch.allclose(steered[0][..., part], plain[0][..., part])
    assert not torch.allclose(steered[2], plain[2])  # the pooled embedding too
    torch.testing.assert_close(steered[1], plain[1])  # the negative prompt is left as it is
    torch.testing.assert_close(steered[3], plain[3])

    # the second encoder's tuned copy is closer to the clip_g embedding than the encoder itself
    input_ids = pipeline.tokenizer_2(["a red circle"], padding="max_length", max_length=32, return_tensors="pt").input_ids
    embedding = pipeline.aesthetic_embeddings[1]
    tuned = aesthetic_gradient.tuned_text_encoder(pipeline.text_encoder_2, pipeline.aesthetic_projections[1], input_ids, embedding, 4, 1e-2)

    def similarity(encoder) -> float:
        with torch.no_grad():
            return float(torch.nn.functional.normalize(encoder(input_ids).text_embeds, dim=-1) @ embedding.T)

    assert similarity(tuned) > similarity(pipeline.text_encoder_2)

    unsteered, _ = aesthetic_gradient.sampling_pipeline(xl_world["params"](aesthetic_weight=0.0), xl_world["out_dir"] / "model", device)
    for ours, theirs in zip(unsteered.encode_prompt("a red circle", device=device), plain):
        torch.testing.assert_close(ours, theirs)
    images = sampling.sample(pipeline, ["a red circle", "a red circle"], [0], steps=2, batch_size=2)
    assert len(images) == 2 and np.array_equal(np.asarray(images[0]), np.asarray(images[1]))


def test_sdxl_needs_one_clip_per_text_encoder(xl_world, tmp_path):
    from sdpipe.errors import SdpipeError

    params = xl_world["params"](clip_model=str(xl_world["clips"][0]))
    with pytest.raises(SdpipeError, match=r"train\.aesthetic_gradient\.clip_model: .*Stable Diffusion XL model with 2 text "
                                          r"encoder\(s\); give one CLIP model folder per text encoder"):
        aesthetic_gradient.train(params, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_clip_folder_without_its_image_processor_is_refused_by_key(xl_world, tmp_path):
    from sdpipe.errors import SdpipeError

    bare = tmp_path / "clip_without_processor"
    bare.mkdir()
    for path in xl_world["clips"][1].iterdir():
        if path.name != "preprocessor_config.json":
            (bare / path.name).write_bytes(path.read_bytes())
    params = xl_world["params"](clip_model=[str(xl_world["clips"][0]), str(bare)])
    with pytest.raises(SdpipeError, match=r"train\.aesthetic_gradient\.clip_model: .*has no preprocessor_config\.json"):
        aesthetic_gradient.train(params, tmp_path / "out")
    assert not (tmp_path / "out").exists()
