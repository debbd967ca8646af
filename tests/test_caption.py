"""The `caption` stage (template, filename and BLIP backends) and the train-time caption operations."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from sdpipe.config import ParamsError, parse_params
from sdpipe.config.caption import CaptionOps, CaptionParams
from sdpipe.data.captions import apply_caption_ops, caption_dataset, filename_caption, load_captions
from sdpipe.errors import SdpipeError

REPO = Path(__file__).resolve().parents[1]

SOURCES = [
    # (source file in the dataset, its caption, where the caption came from)
    ("sub/red_circle-02.jpg", "a red circle, outlined", "txt"),
    ("blue_square (1).png", None, None),
    ("green-triangle_3.png", "a green triangle", "metadata"),
    ("yellow_star.png", None, None),
]


def write_prepared(prepared_dir: Path) -> Path:
    """A `prepare`-style folder: tiny PNGs and a manifest of SOURCES; returns the manifest path."""
    (prepared_dir / "images").mkdir(parents=True)
    rows = []
    for index, (source, caption, caption_source) in enumerate(SOURCES):
        file = f"images/{index:04d}.png"
        Image.new("RGB", (32, 32), (40 * index, 200, 100)).save(prepared_dir / file)
        rows.append({
            "id": f"{index:04d}", "file": file, "source": source, "sha256": f"{index:064x}",
            "width": 32, "height": 32, "caption": caption, "caption_source": caption_source,
        })
    manifest = prepared_dir / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return manifest


@pytest.fixture
def manifest(tmp_path) -> Path:
    return write_prepared(tmp_path / "prepared" / "toy")


# --- the caption stage ---------------------------------------------------------------------------------


def test_template_fills_only_missing_captions(manifest, tmp_path):
    out = tmp_path / "captions" / "toy.jsonl"
    params = CaptionParams(template="a {token} {class_word}", token="zwx", class_word="thing")
    rows = caption_dataset(manifest, out, params, device="cpu")

    assert rows == load_captions(out)
    assert [row["id"] for row in rows] == ["0000", "0001", "0002", "0003"]
    assert [row["file"] for row in rows] == [f"images/{i:04d}.png" for i in range(4)]
    assert [row["caption"] for row in rows] == ["a red circle, outlined", "a zwx thing", "a green triangle", "a zwx thing"]
    assert [row["caption_source"] for row in rows] == ["txt", "template", "metadata", "template"]
    assert set(rows[0]) == {"id", "file", "caption", "caption_source"}


def test_overwrite_replaces_existing_captions(manifest, tmp_path):
    rows = caption_dataset(manifest, tmp_path / "out.jsonl", CaptionParams(overwrite=True), device="cpu")
    assert [row["caption"] for row in rows] == ["a sks shape"] * 4
    assert [row["caption_source"] for row in rows] == ["template"] * 4


def test_filename_backend(manifest, tmp_path):
    rows = caption_dataset(manifest, tmp_path / "out.jsonl", CaptionParams(backend="filename"), device="cpu")
    assert [row["caption"] for row in rows] == ["a red circle, outlined", "blue square", "a green triangle", "yellow star"]
    assert [row["caption_source"] for row in rows] == ["txt", "filename", "metadata", "filename"]


@pytest.mark.parametrize(
    ("source", "caption"),
    [
        ("sub/red_circle-02.png", "red circle"),
        ("blue__square   (3).jpg", "blue square"),
        ("IMG_0001 (2).png", "IMG"),
        ("cat - Copy.jpg", "cat"),
        ("circle7.png", "circle"),
        ("0003.png", "0003"),
        ("my-dog_v2 final.png", "my dog v2 final"),
    ],
)
def test_filename_caption(source, caption):
    assert filename_caption(source) == caption


def test_missing_manifest_names_the_file(tmp_path):
    missing = tmp_path / "prepared" / "toy" / "manifest.jsonl"
    with pytest.raises(SdpipeError, match="manifest.jsonl.*prepare"):
        caption_dataset(missing, tmp_path / "out.jsonl", CaptionParams(), device="cpu")
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("template", ["a {tokn} {class_word}", "a {} shape", "a {token shape"])
def test_bad_template_is_a_params_error(template):
    with pytest.raises(ParamsError, match=r"caption\.template"):
        parse_params({"caption": {"template": template}})


def test_template_with_escaped_braces_is_fine():
    params = parse_params({"caption": {"template": "{{literal}} {token}"}})
    assert params.caption.template == "{{literal}} {token}"


def test_blip_backend_requires_a_model():
    with pytest.raises(ParamsError, match=r"caption\.blip_model"):
        parse_params({"caption": {"backend": "blip"}})
    assert parse_params({"caption": {"backend": "blip", "blip_model": "some/folder"}}).caption.blip_model


# --- the BLIP backend on a tiny random model ---------------------------------------------------------------

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "photo", "of", "red", "blue", "circle", "square"]


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory) -> Path:
    """A randomly initialized BLIP captioner (hidden size 32, 32x32 images) with a 13-word tokenizer, saved."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    folder = tmp_path_factory.mktemp("tiny_blip")
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(VOCAB) + "\n")
    token_id = {word: index for index, word in enumerate(VOCAB)}
    layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    text_config = dict(
        layers, vocab_size=len(VOCAB), encoder_hidden_size=32, max_position_embeddings=64,
        bos_token_id=token_id["[DEC]"], pad_token_id=token_id["[PAD]"], sep_token_id=token_id["[SEP]"],
        eos_token_id=token_id["[SEP]"],
    )
    vision_config = dict(layers, image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text_config, vision_config=vision_config))
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=BertTokenizer(str(vocab_file), bos_token="[DEC]"),
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_blip_backend_captions_missing_images(manifest, tmp_path, tiny_blip):
    params = CaptionParams(
        backend="blip", blip_model=str(tiny_blip), blip_batch_size=1, blip_max_new_tokens=4, blip_prefix="a photo of"
    )
    rows = caption_dataset(manifest, tmp_path / "out.jsonl", params, device="cpu")

    assert [row["caption_source"] for row in rows] == ["txt", "blip", "metadata", "blip"]
    assert rows[0]["caption"] == "a red circle, outlined"
    for row in (rows[1], rows[3]):
        assert isinstance(row["caption"], str)
        assert row["caption"].startswith("a photo of")
        assert len(row["caption"].split()) <= 3 + 4
    # Greedy decoding is deterministic, and batching does not change the captions.
    batched = caption_dataset(manifest, tmp_path / "again.jsonl", params.model_copy(update={"blip_batch_size": 8}), "cpu")
    assert batched == rows


def test_blip_without_prefix_returns_strings(manifest, tmp_path, tiny_blip):
    params = CaptionParams(backend="blip", blip_model=str(tiny_blip), overwrite=True, blip_max_new_tokens=3)
    rows = caption_dataset(manifest, tmp_path / "out.jsonl", params, device="auto")
    assert [row["caption_source"] for row in rows] == ["blip"] * 4
    assert all(isinstance(row["caption"], str) for row in rows)


def test_blip_hub_id_offline_is_a_clear_error(manifest, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    params = CaptionParams(backend="blip", blip_model="nobody/no-such-blip-model")
    with pytest.raises(SdpipeError, match=r"caption\.blip_model.*nobody/no-such-blip-model.*offline"):
        caption_dataset(manifest, tmp_path / "out.jsonl", params, device="cpu")
    assert not (tmp_path / "out.jsonl").exists()


def test_blip_folder_that_is_not_a_model(manifest, tmp_path):
    params = CaptionParams(backend="blip", blip_model=str(tmp_path))
    with pytest.raises(SdpipeError, match=r"caption\.blip_model.*not a BLIP captioning model folder"):
        caption_dataset(manifest, tmp_path / "out.jsonl", params, device="cpu")


# --- train-time caption operations ------------------------------------------------------------------------

TAGS = "t0, t1, t2, t3, t4, t5, t6, t7"


def test_default_ops_change_nothing_and_use_no_randomness():
    rng = random.Random(1)
    state = rng.getstate()
    assert apply_caption_ops("a  red circle,outlined", CaptionOps(), rng) == "a  red circle,outlined"
    assert rng.getstate() == state


def test_ops_are_deterministic_given_the_rng():
    ops = CaptionOps(trigger="sks", shuffle_tags=True, keep_tokens=1, tag_dropout=0.3, caption_dropout=0.1)
    first = [apply_caption_ops(TAGS, ops, rng) for rng in [random.Random(7)] for _ in range(50)]
    second = [apply_caption_ops(TAGS, ops, rng) for rng in [random.Random(7)] for _ in range(50)]
    other = [apply_caption_ops(TAGS, ops, rng) for rng in [random.Random(8)] for _ in range(50)]
    assert first == second
    assert first != other
    assert len(set(first)) > 10


def test_shuffle_keeps_the_first_tags_in_place():
    ops = CaptionOps(shuffle_tags=True, keep_tokens=2)
    rng = random.Random(0)
    results = [apply_caption_ops(TAGS, ops, rng).split(", ") for _ in range(200)]
    assert all(tags[:2] == ["t0", "t1"] for tags in results)
    assert all(sorted(tags) == TAGS.split(", ") for tags in results)
    assert len({tuple(tags) for tags in results}) > 50


def test_trigger_is_prepended_once_and_always_kept():
    ops = CaptionOps(trigger="sks", shuffle_tags=True, keep_tokens=1, tag_dropout=0.5)
    rng = random.Random(0)
    for _ in range(200):
        tags = apply_caption_ops(TAGS, ops, rng).split(", ")
        assert tags[:2] == ["sks", "t0"]
        assert tags.count("sks") == 1


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("red, circle", "sks, red, circle"),
        ("a sks shape", "a sks shape"),
        ("red, SKS, circle", "red, SKS, circle"),
        ("sks, red", "sks, red"),
        ("asks about red", "sks, asks about red"),
        ("", "sks"),
    ],
)
def test_trigger_is_not_duplicated(caption, expected):
    assert apply_caption_ops(caption, CaptionOps(trigger="sks"), random.Random(0)) == expected


def test_trigger_already_in_the_caption_is_kept_where_it_is():
    ops = CaptionOps(trigger="sks", shuffle_tags=True, tag_dropout=0.5)
    rng = random.Random(0)
    for _ in range(100):
        tags = apply_caption_ops("t0, t1, sks, t3, t4", ops, rng).split(", ")
        assert "sks" in tags and tags.count("sks") == 1


def test_dropout_rates():
    draws = 2000
    rng = random.Random(0)
    dropped = sum(apply_caption_ops(TAGS, CaptionOps(caption_dropout=0.2), rng) == "" for _ in range(draws))
    assert 0.17 < dropped / draws < 0.23

    ops = CaptionOps(keep_tokens=2, tag_dropout=0.25)
    tag_counts = [len(apply_caption_ops(TAGS, ops, rng).split(", ")) for _ in range(draws)]
    kept_fraction = (sum(tag_counts) - 2 * draws) / (6 * draws)  # 6 droppable tags per caption
    assert 0.72 < kept_fraction < 0.78


@pytest.mark.parametrize("bad", [{"tag_dropout": 1.0}, {"caption_dropout": -0.1}, {"keep_tokens": -1}, {"trigger": "a, b"}])
def test_caption_ops_validation(bad):
    with pytest.raises(ValueError):
        CaptionOps(**bad)


# --- the stage script ---------------------------------------------------------------------------------


def run_caption_stage(project: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "stages" / "caption.py")], cwd=project, capture_output=True, text=True, timeout=120
    )


def test_stage_script_writes_captions(tmp_path):
    write_prepared(tmp_path / "artifacts" / "prepared" / "toy")
    params = {"base": {"datasets": ["toy"]}, "caption": {"backend": "filename"}}
    (tmp_path / "params.yaml").write_text(json.dumps(params))  # JSON is YAML

    result = run_caption_stage(tmp_path)
    assert result.returncode == 0, result.stderr
    rows = load_captions(tmp_path / "artifacts" / "captions" / "toy.jsonl")
    assert [row["caption"] for row in rows] == ["a red circle, outlined", "blue square", "a green triangle", "yellow star"]

    (tmp_path / "params.yaml").write_text(json.dumps({"base": {"datasets": ["toy", "absent"]}}))
    result = run_caption_stage(tmp_path)
    assert result.returncode == 1
    assert "absent" in result.stderr and "manifest.jsonl" in result.stderr
