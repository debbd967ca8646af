"""LoRA recipes of the merge stage: bake-in against the direct formula, extraction recovering a baked LoRA, resize
against the truncated SVD, refusals, and the three recipes end to end on the tiny SD pipeline (loaded in diffusers)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from merge_helpers import read_all, run_recipe
from safetensors import safe_open

from sdpipe.config import ParamsError, parse_params
from sdpipe.errors import SdpipeError
from sdpipe.formats import kohya
from sdpipe.io import save_safetensors
from sdpipe.merge.lora import (
    LoraBaker,
    ModelLayer,
    extract_lora,
    load_lora,
    resize_lora,
    resolve_lora_source,
)
from sdpipe.models.loading import file_sha256

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run faster on one thread


def randn(generator: torch.Generator, *shape, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=generator)


def random_lora(shapes: dict[str, tuple[int, ...]], rank: int, alpha: float, seed: int, scale: float = 1.0):
    """Kohya LoRA tensors of the given rank for layers of the given weight shapes (convs get LoCon 4-D factors)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        ones = [1] * (len(shape) - 2)
        tensors[f"{name}.lora_down.weight"] = randn(generator, rank, *shape[1:], scale=scale)
        tensors[f"{name}.lora_up.weight"] = randn(generator, shape[0], rank, *ones, scale=scale)
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    return tensors


def direct_delta(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """up · down × alpha / rank, written out."""
    down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
    rank = down.shape[0]
    return (up.flatten(1) @ down.flatten(1) * tensors[f"{name}.alpha"] / rank).reshape(shape)


def saved_lora(tensors, path, role="loras[0]"):
    kohya.save_kohya_lora(tensors, path, {"ss_network_dim": "4", "ss_training_comment": "test"})
    return load_lora(role, str(path), path, "merge.recipes.test")


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).norm() / expected.norm()).item()


# Small random "models": a linear, a 1x1 conv and a 3x3 conv layer, under original-layout keys.
LAYERS = {
    "lora_unet_a_to_q": ModelLayer("model.diffusion_model.a.to_q.weight", (24, 20)),
    "lora_unet_a_proj_in": ModelLayer("model.diffusion_model.a.proj_in.weight", (16, 16, 1, 1)),
    "lora_unet_b_conv1": ModelLayer("model.diffusion_model.b.conv1.weight", (12, 6, 3, 3)),
    "lora_te_text_model_encoder_layers_0_mlp_fc1": ModelLayer(
        "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight", (32, 16)
    ),
}
SHAPES = {name: layer.shape for name, layer in LAYERS.items()}


def random_model(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weights = {layer.key: randn(generator, *layer.shape) for layer in LAYERS.values()}
    weights["model.diffusion_model.a.to_q.bias"] = randn(generator, 24)
    return weights


def bake(weights, baker) -> dict[str, torch.Tensor]:
    return {key: baker(key, {"model": tensor}) for key, tensor in weights.items()}


# --- bake-in -----------------------------------------------------------------------------------------------


def test_bake_adds_strength_times_up_down_alpha_over_rank(tmp_path):
    weights = random_model()
    first = random_lora(SHAPES, rank=4, alpha=2.0, seed=1)
    second = random_lora({"lora_unet_a_to_q": (24, 20)}, rank=3, alpha=3.0, seed=2)
    loras = [saved_lora(first, tmp_path / "a.safetensors"), saved_lora(second, tmp_path / "b.safetensors", "loras[1]")]
    baker = LoraBaker(None, loras, [0.7, -0.3], LAYERS, set(weights), "merge.recipes.test")
    baked = bake(weights, baker)

    for name, layer in LAYERS.items():
        expected = weights[layer.key] + 0.7 * direct_delta(first, name, layer.shape)
        if name == "lora_unet_a_to_q":
            expected = expected - 0.3 * direct_delta(second, name, layer.shape)
        torch.testing.assert_close(baked[layer.key], expected, rtol=1e-5, atol=1e-5)
        assert (baked[layer.key] - weights[layer.key]).abs().max() > 0.1, name
    bias = "model.diffusion_model.a.to_q.bias"
    assert baked[bias] is weights[bias]  # tensors no LoRA adapts come back untouched
    assert baker.layer_counts() == {"loras[0]": 4, "loras[1]": 1}


def test_bake_applies_loha_and_dora_layers(tmp_path):
    generator = torch.Generator().manual_seed(3)
    weights = random_model()
    rank, alpha = 2, 1.0
    loha = {
        "lora_unet_a_to_q.hada_w1_a": randn(generator, 24, rank),
        "lora_unet_a_to_q.hada_w1_b": randn(generator, rank, 20),
        "lora_unet_a_to_q.hada_w2_a": randn(generator, 24, rank),
        "lora_unet_a_to_q.hada_w2_b": randn(generator, rank, 20),
        "lora_unet_a_to_q.alpha": torch.tensor(alpha),
    }
    dora = random_lora({"lora_te_text_model_encoder_layers_0_mlp_fc1": (32, 16)}, rank=2, alpha=2.0, seed=4)
    dora_scale = randn(generator, 32, 1).abs() + 0.5
    dora["lora_te_text_model_encoder_layers_0_mlp_fc1.dora_scale"] = dora_scale
    baker = LoraBaker(
        None, [saved_lora({**loha, **dora}, tmp_path / "l.safetensors")], [0.5], LAYERS, set(weights), "k"
    )
    baked = bake(weights, baker)

    w1 = loha["lora_unet_a_to_q.hada_w1_a"] @ loha["lora_unet_a_to_q.hada_w1_b"]
    w2 = loha["lora_unet_a_to_q.hada_w2_a"] @ loha["lora_unet_a_to_q.hada_w2_b"]
    key = LAYERS["lora_unet_a_to_q"].key
    torch.testing.assert_close(baked[key], weights[key] + 0.5 * w1 * w2 * alpha / rank)

    key = LAYERS["lora_te_text_model_encoder_layers_0_mlp_fc1"].key
    updated = weights[key] + direct_delta(dora, "lora_te_text_model_encoder_layers_0_mlp_fc1", (32, 16))
    renormalized = dora_scale * updated / updated.norm(dim=1, keepdim=True)
    torch.testing.assert_close(baked[key], weights[key] + 0.5 * (renormalized - weights[key]))


def test_bake_refuses_the_first_layer_that_matches_no_model_weight(tmp_path):
    tensors = random_lora(
        {"lora_unet_a_to_q": (24, 20), "lora_unet_input_blocks_1_1_proj_in": (16, 16), "lora_unet_zz": (4, 4)},
        rank=2,
        alpha=2.0,
        seed=5,
    )
    lora = saved_lora(tensors, tmp_path / "x.safetensors")
    with pytest.raises(
        SdpipeError,
        match=r"merge\.recipes\.test\.inputs\.loras\[0\] \(.*x\.safetensors: .*\): LoRA layer "
        r"'lora_unet_input_blocks_1_1_proj_in' matches no linear or conv layer",
    ):
        LoraBaker(None, [lora], [1.0], LAYERS, set(random_model()), "merge.recipes.test")


def test_a_layer_of_the_wrong_shape_is_refused_naming_it(tmp_path):
    tensors = random_lora({"lora_unet_a_to_q": (24, 21)}, rank=2, alpha=2.0, seed=6)
    weights = random_model()
    baker = LoraBaker(None, [saved_lora(tensors, tmp_path / "t.safetensors")], [1.0], LAYERS, set(weights), "k")
    message = r"k\.inputs\.loras\[0\] .*'lora_unet_a_to_q' does not fit the model's \[24, 20\] weight"
    with pytest.raises(SdpipeError, match=message):
        bake(weights, baker)


def test_diffusers_layout_files_are_refused(tmp_path):
    path = tmp_path / "pytorch_lora_weights.safetensors"
    kohya.save_kohya_lora({"unet.down_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 4)}, path, {})
    with pytest.raises(SdpipeError, match=r"'unet\.down_blocks.*' is not a kohya LoRA key .* give the kohya file"):
        load_lora("lora", str(path), path, "merge.recipes.test")


# --- extraction and resize -------------------------------------------------------------------------------


def extract(tuned, base, rank, conv_rank=None, min_diff=0.0):
    return extract_lora(
        tuned.__getitem__,
        base.__getitem__,
        LAYERS,
        rank=rank,
        conv_rank=rank if conv_rank is None else conv_rank,
        min_diff=min_diff,
        dtype=torch.float32,
    )


def test_bake_then_extract_at_the_rank_recovers_the_lora(tmp_path):
    rank = 4
    base = random_model()
    adapted = {name: shape for name, shape in SHAPES.items() if name != "lora_unet_a_proj_in"}
    tensors = random_lora(adapted, rank=rank, alpha=1.0, seed=7)
    baker = LoraBaker(None, [saved_lora(tensors, tmp_path / "l.safetensors")], [0.8], LAYERS, set(base), "k")
    tuned = bake(base, baker)

    extracted, report = extract(tuned, base, rank)
    assert sorted(report) == sorted(adapted)  # the layer that no LoRA touched does not differ: left out
    deltas = kohya.delta_weights(extracted)
    for name, shape in adapted.items():
        assert extracted[f"{name}.alpha"].item() == rank
        assert extracted[f"{name}.lora_down.weight"].shape == (rank, *shape[1:])
        assert extracted[f"{name}.lora_up.weight"].shape == (shape[0], rank, *[1] * (len(shape) - 2))
        assert relative_error(deltas[name].reshape(shape), 0.8 * direct_delta(tensors, name, shape)) < 1e-4, name
        assert report[name] == {"rank": rank, "retained": pytest.approx(1.0, abs=1e-5)}

    # A lower rank keeps the largest singular values: the share of the norm the report gives.
    extracted, report = extract(tuned, base, rank=2, conv_rank=0)
    assert "lora_unet_b_conv1" not in report  # conv_rank 0 leaves the 3x3 conv out
    name = "lora_unet_a_to_q"
    singular_values = torch.linalg.svdvals(tuned[LAYERS[name].key] - base[LAYERS[name].key])
    kept = (singular_values[:2].square().sum() / singular_values.square().sum()).sqrt().item()
    assert report[name] == {"rank": 2, "retained": pytest.approx(kept, abs=1e-5)} and kept < 0.99


def test_min_diff_leaves_out_layers_that_barely_differ():
    base = random_model()
    tuned = dict(base)
    tuned[LAYERS["lora_unet_a_to_q"].key] = base[LAYERS["lora_unet_a_to_q"].key] + 1e-3
    tuned[LAYERS["lora_unet_b_conv1"].key] = base[LAYERS["lora_unet_b_conv1"].key] * 1.5
    assert sorted(extract(tuned, base, rank=2)[1]) == ["lora_unet_a_to_q", "lora_unet_b_conv1"]
    assert sorted(extract(tuned, base, rank=2, min_diff=0.01)[1]) == ["lora_unet_b_conv1"]


def test_resize_is_the_truncated_svd_of_each_update(tmp_path):
    tensors = random_lora(SHAPES, rank=6, alpha=3.0, seed=8)
    tensors.update(random_lora({"lora_unet_a_proj_in": (16, 16, 1, 1)}, rank=2, alpha=2.0, seed=9))
    lora = saved_lora(tensors, tmp_path / "big.safetensors", role="lora")
    resized, report = resize_lora(lora, LAYERS, rank=3, conv_rank=3, dtype=torch.float32, key="k")
    deltas = kohya.delta_weights(resized)
    for name, shape in SHAPES.items():
        delta = direct_delta(tensors, name, shape).double()
        u, s, vh = torch.linalg.svd(delta.flatten(1), full_matrices=False)
        rank = 2 if name == "lora_unet_a_proj_in" else 3  # a layer of lower rank keeps its rank
        truncated = (u[:, :rank] * s[:rank]) @ vh[:rank]
        assert resized[f"{name}.lora_down.weight"].shape[0] == rank
        assert relative_error(deltas[name].flatten(1).double(), truncated) < 1e-4, name
        kept = (s[:rank].square().sum() / s.square().sum()).sqrt().item()
        assert report[name] == {"rank": rank, "retained": pytest.approx(kept, abs=1e-5)}
    assert report["lora_unet_a_to_q"]["retained"] < 0.99 and report["lora_unet_a_proj_in"]["retained"] > 0.99999

    resized, report = resize_lora(lora, LAYERS, rank=3, conv_rank=0, dtype=torch.float16, key="k")
    assert "lora_unet_b_conv1" not in report and len(report) == 3
    assert {tensor.dtype for tensor in resized.values()} == {torch.float16}


# Layers big enough that every algorithm's factors are thinner than its update (the factored SVD is taken).
FACTORED_LAYERS = {
    "lora_unet_c_to_k": ModelLayer("model.diffusion_model.c.to_k.weight", (48, 40)),
    "lora_unet_c_conv2": ModelLayer("model.diffusion_model.c.conv2.weight", (24, 8, 3, 3)),
}


def algorithm_parts(algorithm: str, shape: tuple[int, ...], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One layer's parts for each LoRA algorithm (LyCORIS shapes), rank 3 (LoHa: 3 and 2), a non-trivial alpha."""
    out, inner, kernel = shape[0], shape[1], list(shape[2:])
    flat_in = math.prod(shape[1:])
    conv = [1] * len(kernel)
    parts = {
        "lora": {"lora_down.weight": (3, inner, *kernel), "lora_up.weight": (out, 3, *conv)},
        "locon_tucker": {
            "lora_down.weight": (3, inner, 1, 1), "lora_mid.weight": (3, 3, *kernel), "lora_up.weight": (out, 3, 1, 1)
        },
        "loha": {"hada_w1_a": (out, 3), "hada_w1_b": (3, flat_in), "hada_w2_a": (out, 2), "hada_w2_b": (2, flat_in)},
        "loha_tucker": {
            "hada_w1_a": (3, out), "hada_w1_b": (3, inner), "hada_t1": (3, 3, *kernel),
            "hada_w2_a": (2, out), "hada_w2_b": (2, inner), "hada_t2": (2, 2, *kernel),
        },
        "lokr_full": {"lokr_w1": (4, 2), "lokr_w2": (out // 4, inner // 2, *kernel)},
        "lokr_factored": {
            "lokr_w1_a": (4, 1), "lokr_w1_b": (1, 2),
            "lokr_w2_a": (out // 4, 3), "lokr_w2_b": (3, inner // 2 * math.prod(kernel)),
        },
        "lokr_tucker": {
            "lokr_w1": (4, 2), "lokr_w2_a": (3, out // 4), "lokr_w2_b": (3, inner // 2), "lokr_t2": (3, 3, *kernel)
        },
    }[algorithm]
    tensors = {part: torch.randn(*part_shape, generator=generator) for part, part_shape in parts.items()}
    tensors["alpha"] = torch.tensor(-1.5 if algorithm.startswith("lokr") else 2.0)  # a negative scale too
    return tensors


def dense_update(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The layer's update as `kohya.delta_weights` makes it (LoKr-Tucker written out: `kohya.lokr_delta` hands
    `torch.kron` the non-contiguous Tucker product, which it refuses)."""
    parts = {key.removeprefix(f"{name}."): t for key, t in tensors.items() if key.startswith(f"{name}.")}
    if "lokr_t2" in parts:
        w2 = kohya.tucker(parts["lokr_t2"], parts["lokr_w2_a"], parts["lokr_w2_b"]).contiguous()
        return torch.kron(parts["lokr_w1"][:, :, None, None], w2) * parts["alpha"] / parts["lokr_w2_b"].shape[0]
    return kohya.delta_weights({f"{name}.{part}": t for part, t in parts.items()})[name]


ALGORITHMS = ["lora", "locon_tucker", "loha", "loha_tucker", "lokr_full", "lokr_factored", "lokr_tucker"]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_resize_from_factors_is_the_dense_truncated_svd(tmp_path, monkeypatch, algorithm):
    def dense_svd(*args):
        raise AssertionError("the dense SVD was taken")

    monkeypatch.setattr("sdpipe.merge.lora.low_rank", dense_svd)
    generator = torch.Generator().manual_seed(ALGORITHMS.index(algorithm))
    tensors = {}
    for name, layer in FACTORED_LAYERS.items():
        if algorithm.endswith("tucker") and len(layer.shape) == 2:
            continue  # Tucker factors are for convs
        tensors.update({f"{name}.{part}": t for part, t in algorithm_parts(algorithm, layer.shape, generator).items()})
    lora = saved_lora(tensors, tmp_path / f"{algorithm}.safetensors", role="lora")
    resized, report = resize_lora(lora, FACTORED_LAYERS, rank=2, conv_rank=2, dtype=torch.float32, key="k")
    deltas = kohya.delta_weights(resized)
    for name in kohya.group_by_layer(tensors):
        shape = FACTORED_LAYERS[name].shape
        dense = dense_update(tensors, name)
        u, s, vh = torch.linalg.svd(dense.reshape(shape[0], -1).double(), full_matrices=False)
        rank = 2  # every algorithm's update here has rank 3 or more
        truncated = (u[:, :rank] * s[:rank]) @ vh[:rank]
        assert s[rank] < 0.999 * s[rank - 1]  # a distinct cut: the truncated SVD is unique
        assert resized[f"{name}.lora_down.weight"].shape == (rank, *shape[1:])
        assert relative_error(deltas[name].reshape(shape[0], -1).double(), truncated) < 1e-5, name
        kept = (s[:rank].square().sum() / s.square().sum()).sqrt().item()
        assert report[name] == {"rank": rank, "retained": pytest.approx(kept, abs=1e-5)}


def test_resize_keeps_the_rank_an_update_has(tmp_path):
    """A LoHa of ranks 2 and 1 has an update of rank at most 2: resized to 4, it stays at 2 and exact."""
    generator = torch.Generator().manual_seed(3)
    shape = FACTORED_LAYERS["lora_unet_c_to_k"].shape
    parts = {"hada_w1_a": (48, 2), "hada_w1_b": (2, 40), "hada_w2_a": (48, 1), "hada_w2_b": (1, 40)}
    tensors = {f"lora_unet_c_to_k.{part}": torch.randn(*size, generator=generator) for part, size in parts.items()}
    lora = saved_lora(tensors, tmp_path / "loha.safetensors", role="lora")
    resized, report = resize_lora(lora, FACTORED_LAYERS, rank=4, conv_rank=4, dtype=torch.float32, key="k")
    assert report["lora_unet_c_to_k"] == {"rank": 2, "retained": pytest.approx(1.0, abs=1e-6)}
    dense = kohya.delta_weights(tensors)["lora_unet_c_to_k"]
    assert relative_error(kohya.delta_weights(resized)["lora_unet_c_to_k"].reshape(shape), dense) < 1e-5


def test_resize_refuses_factors_that_do_not_fit_the_layer(tmp_path):
    tensors = random_lora({"lora_unet_c_to_k": (40, 48)}, rank=2, alpha=2.0, seed=12)  # transposed: same size
    lora = saved_lora(tensors, tmp_path / "t.safetensors", "lora")
    with pytest.raises(SdpipeError, match=r"'lora_unet_c_to_k' does not fit the model's \[48, 40\] weight"):
        resize_lora(lora, FACTORED_LAYERS, rank=1, conv_rank=1, dtype=torch.float32, key="k")


def test_resize_refuses_dora_and_layers_outside_the_architecture(tmp_path):
    tensors = random_lora({"lora_unet_a_to_q": (24, 20)}, rank=2, alpha=2.0, seed=10)
    dora = {**tensors, "lora_unet_a_to_q.dora_scale": torch.ones(24, 1)}
    lora = saved_lora(dora, tmp_path / "d.safetensors", "lora")
    with pytest.raises(SdpipeError, match=r"layer 'lora_unet_a_to_q' is DoRA .*\(lora_bake\)"):
        resize_lora(lora, LAYERS, rank=1, conv_rank=1, dtype=torch.float32, key="k")
    other = {**tensors, **random_lora({"lora_unet_mid_x": (4, 4)}, rank=2, alpha=2.0, seed=11)}
    lora = saved_lora(other, tmp_path / "o.safetensors", "lora")
    with pytest.raises(SdpipeError, match=r"k\.inputs\.lora .*'lora_unet_mid_x' matches no .* of the architecture"):
        resize_lora(lora, LAYERS, rank=1, conv_rank=1, dtype=torch.float32, key="k")


# --- params ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        (
            {"method": "lora_bake", "inputs": {"model": "base", "loras": ["a.safetensors"]}, "strength": [1, 2]},
            r"strength has 2 entries for 1 inputs\.loras",
        ),
        ({"method": "lora_bake", "inputs": {"model": "base", "loras": ["train:dreambooth"]}}, "is not a LoRA"),
        ({"method": "lora_resize", "inputs": {"lora": "x.pt"}, "rank": 4}, "kohya-format .safetensors"),
        ({"method": "lora_extract", "inputs": {"tuned": "train:finetune", "base": "base"}, "rank": 0}, "rank"),
        ({"method": "lora_extract", "inputs": {"tuned": "a", "base": "b"}, "rank": 4, "conv_rank": -1}, "conv_rank"),
    ],
)
def test_bad_lora_recipes_are_refused_with_their_params_path(recipe, message):
    with pytest.raises(ParamsError, match=r"merge\.recipes\.bad") as error:
        parse_params({"merge": {"recipes": {"bad": recipe}}})
    assert error.match(message)


def test_train_lora_resolves_to_the_trained_kohya_file(tmp_path):
    from sdpipe.methods.lora import LORA_FILE

    with pytest.raises(SdpipeError, match=r"k 'train:lora': .*lora\.safetensors does not exist; is lora in train"):
        resolve_lora_source("train:lora", train_dir=tmp_path, key="k")
    path = tmp_path / "lora" / "model" / LORA_FILE
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")
    assert resolve_lora_source("train:lora", train_dir=tmp_path, key="k") == path
    with pytest.raises(SdpipeError, match=r"k 'gone\.safetensors': no such file"):
        resolve_lora_source("gone.safetensors", train_dir=tmp_path, key="k")


# --- recipes end to end on the tiny SD pipeline ----------------------------------------------------------


# UNet attention, a 3x3 resnet conv, a 1x1 conv, conv_in, the time embedding, and the text encoder
TINY_LORA_LAYERS = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k"
    ),
    "lora_unet_mid_block_attentions_0_proj_in": "middle_block.1.proj_in",
    "lora_unet_up_blocks_1_resnets_0_conv1": "output_blocks.2.0.in_layers.2",
    "lora_unet_conv_in": "input_blocks.0.0",
    "lora_unet_time_embedding_linear_1": "time_embed.0",
    # diffusers reads a kohya text encoder LoRA only when it has an out_proj layer ("to_out_lora" tells its format)
    "lora_te_text_model_encoder_layers_1_self_attn_q_proj": "encoder.layers.1.self_attn.q_proj",
    "lora_te_text_model_encoder_layers_1_self_attn_out_proj": "encoder.layers.1.self_attn.out_proj",
}


def tiny_lora_layers(weights: dict[str, torch.Tensor]) -> dict[str, str]:
    """Kohya name → original key of the tiny LoRA's layers."""
    keys = {}
    for name, path in TINY_LORA_LAYERS.items():
        if name.startswith("lora_te_"):
            keys[name] = f"cond_stage_model.transformer.text_model.{path}.weight"
        else:
            keys[name] = f"model.diffusion_model.{path}.weight"
        assert keys[name] in weights, keys[name]
    return keys


def unet_output(pipe) -> torch.Tensor:
    ids = pipe.tokenizer(
        ["a red sks shape"], padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return pipe.unet(latents, 500, pipe.text_encoder(ids)[0]).sample


def test_bake_extract_and_resize_recipes_on_the_tiny_model(tiny_sd_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    base = read_all(tiny_sd_dir)
    keys = tiny_lora_layers(base)
    rank = 2
    tensors = random_lora({name: tuple(base[key].shape) for name, key in keys.items()}, rank, 1.0, 12, scale=0.1)
    lora_path = tmp_path / "lora.safetensors"
    kohya.save_kohya_lora(tensors, lora_path, {})

    # bake: the model's weights plus strength × ΔW, every other tensor as it was
    bake = {"method": "lora_bake", "inputs": {"model": "base", "loras": [str(lora_path)]}, "strength": 0.5}
    baked_dir = run_recipe(bake, tiny_sd_dir, tmp_path, name="baked")
    assert sorted(p.name for p in baked_dir.iterdir()) == ["model", "model.safetensors", "recipe.json"]
    baked = read_all(baked_dir / "model.safetensors")
    assert baked.keys() == base.keys()
    for key, value in baked.items():
        names = [name for name, layer_key in keys.items() if layer_key == key]
        expected = base[key] + 0.5 * direct_delta(tensors, names[0], base[key].shape) if names else base[key]
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-6, msg=key)
    assert torch.equal(read_all(baked_dir / "model")[keys["lora_unet_conv_in"]], baked[keys["lora_unet_conv_in"]])
    record = json.loads((baked_dir / "recipe.json").read_text())
    assert record["inputs"][1]["role"] == "loras[0]" and record["baked_layers"] == {"loras[0]": len(keys)}
    assert record["inputs"][1]["sha256"] == {"lora.safetensors": file_sha256(lora_path).hex()}

    # extract: tuned − base at the LoRA's rank gives the baked update back
    extract = {"method": "lora_extract", "inputs": {"tuned": str(baked_dir / "model"), "base": "base"}, "rank": rank}
    extract_dir = run_recipe(extract, tiny_sd_dir, tmp_path, name="extracted")
    assert sorted(p.name for p in extract_dir.iterdir()) == ["lora.safetensors", "recipe.json"]
    extracted, metadata = kohya.load_kohya_lora(extract_dir / "lora.safetensors")
    assert metadata["ss_network_dim"] == "2" and json.loads(metadata["ss_network_args"])["conv_dim"] == "2"
    deltas = kohya.delta_weights(extracted)
    assert deltas.keys() == keys.keys()
    for name, key in keys.items():
        expected = 0.5 * direct_delta(tensors, name, base[key].shape)
        assert relative_error(deltas[name].reshape(expected.shape), expected) < 1e-4, name

    # ... which diffusers loads, and which acts as the baked model does
    baked_pipe = StableDiffusionPipeline.from_pretrained(baked_dir / "model", safety_checker=None)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    base_output = unet_output(pipe)
    pipe.load_lora_weights(str(extract_dir), weight_name="lora.safetensors")
    baked_output = unet_output(baked_pipe)
    assert (baked_output - base_output).abs().max() > 1e-3
    torch.testing.assert_close(unet_output(pipe), baked_output, rtol=1e-4, atol=1e-4)

    # resize: rank 1, each layer's retained share reported
    resize = {"method": "lora_resize", "inputs": {"lora": str(extract_dir / "lora.safetensors")}, "rank": 1}
    resize_dir = run_recipe(resize, tiny_sd_dir, tmp_path, name="small")
    resized, metadata = kohya.load_kohya_lora(resize_dir / "lora.safetensors")
    assert {tensor.shape[0] for key, tensor in resized.items() if key.endswith("lora_down.weight")} == {1}
    assert metadata["ss_network_dim"] == "1" and "resize" in metadata["ss_training_comment"]
    layers = json.loads((resize_dir / "recipe.json").read_text())["layers"]
    assert layers.keys() == keys.keys()
    assert all(0.5 < layer["retained"] < 1.0 and layer["rank"] == 1 for layer in layers.values())


def test_lora_recipes_that_fail_leave_no_output(tiny_sd_dir, tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "recipe.json").write_text("{}")
    extract = {"method": "lora_extract", "inputs": {"tuned": "base", "base": str(tiny_sd_dir)}, "rank": 4}
    message = r"merge\.recipes\.bad: inputs\.tuned .* differ in no linear or conv layer .*: there is nothing to extract"
    with pytest.raises(SdpipeError, match=message):
        run_recipe(extract, tiny_sd_dir, tmp_path, name="bad")

    lora_path = tmp_path / "sdxl.safetensors"
    kohya.save_kohya_lora(
        random_lora({"lora_unet_input_blocks_4_1_proj_in": (64, 64), "lora_unet_conv_in": (64, 4, 3, 3)}, 2, 1.0, 13),
        lora_path,
        {},
    )
    bake = {"method": "lora_bake", "inputs": {"model": "base", "loras": [str(lora_path)]}}
    with pytest.raises(
        SdpipeError,
        match=r"merge\.recipes\.bad\.inputs\.loras\[0\] .*: LoRA layer 'lora_unet_input_blocks_4_1_proj_in' matches "
        r"no linear or conv layer of the model's UNet or text encoder",
    ):
        run_recipe(bake, tiny_sd_dir, tmp_path, name="bad")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "sdxl.safetensors"]
    assert [p.name for p in (tmp_path / "bad").iterdir()] == ["recipe.json"]


def test_extracted_lora_metadata_and_dtype(tiny_sd_dir, tmp_path):
    base = read_all(tiny_sd_dir)
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_v.weight"
    tuned = dict(base)
    tuned[key] = base[key] + 0.1 * torch.randn(base[key].shape, generator=torch.Generator().manual_seed(14))
    save_safetensors(tuned, tmp_path / "tuned.safetensors")
    extract = {
        "method": "lora_extract",
        "inputs": {"tuned": str(tmp_path / "tuned.safetensors"), "base": "base"},
        "rank": 3,
        "dtype": "fp16",
    }
    out = run_recipe(extract, tiny_sd_dir, tmp_path, name="x")
    with safe_open(out / "lora.safetensors", "pt") as f:
        assert sorted(f.keys()) == [
            f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v.{part}"
            for part in ("alpha", "lora_down.weight", "lora_up.weight")
        ]
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
        metadata = f.metadata()
    assert metadata["ss_network_module"] == "networks.lora" and "ss_network_args" not in metadata
    assert json.loads(metadata["sdpipe_merge_recipe"])["rank"] == 3
    record = json.loads((out / "recipe.json").read_text())
    assert [item["role"] for item in record["inputs"]] == ["tuned", "base"]
    (layer,) = record["layers"].values()
    assert layer["rank"] == 3 and 0.0 < layer["retained"] < 1.0
