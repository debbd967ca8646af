"""Text encoders that both transformers majors read: every `CLIPTextModel` file sdpipe writes has the state-dict names
of transformers 4 (`text_model.…`), which transformers 5 reads too (`sdpipe.models.saving`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel

from sdpipe.models.saving import prefix_text_model_keys, save_pipeline
from sdpipe.tinyworld import models as tiny_models

REPO = Path(__file__).resolve().parents[1]

# transformers 4's CLIPTextModel.state_dict() names (4.31 to 4.57; `position_ids` is a non-persistent buffer there)
TRANSFORMERS4_EMBEDDINGS = ["text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight"]
TRANSFORMERS4_LAYER = [
    "self_attn.k_proj.weight", "self_attn.k_proj.bias", "self_attn.v_proj.weight", "self_attn.v_proj.bias",
    "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.out_proj.weight", "self_attn.out_proj.bias",
    "layer_norm1.weight", "layer_norm1.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
    "layer_norm2.weight", "layer_norm2.bias",
]
TRANSFORMERS4_FINAL = ["text_model.final_layer_norm.weight", "text_model.final_layer_norm.bias"]


def transformers4_clip_text_keys(num_layers: int) -> set[str]:
    layers = [f"text_model.encoder.layers.{i}.{name}" for i in range(num_layers) for name in TRANSFORMERS4_LAYER]
    return set(TRANSFORMERS4_EMBEDDINGS + layers + TRANSFORMERS4_FINAL)


def assert_transformers4_text_encoder(text_encoder_folder: Path) -> None:
    """The folder's weights have exactly transformers 4's CLIPTextModel names, and transformers 5 loads every one."""
    text_encoder_folder = Path(text_encoder_folder)
    config = CLIPTextConfig.from_pretrained(text_encoder_folder)
    with safe_open(str(text_encoder_folder / "model.safetensors"), framework="pt") as f:
        keys, tensors = set(f.keys()), {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    expected = transformers4_clip_text_keys(config.num_hidden_layers)
    assert keys == expected, sorted(keys ^ expected)[:5]
    loaded = CLIPTextModel.from_pretrained(text_encoder_folder).state_dict()
    for key, tensor in loaded.items():
        assert torch.equal(tensor, tensors["text_model." + key.removeprefix("text_model.")]), key


def test_the_committed_tiny_base_has_transformers4_text_encoder_keys():
    base = REPO / "artifacts" / "pretrain" / "tinyworld"
    assert_transformers4_text_encoder(base / "text_encoder")
    # a real SD 1.5 folder's components: no image encoder, which a single file would not hold (from_single_file fails)
    assert json.loads((base / "model_index.json").read_text()).get("image_encoder", [None, None]) == [None, None]


def test_save_pipeline_writes_transformers4_keys_that_transformers5_reads_back(tmp_path):
    folder = tiny_models.build_random_pipeline(tmp_path / "base")  # saved with save_pipeline
    assert_transformers4_text_encoder(folder / "text_encoder")


def test_prefixing_keeps_every_tensor_and_the_metadata(tmp_path):
    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, vocab_size=50, max_position_embeddings=8))
    model.save_pretrained(tmp_path / "te")  # transformers 5: no `text_model.` prefix
    with safe_open(str(tmp_path / "te" / "model.safetensors"), framework="pt") as f:
        assert not any(key.startswith("text_model.") for key in f.keys())  # noqa: SIM118
        metadata = f.metadata()
    prefix_text_model_keys(tmp_path / "te")
    prefix_text_model_keys(tmp_path / "te")  # already prefixed: left as it is
    assert_transformers4_text_encoder(tmp_path / "te")
    with safe_open(str(tmp_path / "te" / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == metadata
    reloaded = CLIPTextModel.from_pretrained(tmp_path / "te").state_dict()
    assert all(torch.equal(reloaded[key], tensor) for key, tensor in model.state_dict().items())



# transformers 4's CLIPTextModelWithProjection (SDXL's second encoder): the text transformer under `text_model.`, and
# the projection beside it
TRANSFORMERS4_PROJECTION = ["text_projection.weight"]


def test_the_committed_tiny_sdxl_has_transformers4_keys_in_both_text_encoders():
    base = REPO / "artifacts" / "pretrain" / "tinyworld_xl"
    assert_transformers4_text_encoder(base / "text_encoder")
    config = CLIPTextConfig.from_pretrained(base / "text_encoder_2")
    with safe_open(str(base / "text_encoder_2" / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())  # noqa: SIM118
    expected = transformers4_clip_text_keys(config.num_hidden_layers) | set(TRANSFORMERS4_PROJECTION)
    assert keys == expected, sorted(keys ^ expected)[:5]


def test_save_pipeline_writes_sdxl_text_encoders_in_transformers4_layout(tmp_path):
    folder = tiny_models.build_random_sdxl_pipeline(tmp_path / "xl")
    assert_transformers4_text_encoder(folder / "text_encoder")
    with safe_open(str(folder / "text_encoder_2" / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())  # noqa: SIM118
    layers = CLIPTextConfig.from_pretrained(folder / "text_encoder_2").num_hidden_layers
    assert keys == transformers4_clip_text_keys(layers) | set(TRANSFORMERS4_PROJECTION)


def assert_reads_without_tokenizer_json(tokenizer_folder: Path, tmp_path: Path) -> None:
    """The folder's `vocab.json` + `merges.txt` (what transformers 4's `CLIPTokenizer` reads) tokenize as its
    `tokenizer.json` does, special and padding tokens included."""
    from transformers import AutoTokenizer, CLIPTokenizer

    bare = tmp_path / f"bare-{tokenizer_folder.parent.name}-{tokenizer_folder.name}"
    bare.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (bare / name).write_bytes((tokenizer_folder / name).read_bytes())
    texts = ["a red star on a dark background", "a sks shape, outlined", ""]
    expected = AutoTokenizer.from_pretrained(tokenizer_folder)(texts, padding="max_length", max_length=32).input_ids
    assert CLIPTokenizer.from_pretrained(bare)(texts, padding="max_length", max_length=32).input_ids == expected


def test_the_committed_bases_tokenizers_read_without_tokenizer_json(tmp_path):
    pretrain = REPO / "artifacts" / "pretrain"
    for folder in (pretrain / "tinyworld" / "tokenizer", pretrain / "tinyworld_xl" / "tokenizer",
                   pretrain / "tinyworld_xl" / "tokenizer_2"):
        assert_reads_without_tokenizer_json(folder, tmp_path)


def test_save_pipeline_writes_the_bpe_vocabulary_beside_tokenizer_json(tmp_path):
    from sdpipe.models.loading import load_pipeline

    pipeline = load_pipeline(str(REPO / "artifacts" / "pretrain" / "tinyworld_xl"))
    save_pipeline(pipeline, tmp_path / "saved")
    for name in ("tokenizer", "tokenizer_2"):
        folder = tmp_path / "saved" / name
        assert {"tokenizer.json", "vocab.json", "merges.txt"} <= {path.name for path in folder.iterdir()}
        assert_reads_without_tokenizer_json(folder, tmp_path)
