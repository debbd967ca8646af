"""Hypernetworks: the A1111 file layout, how ComfyUI's loader reads it, the attention processor, a short run."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from safetensors.torch import load_file, save_file

from sdpipe.config import ParamsError, parse_params
from sdpipe.config.caption import CaptionOps
from sdpipe.config.train import HYPERNETWORK_ACTIVATIONS, HypernetworkParams
from sdpipe.errors import SdpipeError
from sdpipe.methods import hypernetwork
from sdpipe.methods.hypernetwork import (
    Architecture,
    Hypernetwork,
    HypernetworkAttnProcessor,
    HypernetworkMLP,
    HypernetworkTraining,
)
from sdpipe.models.loading import model_fingerprint
from sdpipe.training import CHECKPOINTS_DIR, MODEL_DIR
from sdpipe.training.checkpoints import list_checkpoints
from sdpipe.training.loop import load_models

STEPS = 3
SETTINGS = ("layer_structure", "activation_func", "is_layer_norm", "weight_initialization", "use_dropout",
            "activate_output", "last_layer_dropout", "dropout_structure", "optional_info", "step", "name",
            "sd_checkpoint", "sd_checkpoint_name")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run faster on one thread


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_sd_dir, write_star_dataset):
    """A 3-step run with the default settings (checkpointed at step 2); returns (params, the stage's output folder)."""
    root = tmp_path_factory.mktemp("hypernetwork")
    write_star_dataset(root)
    params = parse_params(
        {
            "paths": {"latents": f"{root}/latents", "captions": f"{root}/captions", "train": f"{root}/train"},
            "base": {"base_model": str(tiny_sd_dir), "datasets": ["star"], "device": "cpu"},
            "train": {
                "methods": ["hypernetwork"],
                "common": {"batch_size": 2, "checkpoint_every": 2, "sample_every": 0},
                "hypernetwork": {"datasets": ["star"], "max_steps": STEPS, "learning_rate": 0.01},
            },
        }
    )
    out_dir = root / "train" / "hypernetwork"
    hypernetwork.train(params, out_dir)
    return params, out_dir


def load_a1111(out_dir) -> dict:
    return torch.load(out_dir / MODEL_DIR / hypernetwork.A1111_FILE, weights_only=True)


def context_width(tiny_sd_dir) -> int:
    return json.loads((tiny_sd_dir / "unet" / "config.json").read_text())["cross_attention_dim"]


def attention_widths(tiny_sd_dir) -> list[int]:
    """The text context's width and the widths of the UNet's self-attention layers."""
    config = json.loads((tiny_sd_dir / "unet" / "config.json").read_text())
    return sorted({config["cross_attention_dim"], *config["block_out_channels"]})


def unet_output(pipe: StableDiffusionPipeline) -> torch.Tensor:
    tokenizer = pipe.tokenizer
    ids = tokenizer(["a blue sks shape"], padding="max_length", max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return pipe.unet(latents, 500, pipe.text_encoder(ids)[0]).sample


def test_the_pt_file_has_a1111s_layout_and_loads_with_weights_only(trained, tiny_sd_dir):
    _, out_dir = trained
    data = load_a1111(out_dir)
    widths = attention_widths(tiny_sd_dir)  # the text context's, and (self_attention) the self-attention ones
    assert context_width(tiny_sd_dir) in widths and len(widths) > 1
    assert sorted(key for key in data if isinstance(key, int)) == widths
    assert set(data) == {*widths, *SETTINGS}
    for width in widths:
        k_state, v_state = data[width]  # A1111 writes a (K, V) pair of state dicts
        for state in (k_state, v_state):  # [1, 2, 1], linear: two Linear layers, nothing between them
            assert set(state) == {"linear.0.weight", "linear.0.bias", "linear.1.weight", "linear.1.bias"}
            assert state["linear.0.weight"].shape == (2 * width, width)
            assert state["linear.1.weight"].shape == (width, 2 * width)
        assert not torch.equal(k_state["linear.1.weight"], v_state["linear.1.weight"])
    assert data["layer_structure"] == [1.0, 2.0, 1.0] and data["activation_func"] == "linear"
    assert data["weight_initialization"] == "Normal" and data["is_layer_norm"] is False
    assert data["use_dropout"] is False and data["dropout_structure"] == [0.0, 0.0, 0.0]
    assert data["last_layer_dropout"] is False and data["activate_output"] is False
    assert data["step"] == STEPS and data["name"] == "hypernetwork"
    assert data["sd_checkpoint"] == model_fingerprint(str(tiny_sd_dir))[:10]
    assert data["sd_checkpoint_name"] == tiny_sd_dir.name


# ComfyUI's HypernetworkLoader (comfy_extras/nodes_hypernetwork.py), re-implemented here from what it documents and
# does, not copied. It offers every file of `models/hypernetworks/` (subfolders too) with one of these suffixes. It
# reads `.safetensors`/`.sft` files as flat {name: tensor} dicts (no metadata) and the others with
# `torch.load(weights_only=True)`; knows only these activation names (another one: it logs an error and applies
# nothing); takes every key that `int()` accepts as a context width holding a (K, V) pair of state dicts; and rebuilds
# each MLP from the state dict alone (see `comfyui_mlp`).
COMFYUI_SUFFIXES = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
COMFYUI_ACTIVATIONS = {
    "linear": torch.nn.Identity, "relu": torch.nn.ReLU, "leakyrelu": torch.nn.LeakyReLU, "elu": torch.nn.ELU,
    "swish": torch.nn.Hardswish, "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid, "softsign": torch.nn.Softsign,
    "mish": torch.nn.Mish,
}


def comfyui_hypernetwork(path) -> dict[int, tuple[torch.nn.Sequential, torch.nn.Sequential]] | None:
    """What ComfyUI's hypernetwork loader makes of a file: {width: (K MLP, V MLP)}, or None where it applies nothing
    (an activation it does not know). A file with no integer key gives {}: ComfyUI then patches nothing, silently."""
    if path.suffix in (".safetensors", ".sft"):
        data = load_file(str(path))
    else:
        data = torch.load(path, weights_only=True)
        if "state_dict" in data:  # its checkpoint reader unwraps these
            data = data["state_dict"]
        elif len(data) == 1:
            data = next(iter(data.values()))
    activation = data.get("activation_func", "linear")
    if activation not in COMFYUI_ACTIVATIONS:
        return None
    layer_norm, activate_output = data.get("is_layer_norm", False), data.get("activate_output", False)
    networks = {}
    for key in data:
        try:
            width = int(key)
        except (TypeError, ValueError):
            continue
        networks[width] = tuple(
            comfyui_mlp(data[width][part], activation, layer_norm, activate_output) for part in (0, 1)
        )
    return networks


def comfyui_mlp(state: dict, activation: str, layer_norm: bool, activate_output: bool) -> torch.nn.Sequential:
    """ComfyUI's rebuild of one MLP from its state dict: the `.weight` keys, in file order, are a Linear layer each,
    followed (with `is_layer_norm`) by a LayerNorm, which takes the next `.weight` key; the activation follows every
    Linear whose `.weight` key is not the last one, and that one too with `activate_output`. (Its Dropout layers are
    left out: this returns the MLP for sampling, in eval mode.)"""
    names = [key.removesuffix(".weight") for key in state if key.endswith(".weight")]
    layers: list[torch.nn.Module] = []
    index = 0
    while index < len(names):
        weight = state[f"{names[index]}.weight"]
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0])
        linear.load_state_dict({"weight": weight, "bias": state[f"{names[index]}.bias"]})
        layers.append(linear)
        if activation != "linear" and (index != len(names) - 1 or activate_output):
            layers.append(COMFYUI_ACTIVATIONS[activation]())
        if layer_norm:
            index += 1
            weight = state[f"{names[index]}.weight"]
            norm = torch.nn.LayerNorm(weight.shape[0])
            norm.load_state_dict({"weight": weight, "bias": state[f"{names[index]}.bias"]})
            layers.append(norm)
        index += 1
    return torch.nn.Sequential(*layers).eval()


def weighted_layers(mlp: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """The Linear and LayerNorm layers of an MLP: (kind, weight shape), in order."""
    return [(type(layer).__name__, tuple(layer.weight.shape)) for layer in mlp.modules()
            if isinstance(layer, (torch.nn.Linear, torch.nn.LayerNorm))]


def assert_comfyui_rebuilds(networks: dict, hypernetwork_: Hypernetwork) -> None:
    """ComfyUI found every width, and in each MLP every layer, of `hypernetwork_`, and computes what it computes."""
    assert sorted(networks) == hypernetwork_.dims
    for width, pair in networks.items():
        for rebuilt, mlp in zip(pair, hypernetwork_.mlps[str(width)], strict=True):
            assert weighted_layers(rebuilt) == weighted_layers(mlp)
            context = torch.randn(2, 5, width, generator=torch.Generator().manual_seed(width))
            with torch.no_grad():
                torch.testing.assert_close(rebuilt(context), mlp.eval()(context))


def test_the_model_folder_holds_only_files_that_a1111_and_comfyui_load(trained):
    _, out_dir = trained
    folder = out_dir / MODEL_DIR
    files = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    assert files == [hypernetwork.A1111_FILE]  # A1111 lists `**/*.pt`: that file, which has its layout (above)
    listed = [path for path in folder.rglob("*") if path.suffix in COMFYUI_SUFFIXES]
    assert listed
    expected = hypernetwork.load_hypernetwork(folder / hypernetwork.A1111_FILE)
    for path in listed:
        networks = comfyui_hypernetwork(path)
        assert networks is not None, f"ComfyUI applies nothing of {path.name}"
        assert_comfyui_rebuilds(networks, expected)


@pytest.mark.parametrize("activation", HYPERNETWORK_ACTIVATIONS)
@pytest.mark.parametrize(
    "shape",
    [
        {},
        {"layer_structure": [1, 2, 0.5, 1], "activate_output": True},
        {"add_layer_norm": True, "activate_output": True, "use_dropout": True},
    ],
    ids=["default", "deeper", "layer-norm"],
)
def test_comfyui_rebuilds_every_hypernetwork_that_params_allow(tmp_path, activation, shape):
    settings = {"activation_func": activation, "weight_initialization": "KaimingNormal", **shape}
    network = Hypernetwork([16, 24], Architecture.from_params(HypernetworkParams(**settings)))
    network.initialize()
    path = tmp_path / hypernetwork.A1111_FILE
    torch.save(hypernetwork.a1111_hypernetwork(network, 1, "models/base.safetensors"), path)
    assert_comfyui_rebuilds(comfyui_hypernetwork(path), network)


def test_what_params_refuse_would_not_load_the_same_in_comfyui(tmp_path):
    """Why params refuse these (test_bad_files_and_params_are_refused): ComfyUI applies nothing of a file with
    another activation, and puts the activation after the output layer too where there are LayerNorms."""
    default = Architecture.from_params(HypernetworkParams())
    for activation in ("gelu", "silu", "hardswish"):
        network = Hypernetwork([16], replace(default, activation_func=activation))
        torch.save(hypernetwork.a1111_hypernetwork(network, 1, "base"), tmp_path / "other.pt")
        assert comfyui_hypernetwork(tmp_path / "other.pt") is None
    architecture = replace(
        Architecture.from_params(HypernetworkParams(activation_func="tanh", weight_initialization="XavierNormal")),
        add_layer_norm=True,
    )
    network = Hypernetwork([16], architecture)
    network.initialize()
    torch.save(hypernetwork.a1111_hypernetwork(network, 1, "base"), tmp_path / "norm.pt")
    rebuilt = comfyui_hypernetwork(tmp_path / "norm.pt")[16][0]
    assert [type(layer).__name__ for layer in rebuilt][-2:] == ["Tanh", "LayerNorm"]  # sdpipe and A1111: no Tanh
    assert [type(layer).__name__ for layer in network.mlps["16"][0].linear][-2:] == ["Linear", "LayerNorm"]
    # and a `.safetensors` file, whatever its layout, holds no integer key: ComfyUI applies nothing, silently
    save_file({"16.k.linear.0.weight": torch.zeros(2, 2)}, str(tmp_path / "flat.safetensors"))
    assert comfyui_hypernetwork(tmp_path / "flat.safetensors") == {}


def test_training_changes_only_the_mlps(trained, tiny_sd_dir):
    _, out_dir = trained
    base = load_file(str(tiny_sd_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    [(_, checkpoint)] = list_checkpoints(out_dir / CHECKPOINTS_DIR)
    state = load_file(str(checkpoint / "model.safetensors"))  # the UNet at step 2, its `hypernetwork` included
    mlp_keys = {key for key in state if key.startswith("hypernetwork.")}
    assert set(state) - mlp_keys == set(base)
    assert all(torch.equal(state[key], base[key]) for key in base)
    data = load_a1111(out_dir)
    for width in attention_widths(tiny_sd_dir):
        for part, mlp_state in enumerate(data[width]):  # step 3 differs from step 2: the MLPs trained
            checkpointed = state[f"hypernetwork.mlps.{width}.{part}.linear.1.weight"]
            assert not torch.equal(mlp_state["linear.1.weight"], checkpointed)


def setup_method(tiny_sd_dir, **settings):
    params = parse_params({"base": {"base_model": str(tiny_sd_dir), "device": "cpu"}})
    models = load_models(params.base, torch.device("cpu"))
    method = HypernetworkTraining(HypernetworkParams(**settings), base_model=str(tiny_sd_dir))
    method.setup(models)
    return method, models


def patched_layers(unet) -> dict[str, int]:
    """{processor name: context width} of the layers that apply the hypernetwork."""
    layers = hypernetwork.attention_layers(unet)
    return {
        name: hypernetwork.context_width(layers[name])
        for name, processor in unet.attn_processors.items()
        if isinstance(processor, HypernetworkAttnProcessor)
    }


def test_setup_unfreezes_only_the_mlps_and_patches_the_layers_of_their_width(tiny_sd_dir):
    method, models = setup_method(tiny_sd_dir, self_attention=False)
    width = context_width(tiny_sd_dir)
    trainable = [name for name, p in models.unet.named_parameters() if p.requires_grad]
    assert trainable and all(name.startswith("hypernetwork.") for name in trainable)
    assert len(trainable) == len(method.trainable_parameters()) == 2 * 4  # K and V: two Linear layers each
    assert not any(p.requires_grad for p in models.text_encoder.parameters())
    assert method.hypernetwork.dims == [width]
    patched = patched_layers(models.unet)
    attn2 = {name for name in models.unet.attn_processors if name.endswith("attn2.processor")}
    assert attn2 <= set(patched) and set(patched.values()) == {width}
    # A1111's rule: a self-attention layer as wide as the text context gets the cross-attention's MLPs too.
    same_width = {name for name, layer in hypernetwork.attention_layers(models.unet).items()
                  if hypernetwork.context_width(layer) == width}
    assert set(patched) == same_width and len(same_width) < len(models.unet.attn_processors)


def test_self_attention_adds_mlps_for_every_attention_width(tiny_sd_dir):
    method, models = setup_method(tiny_sd_dir, self_attention=True)
    widths = {hypernetwork.context_width(layer) for layer in hypernetwork.attention_layers(models.unet).values()}
    assert len(widths) > 1 and method.hypernetwork.dims == sorted(widths)
    assert set(patched_layers(models.unet)) == set(models.unet.attn_processors)


def test_captions_drop_at_the_methods_own_rate():
    common = CaptionOps(caption_dropout=0.05)
    own = HypernetworkTraining(HypernetworkParams(caption_dropout=0.2), "unused")
    assert own.caption_ops(common).caption_dropout == 0.2
    assert HypernetworkTraining(HypernetworkParams(caption_dropout=None), "unused").caption_ops(common) == common


def test_strength_zero_samples_the_base_and_strength_one_does_not(trained, tiny_sd_dir):
    params, out_dir = trained
    base = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    base_output = unet_output(base)
    outputs = {}
    for strength in (0.0, 1.0):
        settings = params.train.hypernetwork.model_copy(update={"strength": strength})
        params_at = params.model_copy(update={"train": params.train.model_copy(update={"hypernetwork": settings})})
        pipe, trigger = hypernetwork.sampling_pipeline(params_at, out_dir / MODEL_DIR, torch.device("cpu"))
        assert trigger == "sks"
        outputs[strength] = unet_output(pipe)
    torch.testing.assert_close(outputs[0.0], base_output, atol=1e-6, rtol=1e-6)
    assert (outputs[1.0] - base_output).abs().max() > 1e-5


def test_the_processor_transforms_only_what_k_and_v_come_from():
    torch.manual_seed(0)
    attention = Attention(query_dim=32, cross_attention_dim=16, heads=2, dim_head=8)
    settings = HypernetworkParams(activation_func="relu", weight_initialization="KaimingNormal")
    network = Hypernetwork([16], Architecture.from_params(settings))
    network.initialize()
    mlp_k, mlp_v = network.mlps["16"]
    x, context = torch.randn(2, 5, 32), torch.randn(2, 7, 16)
    strength = 0.7
    with torch.no_grad():
        output = HypernetworkAttnProcessor(mlp_k, mlp_v, strength)(attention, x, context)
        q = attention.to_q(x)
        k = attention.to_k(context + mlp_k.linear(context) * strength)
        v = attention.to_v(context + mlp_v.linear(context) * strength)
        q, k, v = (t.view(2, -1, 2, 8).transpose(1, 2) for t in (q, k, v))
        weights = (q @ k.transpose(-1, -2) / math.sqrt(8)).softmax(dim=-1)
        expected = attention.to_out[0]((weights @ v).transpose(1, 2).reshape(2, 5, 16))
        torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)
        assert (output - AttnProcessor2_0()(attention, x, context)).abs().max() > 1e-4
        at_zero = HypernetworkAttnProcessor(mlp_k, mlp_v, 0.0)(attention, x, context)
        torch.testing.assert_close(at_zero, AttnProcessor2_0()(attention, x, context), atol=1e-6, rtol=1e-6)

        # Self-attention (A1111: the MLPs of the features' width): K and V come from the transformed features.
        self_attention = Attention(query_dim=16, heads=2, dim_head=8)
        output = HypernetworkAttnProcessor(mlp_k, mlp_v, strength)(self_attention, context)
        q = self_attention.to_q(context)
        k = self_attention.to_k(context + mlp_k.linear(context) * strength)
        v = self_attention.to_v(context + mlp_v.linear(context) * strength)
        q, k, v = (t.view(2, -1, 2, 8).transpose(1, 2) for t in (q, k, v))
        weights = (q @ k.transpose(-1, -2) / math.sqrt(8)).softmax(dim=-1)
        expected = self_attention.to_out[0]((weights @ v).transpose(1, 2).reshape(2, 7, 16))
        torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)


def test_layer_indices_follow_a1111_and_a_file_round_trips(tmp_path):
    # LayerNorms and an activation but none on the output: A1111 files may have it (params refuse it, for ComfyUI)
    architecture = Architecture(
        layer_structure=(1, 1.5, 1), activation_func="relu", add_layer_norm=True, activate_output=False,
        use_dropout=True, dropout_structure=(0.0, 0.1, 0.0), weight_initialization="XavierUniform",
    )
    network = Hypernetwork([16], architecture)
    network.initialize()
    mlp_k = network.mlps["16"][0]
    # A1111's Sequential: Linear, ReLU, LayerNorm, Dropout | Linear, LayerNorm (no output activation)
    kinds = [type(layer).__name__ for layer in mlp_k.linear]
    assert kinds == ["Linear", "ReLU", "LayerNorm", "Dropout", "Linear", "LayerNorm"]
    assert set(mlp_k.state_dict()) == {f"linear.{i}.{p}" for i in (0, 2, 4, 5) for p in ("weight", "bias")}
    assert mlp_k.linear[0].weight.shape == (24, 16)
    assert mlp_k.linear[2].weight.abs().max() < 0.1  # A1111 starts LayerNorm weights from N(0, 0.01) too

    data = hypernetwork.a1111_hypernetwork(network, 7, "models/base.safetensors")
    assert data["dropout_structure"] == [0.0, 0.1, 0.0] and data["last_layer_dropout"] is True
    torch.save(data, tmp_path / "style.pt")
    loaded = hypernetwork.load_hypernetwork(tmp_path / "style.pt")
    assert loaded.architecture == network.architecture
    for before, after in zip(network.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(before, after)


def test_older_a1111_files_get_a1111s_defaults(tmp_path):
    legacy = Architecture.from_file({"use_dropout": True, "last_layer_dropout": False, "layer_structure": [1, 2, 2, 1]})
    assert legacy.dropout_structure == (0.0, 0.3, 0.0, 0.0)
    assert legacy.activation_func == "linear" and legacy.activate_output is True  # A1111's load defaults
    assert Architecture.from_file({}).layer_structure == (1, 2, 1)


@pytest.mark.parametrize("activation", HYPERNETWORK_ACTIVATIONS)
def test_every_activation_builds_and_keeps_the_width(activation):
    params = HypernetworkParams(activation_func=activation, activate_output=True)
    mlp = HypernetworkMLP(8, Architecture.from_params(params))
    assert mlp(torch.randn(1, 3, 8)).shape == (1, 3, 8)


def test_bad_files_and_params_are_refused(tmp_path, tiny_sd_dir):
    torch.save({"string_to_param": {"*": torch.zeros(1, 8)}}, tmp_path / "embedding.pt")
    with pytest.raises(SdpipeError, match=r"embedding\.pt: not an A1111 hypernetwork"):
        hypernetwork.load_hypernetwork(tmp_path / "embedding.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a zip")
    with pytest.raises(SdpipeError, match=r"garbage\.pt"):
        hypernetwork.load_hypernetwork(tmp_path / "garbage.pt")
    wrong = {768: ({"linear.0.weight": torch.zeros(3, 3)}, {}), "layer_structure": [1, 1]}
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(SdpipeError, match=r"wrong\.pt: not a hypernetwork this version can read"):
        hypernetwork.load_hypernetwork(tmp_path / "wrong.pt")

    other_width = Hypernetwork([768], Architecture.from_params(HypernetworkParams()))
    models = load_models(parse_params({"base": {"base_model": str(tiny_sd_dir)}}).base, torch.device("cpu"))
    with pytest.raises(SdpipeError, match=r"style\.pt is for context widths \[768\].*another base model"):
        hypernetwork.apply_hypernetwork(models.unet, other_width, source="style.pt")

    for bad, key in (
        ({"layer_structure": [2, 1]}, "layer_structure"),
        ({"dropout_structure": [0, 0.1, 0]}, "use_dropout is false"),
        ({"use_dropout": True, "dropout_structure": [0, 0.1]}, "dropout_structure has 2 values"),
        ({"use_dropout": True, "dropout_structure": [0, 1.0, 0]}, "dropout_structure"),
        ({"activation_func": "threshold"}, "activation_func"),
        ({"weight_initialization": "Orthogonal"}, "weight_initialization"),
        ({"add_layer_norm": True, "activation_func": "relu"}, "add_layer_norm with activation_func 'relu' needs "
                                                              "activate_output: true"),
    ):
        with pytest.raises(ParamsError, match=key):
            parse_params({"train": {"hypernetwork": bad}})
    allowed = ", ".join(HYPERNETWORK_ACTIVATIONS)
    for name in ("gelu", "silu", "hardswish", "softmax"):  # A1111 loads these; ComfyUI applies nothing of such a file
        with pytest.raises(ParamsError, match=r"train\.hypernetwork\.activation_func") as error:
            parse_params({"train": {"hypernetwork": {"activation_func": name}}})
        assert f"{name!r} is not an activation that both A1111 and ComfyUI load" in str(error.value)
        assert allowed in str(error.value)
    with pytest.raises(ParamsError, match="call Hardswish `swish`"):
        parse_params({"train": {"hypernetwork": {"activation_func": "hardswish"}}})
    assert set(HYPERNETWORK_ACTIVATIONS) == set(COMFYUI_ACTIVATIONS)
    settings = {"add_layer_norm": True, "activation_func": "relu", "activate_output": True}
    assert parse_params({"train": {"hypernetwork": settings}}).train.hypernetwork.add_layer_norm
    assert parse_params({"train": {"methods": ["hypernetwork"]}}).train.hypernetwork.datasets == ["outlined"]
