"""LoRA / DoRA / LoHa / LoKr: short runs on the random tiny-world pipeline, their files, and loading them."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from sdpipe.class_images import write_class_images
from sdpipe.config import ParamsError, parse_params
from sdpipe.config.train import LORA_PRESETS, LoraParams
from sdpipe.errors import SdpipeError
from sdpipe.formats import kohya
from sdpipe.io import source_date_epoch
from sdpipe.methods import lora
from sdpipe.methods.lora import Lora
from sdpipe.models.loading import model_fingerprint
from sdpipe.training import METRICS_FILE, MODEL_DIR
from sdpipe.training.loop import load_models

STEPS = 3
RUNS = {  # a few steps of each algorithm, covering LoCon and the text encoder
    "lora": {"algorithm": "lora", "conv": True, "conv_rank": 4, "conv_alpha": 4.0, "train_text_encoder": True},
    "dora": {"algorithm": "dora", "conv": False, "train_text_encoder": False},
    "loha": {"algorithm": "loha", "conv": True, "conv_rank": 4, "conv_alpha": 4.0, "train_text_encoder": False},
    "lokr": {"algorithm": "lokr", "conv": False, "train_text_encoder": True},
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run faster on one thread


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_sd_dir, write_star_dataset):
    """Trains each of `RUNS` for 3 steps; returns {run: (params, output folder)}."""
    root = tmp_path_factory.mktemp("lora")
    write_star_dataset(root)
    results = {}
    for run, settings in RUNS.items():
        params = parse_params(
            {
                "paths": {"latents": f"{root}/latents", "captions": f"{root}/captions", "train": f"{root}/{run}"},
                "base": {"base_model": str(tiny_sd_dir), "datasets": ["star"], "device": "cpu"},
                "train": {
                    "methods": ["lora"],
                    "common": {"batch_size": 2, "checkpoint_every": 0, "sample_every": 0},
                    "lora": {"max_steps": STEPS, "learning_rate": 0.01, **settings},
                },
            }
        )
        out_dir = root / run / "lora"
        lora.train(params, out_dir)
        results[run] = params, out_dir
    return results


def read(runs, run):
    return kohya.load_kohya_lora(runs[run][1] / MODEL_DIR / lora.LORA_FILE)


def parts(tensors) -> set[str]:
    return {key.split(".", 1)[1] for key in tensors}


def unet_output(pipe: StableDiffusionPipeline) -> torch.Tensor:
    tokenizer = pipe.tokenizer
    ids = tokenizer(["a blue sks shape"], padding="max_length", max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return pipe.unet(latents, 500, pipe.text_encoder(ids)[0]).sample


def load_pipe(tiny_sd_dir) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def base_output(tiny_sd_dir) -> torch.Tensor:
    return unet_output(load_pipe(tiny_sd_dir))


def test_lora_writes_kohya_keys_with_locon_and_text_encoder_layers(runs):
    tensors, _ = read(runs, "lora")
    assert parts(tensors) == {"lora_down.weight", "lora_up.weight", "alpha"}
    attention = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    assert tensors[f"{attention}.lora_down.weight"].shape == (8, 64)  # rank 8 on the 64-wide text states
    assert tensors[f"{attention}.alpha"].item() == 8.0
    assert tensors[f"{attention}.lora_up.weight"].abs().max() > 0  # trained: B starts at zero
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert tensors[f"{conv}.lora_down.weight"].shape == (4, 64, 3, 3)  # LoCon: conv_rank 4
    assert tensors[f"{conv}.alpha"].item() == 4.0
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in tensors
    names = {key.split(".")[0] for key in tensors}
    assert sum(name.startswith("lora_te_") for name in names) == 3 * 4  # q/k/v/out of 3 layers
    attention = [name for name in names if name.endswith(("_to_q", "_to_k", "_to_v", "_to_out_0"))]
    assert len(attention) == 7 * 2 * 4  # to_q/k/v/out of attn1 and attn2 in 7 transformer blocks


def test_the_file_carries_kohya_and_modelspec_metadata(runs, tiny_sd_dir):
    _, metadata = read(runs, "lora")
    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_network_dim"] == "8" and metadata["ss_network_alpha"] == "8.0"
    assert json.loads(metadata["ss_network_args"]) == {"preset": "sdpipe", "conv_dim": "4", "conv_alpha": "4.0"}
    assert metadata["ss_steps"] == metadata["ss_max_train_steps"] == str(STEPS)
    assert metadata["ss_learning_rate"] == "0.01" and metadata["ss_text_encoder_lr"] == "0.0005"
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_v2"] == "False"
    assert metadata["ss_sd_model_hash"] == model_fingerprint(str(tiny_sd_dir))
    assert metadata["ss_num_train_images"] == "6" and metadata["ss_mixed_precision"] == "no"
    frequency = {"a red sks shape": 2, "a blue sks shape": 2, "a green sks shape": 2}
    assert json.loads(metadata["ss_tag_frequency"]) == {"star": frequency}
    # never the wall clock: the same inputs give the same bytes (the last commit of the dataset, paths.datasets/star)
    date = source_date_epoch([Path("datasets") / "star"])
    assert metadata["ss_training_started_at"] == metadata["ss_training_finished_at"] == str(float(date))
    assert metadata["modelspec.sai_model_spec"] == "1.0.0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert metadata["modelspec.implementation"] == "diffusers"
    assert metadata["modelspec.resolution"] == "32x32" and metadata["modelspec.date"] == datetime.datetime.fromtimestamp(date, datetime.UTC).isoformat()
    assert metadata["modelspec.title"] == f"lora of {tiny_sd_dir.name}"


def test_plain_lora_loads_in_diffusers_as_sdpipe_merges_it(runs, tiny_sd_dir, base_output):
    params, out_dir = runs["lora"]
    tensors, _ = read(runs, "lora")
    pipe, trigger = lora.sampling_pipeline(params, out_dir / MODEL_DIR, torch.device("cpu"))  # load_lora_weights
    assert trigger == "sks"
    loaded = unet_output(pipe)
    assert (loaded - base_output).abs().max() > 1e-4
    merged = load_pipe(tiny_sd_dir)
    kohya.merge_lora(merged.unet, "unet", tensors)
    kohya.merge_lora(merged.text_encoder, "text_encoder", tensors)
    torch.testing.assert_close(loaded, unet_output(merged), atol=1e-5, rtol=1e-5)
    # The diffusers-layout file is the same adapter.
    layout = load_pipe(tiny_sd_dir)
    layout.load_lora_weights(str(out_dir / MODEL_DIR))
    torch.testing.assert_close(unet_output(layout), loaded, atol=1e-5, rtol=1e-5)


def test_dora_writes_its_magnitudes_and_loads_in_diffusers_from_its_layout(runs, tiny_sd_dir):
    params, out_dir = runs["dora"]
    tensors, metadata = read(runs, "dora")
    assert parts(tensors) == {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"}
    name = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
    assert tensors[f"{name}.dora_scale"].shape == (128, 1)  # per output channel (LyCORIS wd_on_output)
    assert not any(key.startswith("lora_te_") for key in tensors)
    assert metadata["ss_network_module"] == "lycoris.kohya"
    expected = {"algo": "lora", "dora_wd": "True", "wd_on_output": "True", "preset": "sdpipe"}
    assert json.loads(metadata["ss_network_args"]) == expected
    pipe, _ = lora.sampling_pipeline(params, out_dir / MODEL_DIR, torch.device("cpu"))
    merged = load_pipe(tiny_sd_dir)
    kohya.merge_lora(merged.unet, "unet", tensors)
    torch.testing.assert_close(unet_output(pipe), unet_output(merged), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "run, expected_parts",
    [
        ("loha", {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}),
        # rank 8: both factors full on layers 64 and 128 wide, w2 low-rank on the 256-wide feed-forward ones
        ("lokr", {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"}),
    ],
)
def test_loha_and_lokr_use_lycoris_names_and_apply_by_merging(runs, base_output, run, expected_parts):
    params, out_dir = runs[run]
    tensors, metadata = read(runs, run)
    assert parts(tensors) == expected_parts
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert json.loads(metadata["ss_network_args"])["algo"] == run
    assert not (out_dir / MODEL_DIR / lora.DIFFUSERS_FILE).exists()  # diffusers cannot read them
    has_conv = any("_resnets_" in key for key in tensors)
    has_text = any(key.startswith("lora_te_") for key in tensors)
    assert (has_conv, has_text) == ((True, False) if run == "loha" else (False, True))
    pipe, _ = lora.sampling_pipeline(params, out_dir / MODEL_DIR, torch.device("cpu"))
    assert (unet_output(pipe) - base_output).abs().max() > 1e-5


def test_only_adapters_train_and_the_text_encoder_has_its_own_rate(tiny_sd_dir):
    params = parse_params({"base": {"base_model": str(tiny_sd_dir), "device": "cpu"}})
    models = load_models(params.base, torch.device("cpu"))
    settings = LoraParams(conv=False, train_text_encoder=True, text_encoder_learning_rate=1e-4)
    method = Lora(settings, base_model=str(tiny_sd_dir))
    method.setup(models)
    assert method.trained_models == ("unet", "text_encoder")
    unet_group, text_group = method.parameter_groups()
    assert "lr" not in unet_group and text_group["lr"] == 1e-4
    trainable = [name for name, p in models.unet.named_parameters() if p.requires_grad]
    # lora_A and lora_B of the 12 linear layers of each of the 7 transformer blocks (kohya's targets)
    assert len(trainable) == len(unet_group["params"]) == 7 * 12 * 2
    assert all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert len(text_group["params"]) == 3 * 4 * 2


ATTENTION_PROJECTIONS = (".to_q", ".to_k", ".to_v", ".to_out.0")


def test_attention_only_has_the_parameters_of_diffusers_lora_script(tiny_sd_dir):
    """diffusers' train_text_to_image_lora.py at rank 4: LoraConfig(target_modules=to_q/to_k/to_v/to_out.0)."""
    params = parse_params({"base": {"base_model": str(tiny_sd_dir), "device": "cpu"}})
    models = load_models(params.base, torch.device("cpu"))
    attention = [
        module
        for path, module in models.unet.named_modules()
        if isinstance(module, torch.nn.Linear) and path.endswith(ATTENTION_PROJECTIONS)
    ]
    expected = sum(4 * (layer.in_features + layer.out_features) for layer in attention)  # A [4, in] and B [out, 4]
    method = Lora(LoraParams(preset="attn-only", rank=4, alpha=4.0, train_text_encoder=False), str(tiny_sd_dir))
    method.setup(models)
    assert sum(p.numel() for p in method.trainable_parameters()) == expected == 43_008


def layer_family(name: str) -> str:
    """What kind of layer a kohya name is, for the presets' layer sets."""
    if name.startswith("lora_te_"):
        return "text mlp" if "_mlp_" in name else "text attention"
    if "_attentions_" in name:
        return "attention" if name.endswith(("_to_q", "_to_k", "_to_v", "_to_out_0")) else "transformer"
    for family in ("time_emb_proj", "conv_shortcut", "time_embedding"):
        if family in name:
            return family
    if name in ("lora_unet_conv_in", "lora_unet_conv_out"):
        return "conv in/out"
    return "resnet conv"  # conv1, conv2, down/upsampler convs


TRANSFORMER = {"attention", "transformer"}
RESNET_LINEAR = {"time_emb_proj", "conv_shortcut", "time_embedding"}
PRESET_LAYERS = {
    "attn-only": {"attention", "text attention"},
    "attn-mlp": TRANSFORMER | {"text attention", "text mlp"},
    "full-lin": TRANSFORMER | RESNET_LINEAR | {"text attention", "text mlp"},
    "full": TRANSFORMER | RESNET_LINEAR | {"resnet conv", "conv in/out", "text attention", "text mlp"},
    "sdpipe": TRANSFORMER | {"resnet conv", "conv_shortcut", "text attention"},  # LoCon's convs at conv_rank
    "attn-mlp+conv": TRANSFORMER | {"resnet conv", "conv_shortcut", "time_emb_proj", "text attention", "text mlp"},
}


def adapted_modules(model: torch.nn.Module) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(isinstance(module, BaseTunerLayer) for module in model.modules())


@pytest.mark.parametrize("run", [*LORA_PRESETS, "attn-mlp+conv"])  # the presets as they are, and kohya's LoCon
def test_every_preset_loads_in_diffusers_with_every_layer_used(tiny_sd_dir, tmp_path, base_output, run):
    params = parse_params({"base": {"base_model": str(tiny_sd_dir), "device": "cpu"}})
    models = load_models(params.base, torch.device("cpu"))
    preset, conv = run.removesuffix("+conv"), True if run.endswith("+conv") else None
    settings = LoraParams(
        preset=preset, conv=conv, rank=4, alpha=2.0, conv_rank=2, conv_alpha=3.0, train_text_encoder=True
    )
    method = Lora(settings, base_model=str(tiny_sd_dir))
    method.setup(models)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B starts at zero: give every layer an update
        for parameter in method.trainable_parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    method.save(models, tmp_path, step=1)

    tensors, metadata = kohya.load_kohya_lora(tmp_path / lora.LORA_FILE)
    assert json.loads(metadata["ss_network_args"])["preset"] == preset
    assert metadata["ss_network_module"] == ("networks.lora" if preset in ("sdpipe", "attn-mlp") else "lycoris.kohya")
    layers = kohya.group_by_layer(tensors)
    assert {layer_family(name) for name in layers} == PRESET_LAYERS[run]
    ranks = {name: parts["lora_down.weight"].shape[0] for name, parts in layers.items()}
    assert ranks["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"] == 4
    if run in ("full-lin", "full", "attn-mlp+conv"):
        assert ranks["lora_unet_up_blocks_0_resnets_0_conv_shortcut"] == 4  # 1x1: a linear layer to kohya, LyCORIS
    if run == "sdpipe":
        assert ranks["lora_unet_up_blocks_0_resnets_0_conv_shortcut"] == 2  # as sdpipe's LoCon always did
    if settings.adapts_convs:
        assert ranks["lora_unet_down_blocks_0_resnets_0_conv1"] == 2  # conv_rank
        assert json.loads(metadata["ss_network_args"])["conv_dim"] == "2"
    text_layers = sum(name.startswith("lora_te_") for name in layers)

    merged = load_pipe(tiny_sd_dir)  # what A1111 and ComfyUI do with the kohya file
    kohya.merge_lora(merged.unet, "unet", tensors)
    kohya.merge_lora(merged.text_encoder, "text_encoder", tensors)
    expected = unet_output(merged)
    assert (expected - base_output).abs().max() > 1e-4
    for weight_name in (lora.LORA_FILE, lora.DIFFUSERS_FILE):
        pipe = load_pipe(tiny_sd_dir)
        pipe.load_lora_weights(str(tmp_path), weight_name=weight_name)
        # every layer of the file became an adapter: none was dropped as an unknown key
        assert adapted_modules(pipe.unet) == len(layers) - text_layers, weight_name
        assert adapted_modules(pipe.text_encoder) == text_layers > 0, weight_name
        torch.testing.assert_close(unet_output(pipe), expected, atol=1e-5, rtol=1e-5)


def test_the_diffusers_file_writes_text_model_in_text_encoder_keys(runs, tiny_sd_dir):
    """ComfyUI's key map and diffusers before transformers 5 read only `text_encoder.text_model.…` keys."""
    _, out_dir = runs["lora"]
    tensors, _ = kohya.load_kohya_lora(out_dir / MODEL_DIR / lora.DIFFUSERS_FILE)
    text_keys = [key for key in tensors if not key.startswith("unet.")]
    assert len(text_keys) == 3 * 4 * 2  # lora_A and lora_B of q/k/v/out_proj of 3 layers
    assert all(key.startswith("text_encoder.text_model.encoder.layers.") for key in text_keys)
    pipe = load_pipe(tiny_sd_dir)
    pipe.load_lora_weights(str(out_dir / MODEL_DIR))  # the installed diffusers strips the prefix again
    assert adapted_modules(pipe.text_encoder) == 3 * 4


def test_lora_is_a_built_method_with_checked_params():
    params = parse_params({"train": {"methods": ["lora"]}})
    assert params.train.lora.algorithm == "lora" and params.train.lora.datasets == ["star"]
    with pytest.raises(ParamsError, match="train.lora.algorithm"):
        parse_params({"train": {"lora": {"algorithm": "oft"}}})
    with pytest.raises(ParamsError, match="train.lora.dropout"):
        parse_params({"train": {"lora": {"dropout": 1.0}}})
    with pytest.raises(ParamsError, match="train.lora.preset"):
        parse_params({"train": {"lora": {"preset": "attention"}}})
    with pytest.raises(ParamsError, match="train.lora.conv is false but train.lora.preset full"):
        parse_params({"train": {"lora": {"preset": "full", "conv": False}}})
    presets = {preset: LoraParams(preset=preset).adapts_convs for preset in LORA_PRESETS}  # conv null: the preset's
    assert presets == {"sdpipe": True, "attn-only": False, "attn-mlp": False, "full-lin": False, "full": True}
    assert LoraParams(preset="attn-mlp", conv=True).adapts_convs  # kohya's LoCon


def prior_params(root, tiny_sd_dir, class_dataset=None, lora_datasets=("star",)):
    generated = {"prompts": ["a red circle", "a blue square"], "num_images": 4, "steps": 2, "batch_size": 4}
    class_images = {"dataset": class_dataset} if class_dataset else generated
    return parse_params(
        {
            "paths": {"latents": f"{root}/latents", "captions": f"{root}/captions", "train": f"{root}/train",
                      "class_images": f"{root}/class_images"},
            "base": {"base_model": str(tiny_sd_dir), "datasets": ["star", "shapes"], "device": "cpu"},
            "train": {
                "methods": ["lora"],
                "common": {"batch_size": 2, "checkpoint_every": 0, "sample_every": 0},
                "dreambooth": {"datasets": ["star"], "class_images": class_images},
                "lora": {
                    "datasets": list(lora_datasets) if lora_datasets else None,
                    "max_steps": 2,
                    "conv": False,
                    "train_text_encoder": False,
                    "prior_loss_weight": 1.0,
                },
            },
        }
    )


def test_lora_trains_beside_the_class_images_and_records_them(tmp_path, tiny_sd_dir, write_star_dataset):
    write_star_dataset(tmp_path)
    params = prior_params(tmp_path, tiny_sd_dir)
    write_class_images(params.paths.class_images, params.train.dreambooth.class_images, params.base, params.encode)
    out_dir = tmp_path / "train" / "lora"
    lora.train(params, out_dir)
    assert json.loads((out_dir / METRICS_FILE).read_text())["class_images"] == 4
    class_loss = out_dir / "live" / "plots" / "metrics" / "class_loss.tsv"
    assert len(class_loss.read_text().splitlines()) == 1 + 2  # header + one row per step
    _, metadata = kohya.load_kohya_lora(out_dir / MODEL_DIR / lora.LORA_FILE)
    assert metadata["ss_num_reg_images"] == "4" and metadata["ss_prior_loss_weight"] == "1.0"


def test_class_images_that_are_the_concept_are_refused(tmp_path, tiny_sd_dir, write_star_dataset):
    write_star_dataset(tmp_path)
    params = prior_params(tmp_path, tiny_sd_dir, class_dataset="shapes", lora_datasets=None)  # null: all datasets
    with pytest.raises(SdpipeError, match="'shapes' is also a dataset train.lora trains on"):
        lora.train(params, tmp_path / "train" / "lora")
    assert not (tmp_path / "train").exists()


# --- File modes (issue #24) ---------------------------------------------------------------------------------------


def test_every_file_of_a_lora_run_gets_the_mode_the_umask_gives(tmp_path, tiny_sd_dir, write_star_dataset):
    """Every file the stage writes is readable as far as the umask allows, like any file a program creates: the
    diffusers-layout copy too, which safetensors (0.8) creates with mode 0600 whatever the umask. A umask other
    than the usual 022, so that a mode hard-coded to 0644 fails too."""
    import os
    import stat

    write_star_dataset(tmp_path)
    params = parse_params(
        {
            "paths": {"latents": f"{tmp_path}/latents", "captions": f"{tmp_path}/captions", "train": f"{tmp_path}/t"},
            "base": {"base_model": str(tiny_sd_dir), "datasets": ["star"], "device": "cpu"},
            "train": {
                "methods": ["lora"],
                "common": {"batch_size": 2, "checkpoint_every": 0, "sample_every": 1},
                "lora": {"max_steps": 1, "train_text_encoder": True},
            },
        }
    )
    out_dir = tmp_path / "t" / "lora"
    previous = os.umask(0o027)
    try:
        lora.train(params, out_dir)
    finally:
        os.umask(previous)
    modes = {path.relative_to(out_dir).as_posix(): stat.S_IMODE(path.stat().st_mode)
             for path in out_dir.rglob("*") if path.is_file()}
    assert {f"{MODEL_DIR}/{lora.LORA_FILE}", f"{MODEL_DIR}/{lora.DIFFUSERS_FILE}", METRICS_FILE} <= set(modes)
    assert any(name.endswith(".png") for name in modes)
    assert {name: mode for name, mode in modes.items() if mode != 0o640} == {}
