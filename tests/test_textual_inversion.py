"""Textual inversion: caption rewriting, a short run on the random tiny-world pipeline, and its output formats."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTokenizer

from sdpipe.config import parse_params
from sdpipe.config.train import TextualInversionParams
from sdpipe.errors import SdpipeError
from sdpipe.methods import textual_inversion
from sdpipe.methods.textual_inversion import TextualInversion
from sdpipe.training import CHECKPOINTS_DIR, MODEL_DIR
from sdpipe.training.checkpoints import list_checkpoints
from sdpipe.training.loop import load_models

STEPS = 3


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run faster on one thread


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_sd_dir, write_star_dataset):
    """A 3-step, two-vector run; returns the stage's output folder."""
    root = tmp_path_factory.mktemp("ti")
    write_star_dataset(root)
    params = parse_params(
        {
            "paths": {"latents": f"{root}/latents", "captions": f"{root}/captions", "train": f"{root}/train"},
            "base": {"base_model": str(tiny_sd_dir), "datasets": ["star"], "device": "cpu"},
            "train": {
                "methods": ["textual_inversion"],
                "common": {"batch_size": 2, "checkpoint_every": 2, "sample_every": 0},
                "textual_inversion": {"max_steps": STEPS, "num_vectors": 2, "learning_rate": 0.05},
            },
        }
    )
    out_dir = root / "train" / "textual_inversion"
    textual_inversion.train(params, out_dir)
    return out_dir


def method(**params) -> TextualInversion:
    return TextualInversion(TextualInversionParams(**params), base_model="unused")


def test_captions_get_the_placeholder_tokens():
    one, two = method(), method(num_vectors=2)
    assert one.caption("a small blue sks shape") == "a small blue <sks> shape"
    assert two.caption("a small blue sks shape") == "a small blue <sks> <sks>_1 shape"
    assert two.caption("a <sks> on top") == "a <sks> <sks>_1 on top"  # a prompt that already names the token
    assert one.caption("a red star") == "<sks> a red star"  # no trigger word: prepended
    assert one.caption("asks, sksx") == "<sks> asks, sksx"  # whole words only
    assert one.caption("") == ""  # a dropped caption stays unconditional
    assert method(replace_word=None).caption("a sks shape") == "<sks> a sks shape"


def test_a_token_the_tokenizer_knows_is_refused(tiny_sd_dir):
    params = parse_params({"base": {"base_model": str(tiny_sd_dir), "device": "cpu"}})
    models = load_models(params.base, torch.device("cpu"))
    expected = r"placeholder_token: the tokenizer of base\.base_model already has the token '<\|endoftext\|>'"
    with pytest.raises(SdpipeError, match=expected):
        method(placeholder_token="<|endoftext|>").setup(models)


def test_only_the_new_embedding_rows_change(trained, tiny_sd_dir):
    base = CLIPTextModel.from_pretrained(tiny_sd_dir / "text_encoder").get_input_embeddings().weight.detach()
    [(_, checkpoint)] = list_checkpoints(trained / CHECKPOINTS_DIR)
    state = load_file(str(checkpoint / "model.safetensors"))  # the trained text encoder, as accelerate saved it
    [after] = [tensor for key, tensor in state.items() if key.endswith("token_embedding.weight")]
    assert after.shape == (len(base) + 2, base.shape[1])
    assert torch.equal(after[: len(base)], base)  # every original row, the initializer's included, is untouched
    [shape_id] = CLIPTokenizer.from_pretrained(tiny_sd_dir / "tokenizer")("shape", add_special_tokens=False).input_ids
    initializer = base[shape_id]  # the initializer word's embedding
    learned = load_file(str(trained / MODEL_DIR / "embedding.safetensors"))["emb_params"]
    for new_rows in (after[len(base) :], learned):  # after step 2 (the checkpoint) and step 3 (the output)
        assert not torch.equal(new_rows[0], initializer) and not torch.equal(new_rows[1], initializer)
    assert not torch.equal(after[len(base) :], learned)


def test_the_safetensors_embedding_loads_in_diffusers(trained, tiny_sd_dir):
    path = trained / MODEL_DIR / "embedding.safetensors"
    with safe_open(str(path), framework="pt") as f:
        assert list(f.keys()) == ["emb_params"]
        learned = f.get_tensor("emb_params")
    assert learned.shape == (2, 64) and learned.dtype == torch.float32

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    pipe.load_textual_inversion(str(path), token="<sks>")
    prompt = pipe.maybe_convert_prompt("a blue <sks> shape", pipe.tokenizer)
    assert prompt == "a blue <sks> <sks>_1 shape"
    ids = pipe.tokenizer(prompt).input_ids
    new_ids = pipe.tokenizer.convert_tokens_to_ids(["<sks>", "<sks>_1"])
    assert any(ids[i : i + 2] == new_ids for i in range(len(ids))), (ids, new_ids)
    rows = pipe.text_encoder.get_input_embeddings().weight.detach()[new_ids]
    assert torch.equal(rows, learned)


def test_the_a1111_embedding_loads_with_weights_only(trained, tiny_sd_dir):
    data = torch.load(trained / MODEL_DIR / "embedding.pt", weights_only=True)
    assert set(data) == {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}
    assert data["string_to_token"] == {"*": 265}
    assert data["name"] == "<sks>" and data["step"] == STEPS
    assert data["sd_checkpoint_name"] == tiny_sd_dir.name and len(data["sd_checkpoint"]) == 10
    learned = load_file(str(trained / MODEL_DIR / "embedding.safetensors"))["emb_params"]
    assert torch.equal(data["string_to_param"]["*"], learned)

    # diffusers reads A1111 files too, taking the token from `name`.
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    pipe.load_textual_inversion(str(trained / MODEL_DIR / "embedding.pt"))
    assert pipe.tokenizer.convert_tokens_to_ids("<sks>_1") == len(pipe.tokenizer) - 1


def test_textual_inversion_is_a_built_method():
    params = parse_params({"train": {"methods": ["textual_inversion"]}})
    assert params.train.textual_inversion.placeholder_token == "<sks>"
    assert params.train.textual_inversion.datasets == ["star"]
