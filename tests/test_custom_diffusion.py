"""Custom Diffusion: caption rewriting, params checks, short runs on the random tiny-world pipeline (K/V only with
class images; all of cross-attention with two concepts), and the outputs loaded by diffusers' own loaders."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import CustomDiffusionAttnProcessor
from safetensors.torch import load_file

from sdpipe.class_images import write_class_images
from sdpipe.config import ParamsError, parse_params
from sdpipe.config.train import CustomDiffusionParams
from sdpipe.encode import save_safetensors
from sdpipe.errors import SdpipeError
from sdpipe.io import write_jsonl
from sdpipe.methods import custom_diffusion
from sdpipe.methods.custom_diffusion import WEIGHTS_FILE, CustomDiffusion
from sdpipe.training import METRICS_FILE, MODEL_DIR

NUM_CLASS_IMAGES = 4
TWO_CONCEPTS = [
    {"dataset": "star", "modifier_token": "<new1>", "replace_word": "sks"},
    {
        "dataset": "dot",
        "modifier_token": "<new2>",
        "initializer_word": "circle",
        "replace_word": "zwx",
    },
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run faster on one thread


def cd_params(root, base_model, **settings):
    return parse_params(
        {
            "paths": {
                "latents": f"{root}/latents",
                "captions": f"{root}/captions",
                "train": f"{root}/train",
                "class_images": f"{root}/class_images",
            },
            "base": {
                "base_model": str(base_model),
                "datasets": ["star", "dot"],
                "device": "cpu",
            },
            "train": {
                "methods": ["custom_diffusion"],
                "common": {
                    "batch_size": 2,
                    "checkpoint_every": 0,
                    "sample_every": 0,
                    "lr_warmup_steps": 0,
                },
                "dreambooth": {
                    "class_images": {
                        "prompts": ["a red circle", "a blue square"],
                        "num_images": NUM_CLASS_IMAGES,
                        "steps": 2,
                        "batch_size": 4,
                    }
                },
                "custom_diffusion": {
                    "max_steps": 2,
                    "learning_rate": 1e-2,
                    "token_learning_rate": 5e-2,
                    **settings,
                },
            },
        }
    )


def write_dot_dataset(root, trigger="zwx"):
    generator = torch.Generator().manual_seed(1)
    latents = {f"dot_{i}": torch.randn(4, 8, 8, generator=generator) for i in range(2)}
    save_safetensors(latents, root / "latents" / "dot.safetensors", {"scaling_factor": "0.18215"})
    rows = [
        {
            "id": key,
            "file": f"images/{key}.png",
            "caption": f"a red {trigger} shape",
            "caption_source": "txt",
        }
        for key in latents
    ]
    write_jsonl(root / "captions" / "dot.jsonl", rows)


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_sd_dir, write_star_dataset):
    """Two datasets (`star` captioned `sks`, `dot` captioned `zwx`) and the class images of the class_images stage."""
    root = tmp_path_factory.mktemp("custom_diffusion")
    write_star_dataset(root, count=4)
    write_dot_dataset(root)
    params = cd_params(root, tiny_sd_dir)
    write_class_images(
        params.paths.class_images,
        params.train.dreambooth.class_images,
        params.base,
        params.encode,
    )
    return root


@pytest.fixture(scope="module")
def trained(root, tiny_sd_dir):
    """`kv`: the default (K/V, one concept, prior preservation); `crossattn`: q/k/v/out, two concepts, no prior."""
    runs = {
        "kv": {},
        "crossattn": {
            "freeze_model": "crossattn",
            "concepts": TWO_CONCEPTS,
            "prior_loss_weight": 0.0,
        },
    }
    outs = {}
    for name, settings in runs.items():
        outs[name] = root / "train" / name
        custom_diffusion.train(cd_params(root, tiny_sd_dir, **settings), outs[name])
    return outs


def base_pipeline(tiny_sd_dir):
    return StableDiffusionPipeline.from_pretrained(str(tiny_sd_dir), safety_checker=None)


def cross_attention_layers(unet):
    return [name.removesuffix(".processor") for name in unet.attn_processors if ".attn2." in name]


def test_captions_get_the_modifier_tokens():
    one = CustomDiffusion(CustomDiffusionParams(), all_params=None)
    assert one.caption("a small blue sks shape") == "a small blue <new1> shape"
    assert one.caption("a <new1> shape") == "a <new1> shape"
    assert one.caption("a star") == "<new1> a star"
    assert one.caption("") == ""
    two = CustomDiffusion(CustomDiffusionParams(concepts=TWO_CONCEPTS), all_params=None)
    assert two.caption("a sks shape beside a ZWX shape") == "a <new1> shape beside a <new2> shape"
    assert two.caption("a red circle") == "a red circle"  # no concept named: nothing to choose


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"datasets": ["star"]}, "datasets must stay null"),
        (
            {
                "concepts": [
                    TWO_CONCEPTS[0],
                    TWO_CONCEPTS[1] | {"modifier_token": "<new1>"},
                ]
            },
            "modifier_token '<new1>'",
        ),
        (
            {"concepts": [TWO_CONCEPTS[0], TWO_CONCEPTS[1] | {"replace_word": None}]},
            "each needs a replace_word",
        ),
        ({"concepts": [{"modifier_token": "<new 1>"}]}, "one word"),
        ({"freeze_model": "all"}, "freeze_model"),
    ],
)
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ParamsError, match=message):
        parse_params({"train": {"custom_diffusion": settings}})


def test_a_concept_caption_without_its_trigger_is_refused(tmp_path, tiny_sd_dir, write_star_dataset):
    write_star_dataset(tmp_path, count=2)
    write_dot_dataset(tmp_path, trigger="sks")  # names the other concept's trigger, not its own
    params = cd_params(tmp_path, tiny_sd_dir, concepts=TWO_CONCEPTS, prior_loss_weight=0.0)
    with pytest.raises(SdpipeError, match=r"dot.jsonl.*concepts\[1\].replace_word 'zwx'"):
        custom_diffusion.train(params, tmp_path / "train" / "custom_diffusion")
    assert not (tmp_path / "train").exists()


def test_only_cross_attention_kv_is_saved_and_it_loads_with_load_attn_procs(trained, tiny_sd_dir):
    model_dir = trained["kv"] / MODEL_DIR
    weights = load_file(model_dir / WEIGHTS_FILE)
    pipe = base_pipeline(tiny_sd_dir)
    base_state = pipe.unet.state_dict()
    layers = cross_attention_layers(pipe.unet)
    trained_keys = {key for key, tensor in weights.items() if tensor.numel()}
    expected = {f"{layer}.processor.to_{p}_custom_diffusion.weight" for layer in layers for p in "kv"}
    assert trained_keys == expected
    empty = {key for key, tensor in weights.items() if not tensor.numel()}
    assert empty == {name for name in pipe.unet.attn_processors if ".attn1." in name}
    for layer in layers:  # K/V started from the base's projections and moved
        for p in "kv":
            assert not torch.equal(
                weights[f"{layer}.processor.to_{p}_custom_diffusion.weight"],
                base_state[f"{layer}.to_{p}.weight"],
            )

    custom_diffusion.load_custom_diffusion(pipe, model_dir, ["<new1>"])
    processors = pipe.unet.attn_processors
    assert all(isinstance(processors[f"{layer}.processor"], CustomDiffusionAttnProcessor) for layer in layers)
    assert not processors[f"{layers[0]}.processor"].train_q_out
    loaded = pipe.unet.state_dict()
    for key in trained_keys:
        assert torch.equal(loaded[key], weights[key])
    for key, tensor in base_state.items():  # the base's own weights are untouched
        assert torch.equal(loaded[key], tensor)


def test_the_modifier_token_loads_with_load_textual_inversion(trained, tiny_sd_dir):
    model_dir = trained["kv"] / MODEL_DIR
    assert list(load_file(model_dir / "<new1>.safetensors")) == ["<new1>"]
    base = base_pipeline(tiny_sd_dir)
    base_rows = base.text_encoder.get_input_embeddings().weight.detach()
    pipe, trigger = custom_diffusion.sampling_pipeline(cd_params(trained["kv"], tiny_sd_dir), model_dir, "cpu")
    assert trigger == "<new1>"
    rows = pipe.text_encoder.get_input_embeddings().weight.detach()
    assert len(rows) == len(base_rows) + 1
    assert torch.equal(rows[: len(base_rows)], base_rows)  # only the new row differs
    new_id = pipe.tokenizer.convert_tokens_to_ids("<new1>")
    shape_id = base.tokenizer("shape", add_special_tokens=False).input_ids[0]
    assert not torch.equal(rows[new_id], base_rows[shape_id])  # trained away from its initializer
    image = pipe("a red <new1> shape", num_inference_steps=2, output_type="np").images[0]
    assert image.shape[-1] == 3


def test_crossattn_trains_q_and_out_and_two_concepts_get_two_tokens(trained, tiny_sd_dir):
    model_dir = trained["crossattn"] / MODEL_DIR
    weights = load_file(model_dir / WEIGHTS_FILE)
    layer = cross_attention_layers(base_pipeline(tiny_sd_dir).unet)[0]
    for name in (
        "to_q_custom_diffusion.weight",
        "to_out_custom_diffusion.0.weight",
        "to_out_custom_diffusion.0.bias",
    ):
        assert f"{layer}.processor.{name}" in weights
    assert {path.name for path in model_dir.glob("<*")} == {
        "<new1>.safetensors",
        "<new2>.safetensors",
    }

    params = cd_params(trained["crossattn"], tiny_sd_dir, concepts=TWO_CONCEPTS)
    pipe, trigger = custom_diffusion.sampling_pipeline(params, model_dir, "cpu")
    assert trigger == "<new1>"
    assert pipe.unet.attn_processors[f"{layer}.processor"].train_q_out
    ids = pipe.tokenizer.convert_tokens_to_ids(["<new1>", "<new2>"])
    rows = pipe.text_encoder.get_input_embeddings().weight
    assert ids[0] != ids[1] and not torch.equal(rows[ids[0]], rows[ids[1]])


def test_the_prior_loss_uses_the_class_images(trained):
    with_prior = json.loads((trained["kv"] / METRICS_FILE).read_text())
    without = json.loads((trained["crossattn"] / METRICS_FILE).read_text())
    assert with_prior["class_images"] == NUM_CLASS_IMAGES
    assert "class_images" not in without
    class_loss = trained["kv"] / "live" / "plots" / "metrics" / "class_loss.tsv"
    assert len(class_loss.read_text().splitlines()) == 1 + 2  # header + one row per step
