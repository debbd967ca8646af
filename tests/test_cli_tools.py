"""`sdpipe inspect`, `sdpipe convert` and `sdpipe datasets add`, run through the CLI on small files."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline
from peft import LoraConfig, inject_adapter_in_model
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from sdpipe.cli import app
from sdpipe.formats import diffusers_lora, kohya
from sdpipe.models.single_file import save_single_file

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
UNET_LAYERS = ATTENTION + ["down_blocks.0.resnets.0.conv1", "up_blocks.0.resnets.0.conv_shortcut"]  # + LoCon
TEXT_LAYERS = ["q_proj", "k_proj", "v_proj", "out_proj"]
GENERATOR = torch.Generator().manual_seed(0)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run faster on one thread


def run(*args: str):
    return CliRunner().invoke(app, [str(arg) for arg in args])


def inspect_json(path: Path) -> dict:
    result = run("inspect", path, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def load_pipe(folder) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def loras(tiny_sd_dir, tmp_path_factory):
    """A LoRA (LoCon convs at another rank and alpha, text encoder too) as peft adapters, written by sdpipe as a
    kohya file and by diffusers' `save_lora_weights` as a diffusers file."""
    folder = tmp_path_factory.mktemp("loras")
    pipe = load_pipe(tiny_sd_dir)
    unet_config = LoraConfig(
        r=4,
        lora_alpha=2,
        target_modules=UNET_LAYERS,
        init_lora_weights=False,
        rank_pattern={"conv1": 2, "conv_shortcut": 2},
        alpha_pattern={"conv1": 3.5, "conv_shortcut": 3.5},
    )
    text_config = LoraConfig(r=4, lora_alpha=8, target_modules=TEXT_LAYERS, init_lora_weights=False)
    inject_adapter_in_model(unet_config, pipe.unet)
    inject_adapter_in_model(text_config, pipe.text_encoder)
    tensors = {**kohya.peft_to_kohya(pipe.unet, "unet"), **kohya.peft_to_kohya(pipe.text_encoder, "text_encoder")}
    kohya.save_kohya_lora(tensors, folder / "kohya.safetensors", {"ss_network_dim": "4", "ss_network_alpha": "2.0"})

    from peft.utils import get_peft_model_state_dict

    StableDiffusionPipeline.save_lora_weights(
        folder,
        weight_name="diffusers.safetensors",
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=text_config.to_dict(),
    )
    return folder


@pytest.fixture(scope="module")
def model_files(tiny_sd_dir, loras, tmp_path_factory):
    """{format: a small file of that format}."""
    folder = tmp_path_factory.mktemp("files")
    vectors = torch.randn(3, 64, generator=GENERATOR)
    files = {"kohya-lora": loras / "kohya.safetensors", "diffusers-lora": loras / "diffusers.safetensors"}

    files["embedding-safetensors"] = folder / "emb.safetensors"
    save_file({"emb_params": vectors}, files["embedding-safetensors"], {"placeholder_token": "<cat>"})
    files["embedding-a1111-pt"] = folder / "emb.pt"
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": vectors},
            "name": "cat",
            "step": 40,
            "sd_checkpoint": "abcdef",
            "sd_checkpoint_name": "tiny",
        },
        files["embedding-a1111-pt"],
    )
    files["embedding-diffusers"] = folder / "learned_embeds.safetensors"
    save_file({"<cat>": vectors[0]}, files["embedding-diffusers"])

    files["hypernetwork-a1111"] = folder / "hypernet.pt"
    torch.save(
        {
            768: hypernetwork_layers(768),
            1024: hypernetwork_layers(1024),
            "layer_structure": [1, 2, 1],
            "activation_func": "relu",
            "is_layer_norm": False,
            "name": "hn",
            "step": 7,
        },
        files["hypernetwork-a1111"],
    )

    files["sd-checkpoint"] = save_single_file(tiny_sd_dir, folder / "tiny.safetensors")
    files["diffusers-pipeline"] = tiny_sd_dir
    return files


def hypernetwork_layers(dim: int) -> list[dict[str, torch.Tensor]]:
    """A1111's two MLPs (for K and V) of one context dim."""
    return [{"linear.0.weight": torch.randn(2 * dim, dim), "linear.1.weight": torch.randn(dim, 2 * dim)}] * 2


# ---------------------------------------------------------------------------------------------------------
# inspect


def test_inspect_tells_every_format(model_files, tiny_sd_dir):
    for expected, path in model_files.items():
        assert inspect_json(path)["format"] == expected, path

    context_dim = json.loads((tiny_sd_dir / "unet" / "config.json").read_text())["cross_attention_dim"]
    checkpoint = inspect_json(model_files["sd-checkpoint"])["details"]
    assert checkpoint["architecture"] == "SD 1.x" and checkpoint["unet_context_dim"] == context_dim
    assert inspect_json(tiny_sd_dir)["details"]["unet_context_dim"] == context_dim

    lora = inspect_json(model_files["kohya-lora"])
    assert lora["details"]["algorithms"] == ["LoCon", "LoRA"]
    unet_layers = {key.split(".")[0] for key in load_file(model_files["kohya-lora"]) if key.startswith("lora_unet_")}
    assert lora["details"]["components"] == {"unet": len(unet_layers), "text_encoder": 3 * len(TEXT_LAYERS)}
    assert set(lora["details"]["ranks"]) == {"2", "4"} and set(lora["details"]["alphas"]) == {"2.0", "3.5", "8.0"}
    assert lora["metadata"] == {"ss_network_alpha": "2.0", "ss_network_dim": "4"}

    peft = inspect_json(model_files["diffusers-lora"])["details"]
    assert peft["adapter_config"]["unet"]["lora_alpha"] == 2 and peft["components"]["text_encoder"] == 12

    embedding = inspect_json(model_files["embedding-a1111-pt"])["details"]
    assert (embedding["vectors"], embedding["dim"], embedding["name"]) == (3, 64, "cat")
    hypernetwork = inspect_json(model_files["hypernetwork-a1111"])["details"]
    assert hypernetwork["context_dims"] == [768, 1024] and hypernetwork["layer_structure"] == [1, 2, 1]


def test_inspect_tells_sd2_and_lycoris_from_keys_and_shapes(tmp_path):
    sd2 = tmp_path / "sd2.safetensors"
    save_file(
        {
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(8, 1024),
            "cond_stage_model.model.token_embedding.weight": torch.zeros(4, 1024),
            "cond_stage_model.model.transformer.resblocks.0.ln_1.weight": torch.zeros(1024),
        },
        sd2,
    )
    sd2_details = inspect_json(sd2)["details"]
    assert sd2_details["architecture"] == "SD 2.x"
    assert sd2_details["unet_context_dim"] == sd2_details["text_encoder_width"] == 1024

    lycoris = tmp_path / "lycoris.safetensors"
    name = "lora_unet_mid_block_attentions_0_proj_in"
    save_file(
        {
            f"{name}.hada_w1_a": torch.zeros(8, 3),
            f"{name}.hada_w1_b": torch.zeros(3, 8),
            f"{name}.hada_w2_a": torch.zeros(8, 3),
            f"{name}.hada_w2_b": torch.zeros(3, 8),
            f"{name}.alpha": torch.tensor(1.0),
            f"{name}.dora_scale": torch.ones(8, 1),
        },
        lycoris,
    )
    details = inspect_json(lycoris)["details"]
    assert details["algorithms"] == ["DoRA", "LoHa"] and details["rank_per_layer"] == {name: 3}


def test_hashes_are_a1111_style(model_files):
    path = model_files["sd-checkpoint"]
    data = path.read_bytes()
    assert len(data) > 0x110000
    hashes = inspect_json(path)["hashes"]
    assert hashes["sha256"] == hashlib.sha256(data).hexdigest() and hashes["autov2"] == hashes["sha256"][:10]
    header_end = 8 + int.from_bytes(data[:8], "little")
    assert hashes["addnet"] == hashlib.sha256(data[header_end:]).hexdigest() != hashes["sha256"]
    assert hashes["autov1"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]

    small = model_files["kohya-lora"]
    small_hashes = inspect_json(small)["hashes"]
    assert "autov1" not in small_hashes  # under 1 MiB: A1111's legacy hash reads nothing
    shown = run("inspect", small)
    assert shown.exit_code == 0 and small_hashes["autov2"] in shown.output and "ss_network_dim" in shown.output


# ---------------------------------------------------------------------------------------------------------
# convert


def test_kohya_to_peft_acts_as_the_kohya_file_in_diffusers(loras, tiny_sd_dir, tmp_path):
    peft_file = tmp_path / "pytorch_lora_weights.safetensors"
    result = run("convert", loras / "kohya.safetensors", peft_file)
    assert result.exit_code == 0, result.output
    # what diffusers itself writes for the same adapters, with the `text_model.` that sdpipe adds for ComfyUI and
    # transformers 4 stacks
    written = diffusers_lora.with_text_model_keys(load_file(loras / "diffusers.safetensors"))
    converted = load_file(peft_file)
    assert converted.keys() == written.keys()
    for key in written:
        assert torch.equal(converted[key], written[key]), key

    merged = load_pipe(tiny_sd_dir)  # the kohya file's ΔW (alpha / rank per layer), baked in
    kohya_tensors, _ = kohya.load_kohya_lora(loras / "kohya.safetensors")
    kohya.merge_lora(merged.unet, "unet", kohya_tensors)
    kohya.merge_lora(merged.text_encoder, "text_encoder", kohya_tensors)
    loaded = load_pipe(tiny_sd_dir)
    loaded.load_lora_weights(str(tmp_path), weight_name=peft_file.name)
    base_output = unet_output(load_pipe(tiny_sd_dir))
    assert (unet_output(merged) - base_output).abs().max() > 1e-3
    torch.testing.assert_close(unet_output(loaded), unet_output(merged), atol=1e-5, rtol=1e-5)


def unet_output(pipe: StableDiffusionPipeline) -> torch.Tensor:
    ids = pipe.tokenizer(
        ["a red sks shape"], padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return pipe.unet(latents, 500, pipe.text_encoder(ids)[0]).sample


def test_kohya_peft_kohya_round_trip_is_exact(loras, tiny_sd_dir, tmp_path):
    original, metadata = kohya.load_kohya_lora(loras / "kohya.safetensors")
    exact_names = ["--to", "peft", "--config", tiny_sd_dir]  # layer names looked up in the model
    to_peft = run("convert", loras / "kohya.safetensors", tmp_path / "peft.safetensors", *exact_names)
    assert to_peft.exit_code == 0, to_peft.output
    result = run("convert", tmp_path / "peft.safetensors", tmp_path / "back.safetensors")
    assert result.exit_code == 0, result.output
    back, back_metadata = kohya.load_kohya_lora(tmp_path / "back.safetensors")
    assert back.keys() == original.keys()
    for key in original:
        assert torch.equal(back[key], original[key]), key
    assert {key: back_metadata[key] for key in metadata} == metadata

    # diffusers' own file (its alpha in lora_adapter_metadata) gives the same kohya tensors
    assert run("convert", loras / "diffusers.safetensors", tmp_path / "from_diffusers.safetensors").exit_code == 0
    from_diffusers, _ = kohya.load_kohya_lora(tmp_path / "from_diffusers.safetensors")
    assert from_diffusers.keys() == original.keys()
    for key in original:
        assert torch.equal(from_diffusers[key], original[key]), key


def test_kohya_names_map_back_to_every_layer_without_the_model(tiny_sd_dir):
    for paths in diffusers_lora.model_module_paths(tiny_sd_dir).values():
        for name, path in paths.items():
            assert diffusers_lora.guess_module_path(*diffusers_lora.split_kohya_name(name)) == path


def test_lycoris_layers_are_refused_for_peft(tmp_path):
    name = "lora_unet_conv_in"
    save_file({f"{name}.lokr_w1": torch.ones(2, 2), f"{name}.lokr_w2": torch.ones(2, 2)}, tmp_path / "lokr.safetensors")
    result = run("convert", tmp_path / "lokr.safetensors", tmp_path / "out.safetensors")
    assert result.exit_code == 1 and "LoKr has no diffusers/PEFT LoRA layout" in result.output
    assert not (tmp_path / "out.safetensors").exists()


def test_a1111_embedding_round_trip(model_files, tmp_path):
    source = model_files["embedding-a1111-pt"]
    assert run("convert", source, tmp_path / "emb.safetensors").exit_code == 0
    assert inspect_json(tmp_path / "emb.safetensors")["format"] == "embedding-safetensors"
    result = run("convert", tmp_path / "emb.safetensors", tmp_path / "emb.pt")
    assert result.exit_code == 0, result.output
    before, after = (torch.load(path, weights_only=True) for path in (source, tmp_path / "emb.pt"))
    assert torch.equal(after["string_to_param"]["*"], before["string_to_param"]["*"])
    assert {k: after[k] for k in ("name", "step", "sd_checkpoint", "sd_checkpoint_name", "string_to_token")} == {
        k: before[k] for k in ("name", "step", "sd_checkpoint", "sd_checkpoint_name", "string_to_token")
    }
    refused = run("convert", tmp_path / "emb.safetensors", tmp_path / "emb.pt")
    assert refused.exit_code == 1 and "--overwrite" in refused.output


def test_folder_single_file_folder(model_files, tiny_sd_dir, tmp_path):
    single = model_files["sd-checkpoint"]
    refused = run("convert", single, tmp_path / "folder")
    assert refused.exit_code == 1 and "--config" in refused.output and not (tmp_path / "folder").exists()
    result = run("convert", single, tmp_path / "folder", "--config", tiny_sd_dir)
    assert result.exit_code == 0, result.output
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        original, back = load_file(tiny_sd_dir / part), load_file(tmp_path / "folder" / part)
        assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)

    result = run("convert", tiny_sd_dir, tmp_path / "half.safetensors", "--dtype", "fp16")
    assert result.exit_code == 0, result.output
    assert inspect_json(tmp_path / "half.safetensors")["dtypes"] == {"float16": len(load_file(single))}

    ckpt = tmp_path / "tiny.ckpt"  # a Lightning-style pickled checkpoint
    torch.save({"state_dict": load_file(single), "global_step": 3}, ckpt)
    assert inspect_json(ckpt)["format"] == "sd-checkpoint"
    assert run("convert", ckpt, tmp_path / "from_ckpt.safetensors").exit_code == 0
    assert (tmp_path / "from_ckpt.safetensors").read_bytes() == run_bytes(single)


def run_bytes(path: Path) -> bytes:
    """The bytes sdpipe writes for the tensors of `path` (a key-sorted header, no metadata)."""
    from sdpipe.io import save_safetensors

    out = path.with_name("resaved.safetensors")
    save_safetensors(load_file(path), out)
    return out.read_bytes()


# ---------------------------------------------------------------------------------------------------------
# pickles that run code


class WritesMarker:
    """Unpickling this creates `marker`: the stand-in for a payload that runs code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_runs_code_is_refused_and_not_run(tmp_path):
    control = tmp_path / "control.marker"
    pickle.loads(pickle.dumps(WritesMarker(control)))
    assert control.exists()  # the payload does run code when unpickled

    marker = tmp_path / "code-ran.marker"
    evil = tmp_path / "embedding.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, 4)}, "name": WritesMarker(marker)}, evil)
    shown = run("inspect", evil)
    assert shown.exit_code == 1 and "refused" in shown.output and "weights_only=True" in shown.output
    assert "system" in shown.output  # names what it would have called
    converted = run("convert", evil, tmp_path / "out.safetensors")
    assert converted.exit_code == 1 and "refused" in converted.output
    assert not (tmp_path / "out.safetensors").exists()
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------
# datasets add


def test_datasets_add_copies_checked_images_and_captions(tmp_path):
    source = tmp_path / "photos"
    source.mkdir()
    for index in range(2):
        Image.new("RGB", (16, 16), (index * 100, 0, 0)).save(source / f"img{index}.png")
    (source / "img0.txt").write_text("a sks dog")
    (source / "notes.md").write_text("not an image")
    params = tmp_path / "params.yaml"
    params.write_text("base:\n  datasets: [star]\n")
    root = tmp_path / "datasets"

    note_options = ["--token", "sks", "--class-word", "dog"]
    result = run("datasets", "add", "dog", "--from", source, "--root", root, "--params", params, *note_options)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (root / "dog").iterdir()) == [".dataset.yaml", "img0.png", "img0.txt", "img1.png"]
    notes = yaml.safe_load((root / "dog" / ".dataset.yaml").read_text())
    assert (notes["token"], notes["class_word"], notes["images"]) == ("sks", "dog", 2)
    assert "base.datasets: [star, dog]" in result.output and "notes.md" in result.output

    again = run("datasets", "add", "dog", "--root", root, "--params", params)
    assert again.exit_code == 1 and "not empty" in again.output

    (source / "broken.png").write_bytes(b"not a png")
    broken = run("datasets", "add", "cat", "--from", source, "--root", root, "--params", params)
    assert broken.exit_code == 1 and "broken.png" in broken.output and not (root / "cat").exists()

    no_dvc = run("datasets", "add", "empty", "--root", root, "--params", params, "--dvc")
    assert no_dvc.exit_code == 1 and "git add" in no_dvc.output and not (root / "empty").exists()
