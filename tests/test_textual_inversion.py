"""Textual inversion: caption rewriting, a short run on the random tiny-world pipeline, and its output formats."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTokenizer

from sdpipe.config import ParamsError, parse_params
from sdpipe.config.train import TextualInversionParams
from sdpipe.conversion import convert_model
from sdpipe.errors import SdpipeError
from sdpipe.formats.embeddings import read_embedding
from sdpipe.methods import textual_inversion
from sdpipe.methods.textual_inversion import TextualInversion
from sdpipe.training import CHECKPOINTS_DIR, MODEL_DIR
from sdpipe.training.checkpoints import list_checkpoints
from sdpipe.training.loop import load_models

STEPS = 3
EMBEDDING_FILE = "sks.safetensors"  # the default placeholder token <sks>, without its brackets


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
    learned = load_file(str(trained / MODEL_DIR / EMBEDDING_FILE))["emb_params"]
    for new_rows in (after[len(base) :], learned):  # after step 2 (the checkpoint) and step 3 (the output)
        assert not torch.equal(new_rows[0], initializer) and not torch.equal(new_rows[1], initializer)
    assert not torch.equal(after[len(base) :], learned)


def test_the_safetensors_embedding_loads_in_diffusers(trained, tiny_sd_dir):
    path = trained / MODEL_DIR / EMBEDDING_FILE
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


# What A1111 and ComfyUI load from their `embeddings/` folder (A1111: subfolders too), each file as the prompt word
# of its name without suffix.
EMBEDDING_SUFFIXES = {".pt", ".bin", ".safetensors"}


def test_the_model_folder_gives_a1111_and_comfyui_one_word_the_token_without_brackets(trained):
    folder = trained / MODEL_DIR
    files = [path for path in folder.rglob("*") if path.is_file()]
    assert sorted(path.name for path in files) == [EMBEDDING_FILE]
    words = [path.stem for path in files if path.suffix in EMBEDDING_SUFFIXES]
    assert words == ["sks"]  # `sks` in an A1111 prompt, `embedding:sks` in ComfyUI, `<sks>` in diffusers


def test_the_embedding_carries_a1111s_fields_and_converts_to_an_a1111_pt(trained, tiny_sd_dir, tmp_path):
    path = trained / MODEL_DIR / EMBEDDING_FILE
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["placeholder_token"] == "<sks>" and metadata["num_vectors"] == "2"
    assert metadata["step"] == str(STEPS)
    assert metadata["sd_checkpoint_name"] == tiny_sd_dir.name and len(metadata["sd_checkpoint"]) == 10

    # For A1111 versions before safetensors: `sdpipe convert` writes the .pt, which diffusers reads too (the token
    # from its `name`), with the same vectors.
    convert_model(path, tmp_path / "sks.pt")
    data = torch.load(tmp_path / "sks.pt", weights_only=True)
    assert data["name"] == "<sks>" and data["step"] == STEPS and data["string_to_token"] == {"*": 265}
    assert torch.equal(data["string_to_param"]["*"], read_embedding(path).vectors)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    pipe.load_textual_inversion(str(tmp_path / "sks.pt"))
    assert pipe.tokenizer.convert_tokens_to_ids("<sks>_1") == len(pipe.tokenizer) - 1


def test_the_file_is_named_after_the_token_and_a_token_with_no_name_is_refused(tmp_path):
    assert textual_inversion.embedding_file("<sks>") == "sks.safetensors"
    assert textual_inversion.embedding_file("<my-concept_2>") == "my-concept_2.safetensors"
    assert textual_inversion.embedding_file("<a/b>") == "ab.safetensors"  # never a path
    assert textual_inversion.embedding_file("cat") == "cat.safetensors"
    for token in ("<>", "<*>", "<..>"):
        with pytest.raises(ParamsError, match=r"train\.textual_inversion\.placeholder_token: .*no letter or digit"):
            parse_params({"train": {"textual_inversion": {"placeholder_token": token}}})
    params = parse_params({"base": {"base_model": str(tmp_path / "base")}})
    with pytest.raises(SdpipeError, match=r"sks\.safetensors: no embedding of '<sks>'; run `dvc repro"):
        textual_inversion.sampling_pipeline(params, tmp_path, torch.device("cpu"))


def test_textual_inversion_is_a_built_method():
    params = parse_params({"train": {"methods": ["textual_inversion"]}})
    assert params.train.textual_inversion.placeholder_token == "<sks>"
    assert params.train.textual_inversion.datasets == ["star"]
