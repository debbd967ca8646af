"""The kohya/A1111/LyCORIS LoRA format: names, weight updates, peft conversion, and loading in diffusers."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model
from safetensors.torch import save_file
from transformers import CLIPTextModel

from sdpipe.formats import diffusers_lora, kohya

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
CONVS = ["down_blocks.0.resnets.0.conv1", "down_blocks.0.downsamplers.0.conv", "up_blocks.0.resnets.0.conv_shortcut"]
TEXT_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run faster on one thread


def load_pipe(tiny_sd_dir) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)


# ---------------------------------------------------------------------------------------------------------
# Names


def test_names_follow_kohya():
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert kohya.kohya_name("unet", path) == "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert kohya.kohya_name("unet", "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0") == (
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0"
    )
    expected = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert kohya.kohya_name("text_encoder", "encoder.layers.0.self_attn.q_proj") == expected  # transformers 5
    assert kohya.kohya_name("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj") == expected  # older
    expected = "lora_te2_text_model_encoder_layers_3_mlp_fc1"
    assert kohya.kohya_name("text_encoder_2", "encoder.layers.3.mlp.fc1") == expected
    assert kohya.split_key("lora_unet_conv_in.lora_down.weight") == ("lora_unet_conv_in", "lora_down.weight")
    with pytest.raises(ValueError, match="unknown component"):
        kohya.kohya_name("vae", "encoder.conv_in")


def test_names_map_back_to_every_layer_of_the_models(tiny_sd_dir):
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir / "unet")
    text_encoder = CLIPTextModel.from_pretrained(tiny_sd_dir / "text_encoder")
    for model, component in ((unet, "unet"), (text_encoder, "text_encoder")):
        layers = [p for p, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        names = kohya.model_kohya_names(model, component)
        assert len(names) == len(layers) > 10
        assert all(names[kohya.kohya_name(component, path)] == path for path in layers)  # the round trip
    # State dict keys work too; paths that differ only in `_` versus `.` cannot share a file.
    assert kohya.kohya_names("unet", ["conv_in.weight"]) == {"lora_unet_conv_in": "conv_in"}
    with pytest.raises(ValueError, match="same kohya name"):
        kohya.kohya_names("unet", ["a.b_c", "a_b.c"])


# ---------------------------------------------------------------------------------------------------------
# Weight updates, against direct computations


GENERATOR = torch.Generator().manual_seed(0)


def randn(*shape) -> torch.Tensor:
    return torch.randn(*shape, generator=GENERATOR)


def test_lora_update_is_up_times_down_times_alpha_over_rank():
    down, up = randn(4, 6), randn(5, 4)
    conv_down, conv_up = randn(2, 3, 3, 3), randn(5, 2, 1, 1)
    tensors = {
        "lora_unet_a.lora_down.weight": down,
        "lora_unet_a.lora_up.weight": up,
        "lora_unet_a.alpha": torch.tensor(2.0),
        "lora_unet_conv.lora_down.weight": conv_down,
        "lora_unet_conv.lora_up.weight": conv_up,  # no alpha: scale 1
    }
    deltas = kohya.delta_weights(tensors)
    torch.testing.assert_close(deltas["lora_unet_a"], up @ down * 2.0 / 4)
    expected = torch.zeros(5, 3, 3, 3)
    for r in range(2):  # each rank's 1x1 up channel times its kxk down filter
        expected += conv_up[:, r, 0, 0, None, None, None] * conv_down[r][None]
    torch.testing.assert_close(deltas["lora_unet_conv"], expected)


def test_loha_update_is_a_hadamard_product():
    w1a, w1b, w2a, w2b = randn(5, 3), randn(3, 6), randn(5, 3), randn(3, 6)
    tensors = {"lora_unet_a.hada_w1_a": w1a, "lora_unet_a.hada_w1_b": w1b, "lora_unet_a.hada_w2_a": w2a}
    tensors |= {"lora_unet_a.hada_w2_b": w2b, "lora_unet_a.alpha": torch.tensor(1.5)}
    [(name, delta)] = kohya.delta_weights(tensors).items()
    expected = torch.tensor([[(w1a[i] @ w1b[:, j]) * (w2a[i] @ w2b[:, j]) for j in range(6)] for i in range(5)])
    torch.testing.assert_close(delta, expected * 1.5 / 3)
    # A conv layer's update comes flat unless the base weight gives its shape.
    conv = {key.replace("_a.", "_conv."): value for key, value in tensors.items()}
    conv["lora_unet_conv.hada_w1_b"], conv["lora_unet_conv.hada_w2_b"] = w1b.repeat(1, 9), w2b.repeat(1, 9)
    assert kohya.delta_weights(conv)["lora_unet_conv"].shape == (5, 54)
    shaped = kohya.delta_weights(conv, {"lora_unet_conv": torch.zeros(5, 6, 3, 3)})
    assert shaped["lora_unet_conv"].shape == (5, 6, 3, 3)


def test_lokr_update_is_a_kronecker_product():
    w1, w2a, w2b = randn(2, 3), randn(4, 2), randn(2, 5)
    factored = {"lora_unet_a.lokr_w1": w1, "lora_unet_a.lokr_w2_a": w2a, "lora_unet_a.lokr_w2_b": w2b}
    factored["lora_unet_a.alpha"] = torch.tensor(3.0)
    w2 = w2a @ w2b
    expected = torch.einsum("ac,bd->abcd", w1, w2).reshape(8, 15)  # [a·4 + b, c·5 + d] = w1[a, c] w2[b, d]
    torch.testing.assert_close(kohya.delta_weights(factored)["lora_unet_a"], expected * 3.0 / 2)
    # Without a factored matrix there is no rank: the scale is 1 whatever alpha says (A1111, ComfyUI).
    full = {"lora_unet_a.lokr_w1": w1, "lora_unet_a.lokr_w2": w2, "lora_unet_a.alpha": torch.tensor(3.0)}
    torch.testing.assert_close(kohya.delta_weights(full)["lora_unet_a"], expected)
    # A conv layer: a 2-D w1 and a 4-D w2.
    conv_w2 = randn(4, 5, 3, 3)
    conv = {"lora_unet_c.lokr_w1": w1, "lora_unet_c.lokr_w2": conv_w2}
    expected = torch.einsum("ac,bdkl->abcdkl", w1, conv_w2).reshape(8, 15, 3, 3)
    torch.testing.assert_close(kohya.delta_weights(conv)["lora_unet_c"], expected)


def test_dora_renormalizes_the_updated_weight_on_the_axis_its_scale_names():
    weight, down, up = randn(5, 6), randn(2, 6), randn(5, 2)
    updated = weight + up @ down
    out_scale, in_scale = torch.rand(5, 1, generator=GENERATOR) + 0.5, torch.rand(1, 6, generator=GENERATOR) + 0.5
    tensors = {"lora_unet_a.lora_down.weight": down, "lora_unet_a.lora_up.weight": up}
    tensors |= {"lora_unet_a.alpha": torch.tensor(2.0)}
    by_output = kohya.delta_weights({**tensors, "lora_unet_a.dora_scale": out_scale}, {"lora_unet_a": weight})
    expected = torch.stack([updated[i] * out_scale[i, 0] / updated[i].norm() for i in range(5)]) - weight
    torch.testing.assert_close(by_output["lora_unet_a"], expected)
    by_input = kohya.delta_weights({**tensors, "lora_unet_a.dora_scale": in_scale}, {"lora_unet_a": weight})
    expected = torch.stack([updated[:, j] * in_scale[0, j] / updated[:, j].norm() for j in range(6)], dim=1) - weight
    torch.testing.assert_close(by_input["lora_unet_a"], expected)
    with pytest.raises(ValueError, match="lora_unet_a: a DoRA layer"):
        kohya.delta_weights({**tensors, "lora_unet_a.dora_scale": out_scale})


def test_unknown_parts_are_refused():
    with pytest.raises(ValueError, match="unknown LoRA part"):
        kohya.delta_weights({"lora_unet_a.lora_down.weight": randn(2, 3), "lora_unet_a.oft_blocks": randn(2)})
    with pytest.raises(ValueError, match="no LoRA, LoHa or LoKr weights"):
        kohya.delta_weights({"lora_unet_a.alpha": torch.tensor(1.0)})


# ---------------------------------------------------------------------------------------------------------
# peft adapters → kohya tensors


ADAPTERS = {
    "lora": LoraConfig(r=4, lora_alpha=2, target_modules=ATTENTION + CONVS, init_lora_weights=False),
    "dora": LoraConfig(r=4, lora_alpha=2, target_modules=ATTENTION + CONVS, init_lora_weights=False, use_dora=True),
    "loha": LoHaConfig(r=4, alpha=2, target_modules=ATTENTION + CONVS, init_weights=False),
    "lokr": LoKrConfig(r=4, alpha=2, target_modules=ATTENTION + CONVS, init_weights=False),  # w2 factored
    "lokr-full": LoKrConfig(r=8, alpha=2, target_modules=ATTENTION, init_weights=False),  # nothing factored
}
PARTS = {
    "lora": {"lora_down.weight", "lora_up.weight", "alpha"},
    "dora": {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
    "lokr": {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"},
    "lokr-full": {"lokr_w1", "lokr_w2", "alpha"},
}


def adapted_layers(model):
    return {path: module for path, module in model.named_modules() if hasattr(module, "get_delta_weight")}


def perturb_magnitudes(model) -> None:
    """A fresh DoRA magnitude equals the weight norm (DoRA then is LoRA); make it differ."""
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "lora_magnitude_vector", None) and "default" in module.lora_magnitude_vector:
                weight = module.lora_magnitude_vector["default"].weight
                weight.mul_(1 + 0.2 * torch.rand(weight.shape, generator=GENERATOR))


@pytest.mark.parametrize("algorithm", list(ADAPTERS))
def test_peft_adapters_become_the_same_updates(tiny_sd_dir, algorithm):
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir / "unet")
    inject_adapter_in_model(ADAPTERS[algorithm], unet)
    perturb_magnitudes(unet)
    tensors = kohya.peft_to_kohya(unet, "unet")
    assert {key.split(".", 1)[1] for key in tensors} == PARTS[algorithm]
    layers = adapted_layers(unet)
    base = {kohya.kohya_name("unet", path): layer.get_base_layer().weight for path, layer in layers.items()}
    deltas = kohya.delta_weights(tensors, base)
    assert set(deltas) == set(base)
    for path, layer in layers.items():
        with torch.no_grad():
            if algorithm == "dora":  # peft's own merge renormalizes
                weight = layer.get_base_layer().weight.clone()
                layer.merge()
                expected = layer.get_base_layer().weight - weight
                layer.unmerge()
            else:
                expected = layer.get_delta_weight("default")
        assert expected.abs().max() > 1e-4, path
        torch.testing.assert_close(deltas[kohya.kohya_name("unet", path)], expected, atol=1e-6, rtol=1e-5)


def unet_output(pipe: StableDiffusionPipeline) -> torch.Tensor:
    ids = pipe.tokenizer(["a red sks shape"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return pipe.unet(latents, 500, pipe.text_encoder(ids)[0]).sample


def test_a_kohya_lora_loads_in_diffusers_and_acts_as_the_peft_adapter(tiny_sd_dir, tmp_path):
    base_output = unet_output(load_pipe(tiny_sd_dir))
    adapted = load_pipe(tiny_sd_dir)
    inject_adapter_in_model(ADAPTERS["lora"], adapted.unet)
    text_config = LoraConfig(r=4, lora_alpha=8, target_modules=TEXT_ATTENTION, init_lora_weights=False)
    inject_adapter_in_model(text_config, adapted.text_encoder)
    peft_output = unet_output(adapted)
    assert (peft_output - base_output).abs().max() > 1e-3

    tensors = {**kohya.peft_to_kohya(adapted.unet, "unet"), **kohya.peft_to_kohya(adapted.text_encoder, "text_encoder")}
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in tensors
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in tensors
    path = tmp_path / "lora.safetensors"
    kohya.save_kohya_lora(tensors, path, {"ss_network_dim": "4"})
    loaded, metadata = kohya.load_kohya_lora(path)
    assert metadata == {"ss_network_dim": "4"} and loaded.keys() == tensors.keys()

    pipe = load_pipe(tiny_sd_dir)
    pipe.load_lora_weights(str(tmp_path), weight_name=path.name)
    torch.testing.assert_close(unet_output(pipe), peft_output, atol=1e-5, rtol=1e-5)

    merged = load_pipe(tiny_sd_dir)  # baked into the weights, as the merge stage does
    assert len(kohya.merge_lora(merged.unet, "unet", loaded)) == len(adapted_layers(adapted.unet))
    assert len(kohya.merge_lora(merged.text_encoder, "text_encoder", loaded)) == 12
    torch.testing.assert_close(unet_output(merged), peft_output, atol=1e-5, rtol=1e-5)


def adapted_modules(model) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(isinstance(module, BaseTunerLayer) for module in model.modules())


@pytest.mark.parametrize("exact_names", [False, True])
def test_the_diffusers_layout_spells_text_model_and_loads_with_every_key_used(tiny_sd_dir, tmp_path, exact_names):
    """`text_encoder.text_model.…` keys (ComfyUI's key map, diffusers before transformers 5); both forms are read."""
    adapted = load_pipe(tiny_sd_dir)
    inject_adapter_in_model(ADAPTERS["lora"], adapted.unet)
    text_layers = TEXT_ATTENTION + ["fc1", "fc2"]  # kohya's CLIPAttention + CLIPMLP; fc1 at another rank and alpha
    text_config = LoraConfig(
        r=4, lora_alpha=8, target_modules=text_layers, init_lora_weights=False, rank_pattern={"fc1": 2},
        alpha_pattern={"fc1": 3.0},
    )
    inject_adapter_in_model(text_config, adapted.text_encoder)
    peft_output = unet_output(adapted)
    tensors = {**kohya.peft_to_kohya(adapted.unet, "unet"), **kohya.peft_to_kohya(adapted.text_encoder, "text_encoder")}

    module_paths = diffusers_lora.model_module_paths(tiny_sd_dir) if exact_names else None
    converted, metadata = diffusers_lora.kohya_to_diffusers(tensors, {}, module_paths)
    text_keys = [key for key in converted if key.startswith("text_encoder.")]
    assert len(text_keys) == 2 * 3 * len(text_layers)  # lora_A and lora_B of 3 layers
    assert all(key.startswith("text_encoder.text_model.encoder.layers.") for key in text_keys)
    save_file(converted, tmp_path / "peft.safetensors", metadata)
    pipe = load_pipe(tiny_sd_dir)
    pipe.load_lora_weights(str(tmp_path), weight_name="peft.safetensors")
    assert adapted_modules(pipe.unet) == adapted_modules(adapted.unet)  # no key left unused
    assert adapted_modules(pipe.text_encoder) == 3 * len(text_layers)
    torch.testing.assert_close(unet_output(pipe), peft_output, atol=1e-5, rtol=1e-5)

    without_prefix = {key.replace(".text_model.", "."): tensor for key, tensor in converted.items()}
    for keys in (converted, without_prefix):  # diffusers' own spelling under transformers 5 reads the same
        back, _ = diffusers_lora.diffusers_to_kohya(keys, metadata)
        assert back.keys() == tensors.keys()
        for key in tensors:
            torch.testing.assert_close(back[key], tensors[key], atol=0, rtol=0)


def test_merge_refuses_names_of_another_model(tiny_sd_dir):
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir / "unet")
    tensors = {"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": randn(2, 3)}
    with pytest.raises(ValueError, match="match no layer of the unet: lora_unet_input_blocks_1_1_proj_in"):
        kohya.merge_lora(unet, "unet", tensors)
    assert kohya.merge_lora(unet, "text_encoder", tensors) == []  # other components' tensors are left out


def test_files_are_reproducible_and_metadata_is_text(tmp_path):
    tensors = {"lora_unet_a.lora_down.weight": randn(2, 3), "lora_unet_a.alpha": torch.tensor(2.0)}
    metadata = {f"ss_key_{i}": str(i) for i in range(20)}
    kohya.save_kohya_lora(tensors, tmp_path / "a.safetensors", metadata)
    kohya.save_kohya_lora(tensors, tmp_path / "b.safetensors", dict(reversed(metadata.items())))
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    with pytest.raises(TypeError, match="ss_network_dim"):
        kohya.save_kohya_lora(tensors, tmp_path / "c.safetensors", {"ss_network_dim": 8})
    assert not (tmp_path / "c.safetensors").exists()


def test_lokr_with_a_tucker_conv_factor_gives_the_kronecker_product():
    """LyCORIS LoKr of a 3x3 conv with `use_tucker`: w2 is a Tucker product (a permuted view out of einsum), which
    torch.kron could not reshape before it was made contiguous."""
    torch.manual_seed(0)
    parts = {
        "lokr_w1": torch.randn(2, 2),
        "lokr_t2": torch.randn(4, 4, 3, 3),
        "lokr_w2_a": torch.randn(4, 8),
        "lokr_w2_b": torch.randn(4, 6),
    }
    delta, rank = kohya.lokr_delta(parts)
    w2 = torch.einsum("ijkl,ip,jr->prkl", parts["lokr_t2"], parts["lokr_w2_a"], parts["lokr_w2_b"])
    expected = torch.kron(parts["lokr_w1"][:, :, None, None], w2.contiguous())
    assert rank == 4 and delta.shape == (16, 12, 3, 3)
    torch.testing.assert_close(delta, expected)
