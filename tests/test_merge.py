"""Checkpoint merging: each method against a direct tensor computation, block weights, architecture checks,
dtypes, params validation, and recipes run end to end on two random tiny-world pipelines."""

from __future__ import annotations

import json
import math

import pytest
import torch
from merge_helpers import read_all, run_recipe
from safetensors import safe_open
from safetensors.torch import load_file

from sdpipe.config import ParamsError, parse_params
from sdpipe.errors import SdpipeError
from sdpipe.io import save_safetensors
from sdpipe.merge import methods
from sdpipe.merge.blocks import BLOCK_IDS, BlockWeight, block_of
from sdpipe.merge.output import SafetensorsWriter
from sdpipe.merge.recipe import Merger
from sdpipe.merge.sources import open_checkpoint, resolve_source
from sdpipe.models.loading import file_sha256
from sdpipe.models.single_file import save_single_file


def random_tensors(count: int, shape=(6, 5), seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(count)]


def recipe_of(recipe: dict, name: str = "test"):
    return parse_params({"merge": {"recipes": {name: recipe}}}).merge.recipes[name]


# --- methods against direct computations ---------------------------------------------------------------


def test_weighted_sum_at_half_is_the_mean_and_ends_are_the_inputs():
    a, b = random_tensors(2)
    assert torch.equal(methods.weighted_sum(a, b, 0.5), (a + b) / 2)
    assert torch.equal(methods.weighted_sum(a, b, 0.0), a)
    assert torch.equal(methods.weighted_sum(a, b, 1.0), b)
    torch.testing.assert_close(methods.weighted_sum(a, b, 0.3), 0.7 * a + 0.3 * b)


def test_add_difference_of_equal_models_returns_a():
    a, b, c = random_tensors(3)
    assert torch.equal(methods.add_difference(a, b, b.clone(), 0.8), a)
    torch.testing.assert_close(methods.add_difference(a, b, c, 0.8), a + 0.8 * (b - c))


def test_triple_sum_and_sum_twice():
    a, b, c = random_tensors(3)
    torch.testing.assert_close(methods.triple_sum(a, b, c, 0.2, 0.3), 0.5 * a + 0.2 * b + 0.3 * c)
    torch.testing.assert_close(methods.sum_twice(a, b, c, 0.2, 0.3), 0.7 * (0.8 * a + 0.2 * b) + 0.3 * c)
    assert torch.equal(methods.triple_sum(a, b, c, 0.4, 0.0), methods.weighted_sum(a, b, 0.4))


def test_slerp_follows_the_arc_between_orthogonal_vectors():
    a = torch.tensor([[3.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 3.0], [0.0, 0.0]])
    middle = methods.slerp(a, b, 0.5)
    torch.testing.assert_close(middle, (a + b) * math.sin(math.pi / 4))  # sin(t * 90°) / sin(90°) each
    assert middle.norm().item() == pytest.approx(3.0)  # the weighted sum's norm would be 2.12
    third = methods.slerp(a, b, 1 / 3)
    torch.testing.assert_close(
        third, torch.tensor([[3 * math.cos(math.pi / 6), 3 * math.sin(math.pi / 6)], [0.0, 0.0]])
    )
    torch.testing.assert_close(methods.slerp(a, b, 0.0), a)
    torch.testing.assert_close(methods.slerp(a, b, 1.0), b)


def test_slerp_of_random_tensors_interpolates_angle_and_norm():
    a, b = random_tensors(2, shape=(40,))
    angle = math.acos((a @ b / (a.norm() * b.norm())).item())
    t = 0.25
    expected = (math.sin((1 - t) * angle) * a + math.sin(t * angle) * b) / math.sin(angle)
    torch.testing.assert_close(methods.slerp(a, b, t), expected)


def test_slerp_of_parallel_tensors_is_the_weighted_sum():
    a = random_tensors(1)[0]
    assert torch.equal(methods.slerp(a, 2 * a, 0.3), methods.weighted_sum(a, 2 * a, 0.3))
    zero = torch.zeros_like(a)
    assert torch.equal(methods.slerp(zero, a, 0.3), methods.weighted_sum(zero, a, 0.3))


def test_ties_elects_signs_and_averages_the_agreeing_entries():
    base = torch.zeros(4)
    first = torch.tensor([3.0, -1.0, 0.5, 2.0])
    second = torch.tensor([1.0, 2.0, -0.2, -3.0])
    # density 1: signs of the sums [4, 1, 0.3, -1] -> +, +, +, -; mean of the entries with that sign
    torch.testing.assert_close(
        methods.ties(base, [first, second], [1.0, 1.0], 1.0), torch.tensor([2.0, 2.0, 0.5, -3.0])
    )
    # density 0.5 keeps each model's two largest: [3, 0, 0, 2] and [0, 2, 0, -3]
    torch.testing.assert_close(
        methods.ties(base, [first, second], [1.0, 1.0], 0.5), torch.tensor([3.0, 2.0, 0.0, -3.0])
    )
    # weights 1 and 3: weighted sums [3, 6, 0, -7]; the agreeing entries' weighted mean
    torch.testing.assert_close(
        methods.ties(base, [first, second], [1.0, 3.0], 0.5), torch.tensor([3.0, 2.0, 0.0, -3.0])
    )
    # weights 3 and 1 flip the last entry's election: 3 * 2 - 3 = +3, and only the first model agrees
    torch.testing.assert_close(methods.ties(base, [first, second], [3.0, 1.0], 0.5), torch.tensor([3.0, 2.0, 0.0, 2.0]))


def test_ties_of_one_model_is_its_difference_scaled_onto_the_target():
    base, model, target = random_tensors(3)
    torch.testing.assert_close(
        methods.ties(base, [model], [2.0], 1.0, scale=0.5, target=target), target + 0.5 * (model - base)
    )
    trimmed = methods.trim(model - base, 0.2)
    assert int((trimmed != 0).sum()) == math.ceil(0.2 * model.numel())
    assert trimmed.abs().min() == 0 and trimmed.abs().max() == (model - base).abs().max()


def test_dare_without_drops_is_add_difference():
    a, b, c = random_tensors(3)
    generator = methods.key_generator(0, "w")
    assert torch.equal(methods.dare(c, [b], [0.7], 0.0, generator, target=a), methods.add_difference(a, b, c, 0.7))


def test_dare_is_seeded_per_key_and_rescales_what_it_keeps():
    base, model = random_tensors(2, shape=(200, 50))
    delta = model - base

    def run(seed, key):
        return methods.dare(base, [model], [1.0], 0.75, methods.key_generator(seed, key))

    merged = run(3, "model.diffusion_model.x")
    assert torch.equal(merged, run(3, "model.diffusion_model.x"))
    assert not torch.equal(merged, run(4, "model.diffusion_model.x"))
    assert not torch.equal(merged, run(3, "model.diffusion_model.y"))
    kept = merged != base
    torch.testing.assert_close(merged[kept], base[kept] + 4 * delta[kept])  # 1 / (1 - 0.75)
    assert kept.float().mean().item() == pytest.approx(0.25, abs=0.02)


def test_cosine_adaptive_keeps_a_where_the_models_agree():
    a, b = random_tensors(2)
    similarity = methods.cosine_similarity(a, b)
    torch.testing.assert_close(
        torch.tensor(similarity), torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    )
    assert methods.cosine_similarity(a, a.clone()) == 1.0
    # the most similar tensor of the model (s = high) keeps 1 - alpha of A, the least similar none
    torch.testing.assert_close(methods.cosine_adaptive(a, b, 0.25, 0.9, 0.1, 0.9), 0.75 * a + 0.25 * b)
    assert torch.equal(methods.cosine_adaptive(a, b, 0.25, 0.1, 0.1, 0.9), b)
    torch.testing.assert_close(methods.cosine_adaptive(a, b, 0.0, 0.5, 0.1, 0.9), 0.5 * a + 0.5 * b)
    assert torch.equal(methods.cosine_adaptive(a, b, 1.0, 0.9, 0.1, 0.9), b)
    assert methods.similarity_range([float(i) for i in range(101)]) == pytest.approx((1.0, 99.0))


# --- block weights -------------------------------------------------------------------------------------


def test_block_of_follows_supermerger():
    unet = "model.diffusion_model."
    assert block_of(unet + "time_embed.0.weight") == "IN00"
    assert block_of(unet + "input_blocks.0.0.weight") == "IN00"
    assert block_of(unet + "input_blocks.11.0.out_layers.3.bias") == "IN11"
    assert block_of(unet + "middle_block.2.in_layers.0.weight") == "M00"
    assert block_of(unet + "output_blocks.3.1.proj_in.weight") == "OUT03"
    assert block_of(unet + "out.2.weight") == "OUT11"
    assert block_of("first_stage_model.decoder.conv_in.weight") == "BASE"
    assert block_of("cond_stage_model.transformer.text_model.final_layer_norm.weight") == "BASE"
    assert len(BLOCK_IDS) == 26 and BLOCK_IDS[1] == "IN00" and BLOCK_IDS[13] == "M00" and BLOCK_IDS[25] == "OUT11"


TINY_KEYS = [
    "model.diffusion_model.time_embed.0.weight",
    "model.diffusion_model.input_blocks.1.1.proj_in.weight",
    "model.diffusion_model.input_blocks.3.0.in_layers.2.weight",
    "model.diffusion_model.middle_block.1.proj_out.weight",
    "model.diffusion_model.output_blocks.2.0.skip_connection.weight",
    "model.diffusion_model.out.2.weight",
    "first_stage_model.decoder.conv_in.weight",
    "cond_stage_model.transformer.text_model.final_layer_norm.weight",
]


def test_block_weights_hit_the_right_keys():
    weights = [0.0] * 26
    weights[BLOCK_IDS.index("IN01")] = 1.0  # only input_blocks.1 takes B
    weights[BLOCK_IDS.index("OUT02")] = 0.25
    weights[BLOCK_IDS.index("BASE")] = 0.5
    recipe = recipe_of({"method": "weighted_sum", "inputs": {"a": "base", "b": "base"}, "alpha": weights})
    merger = Merger(recipe, TINY_KEYS, seed=0)
    a, b = random_tensors(2)
    expected_alpha = {
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": 1.0,
        "model.diffusion_model.output_blocks.2.0.skip_connection.weight": 0.25,
        "first_stage_model.decoder.conv_in.weight": 0.5,
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": 0.5,
    }
    for key in TINY_KEYS:
        alpha = expected_alpha.get(key, 0.0)
        assert torch.equal(merger(key, {"a": a, "b": b}), methods.weighted_sum(a, b, alpha)), key


def test_block_weight_mapping_defaults_to_base_and_refuses_absent_blocks():
    weight = BlockWeight({"BASE": 0.2, "M00": 0.9}, "merge.recipes.x.alpha")
    assert weight("model.diffusion_model.middle_block.0.emb_layers.1.bias") == 0.9
    assert weight("model.diffusion_model.output_blocks.0.0.in_layers.0.weight") == 0.2
    assert weight.check_blocks(TINY_KEYS) == [b for b in BLOCK_IDS if b not in {block_of(k) for k in TINY_KEYS}]
    with pytest.raises(SdpipeError, match=r"merge\.recipes\.x\.alpha: sets a weight for IN07"):
        BlockWeight({"BASE": 0.2, "IN07": 0.9}, "merge.recipes.x.alpha").check_blocks(TINY_KEYS)
    assert BlockWeight(0.3, "k").check_blocks(TINY_KEYS) == []  # one number: nothing unused to report


# --- params ----------------------------------------------------------------------------------------------


def test_recipes_by_name_or_as_a_list():
    recipe = {
        "method": "add_difference",
        "inputs": {"a": "base", "b": "train:dreambooth", "c": "m.safetensors"},
        "alpha": 1,
    }
    by_name = parse_params({"merge": {"recipes": {"concept": recipe}}}).merge.recipes
    as_list = parse_params({"merge": {"recipes": [{"name": "concept", **recipe}]}}).merge.recipes
    assert by_name == as_list and list(by_name) == ["concept"] and by_name["concept"].name == "concept"


@pytest.mark.parametrize(
    ("recipes", "message"),
    [
        ({"x": {"method": "average", "inputs": {}}}, r"merge\.recipes\.x: .*does not match any of the expected tags"),
        (
            {"x": {"method": "weighted_sum", "inputs": {"a": "base", "b": "base"}, "alpha": [0.5] * 25}},
            r"merge\.recipes\.x\.weighted_sum\.alpha.*26 block weights",
        ),
        (
            {"x": {"method": "weighted_sum", "inputs": {"a": "base", "b": "base"}, "alpha": {"IN01": 1}}},
            r"alpha.*needs BASE",
        ),
        (
            {"x": {"method": "weighted_sum", "inputs": {"a": "base", "b": "train:dreamboot"}, "alpha": 1}},
            r"inputs\.b.*unknown training method 'dreamboot'",
        ),
        (
            {"x": {"method": "weighted_sum", "inputs": {"a": "base", "b": "base"}, "alpha": 1, "beta": 1}},
            r"weighted_sum\.beta: unknown key",
        ),
        (
            {"x": {"method": "ties", "inputs": {"base": "base", "models": ["a", "b"]}, "density": 0.5, "weights": [1]}},
            r"1 entries for 2 inputs\.models",
        ),
        ({"x": {"method": "dare", "inputs": {"base": "base", "models": ["a"]}, "drop_rate": 1.0}}, r"dare\.drop_rate"),
        (
            {"x": {"name": "y", "method": "slerp", "inputs": {"a": "base", "b": "base"}, "alpha": 0.5}},
            r"recipe 'x' has name 'y'",
        ),
        (
            {"bad/name": {"method": "slerp", "inputs": {"a": "base", "b": "base"}, "alpha": 0.5}},
            r"merge\.recipes\.bad/name",
        ),
    ],
)
def test_bad_recipes_are_refused_with_their_params_path(recipes, message):
    with pytest.raises(ParamsError, match=message):
        parse_params({"merge": {"recipes": recipes}})


# --- files ------------------------------------------------------------------------------------------------


def test_streaming_writer_matches_safetensors(tmp_path):
    tensors = {
        "b.weight": torch.randn(3, 4).to(torch.bfloat16),
        "a.bias": torch.randn(5, dtype=torch.float16),
        "c.scalar": torch.tensor(2.5),
        "d.steps": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    }
    layout = {key: (tuple(t.shape), t.dtype) for key, t in tensors.items()}
    with SafetensorsWriter(tmp_path / "x.safetensors", layout, {"format": "pt"}) as writer:
        assert writer.order == sorted(tensors)
        with pytest.raises(ValueError, match="out of order"):
            writer.write("c.scalar", tensors["c.scalar"])
        for key in writer.order:
            writer.write(key, tensors[key])
    loaded = load_file(tmp_path / "x.safetensors")
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    with safe_open(tmp_path / "x.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_folder_and_single_file_read_the_same_original_keys(tiny_sd_dir, tmp_path):
    single = save_single_file(tiny_sd_dir, tmp_path / "tiny.safetensors")
    with open_checkpoint(tiny_sd_dir, "k") as folder, open_checkpoint(single, "k") as file:
        assert folder.tensors.keys() == file.tensors.keys()
        for key in folder.tensors:
            assert folder.tensors[key].shape == file.tensors[key].shape, key
            assert torch.equal(folder.read(key), file.read(key)), key
    assert any(key.endswith("mid.attn_1.q.weight") and len(folder.tensors[key].shape) == 4 for key in folder.tensors)


def test_train_inputs_resolve_to_the_trained_model(tmp_path):
    (tmp_path / "finetune" / "model" / "diffusers").mkdir(parents=True)
    assert (
        resolve_source("train:finetune", base_model="b", train_dir=tmp_path, key="k")
        == tmp_path / "finetune" / "model" / "diffusers"
    )
    with pytest.raises(
        SdpipeError, match=r"merge\.recipes\.x\.inputs\.b 'train:dreambooth': .* no whole-model checkpoint"
    ):
        resolve_source("train:dreambooth", base_model="b", train_dir=tmp_path, key="merge.recipes.x.inputs.b")
    with pytest.raises(SdpipeError, match=r"merge\.recipes\.x\.inputs\.a './gone\.safetensors': no such file"):
        resolve_source("./gone.safetensors", base_model="b", train_dir=tmp_path, key="merge.recipes.x.inputs.a")


# --- recipes end to end ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_sd_dir(tmp_path_factory):
    from sdpipe.tinyworld.models import build_random_pipeline

    return build_random_pipeline(tmp_path_factory.mktemp("other_sd") / "pipeline", seed=1)


def test_weighted_sum_recipe_loads_with_diffusers(tiny_sd_dir, other_sd_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    from sdpipe.models.single_file import load_single_file_pipeline

    recipe = {"method": "weighted_sum", "inputs": {"a": "base", "b": str(other_sd_dir)}, "alpha": 0.5}
    out = run_recipe(recipe, tiny_sd_dir, tmp_path, name="blend")
    assert sorted(p.name for p in out.iterdir()) == ["model", "model.safetensors", "recipe.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["blend"]  # no temporary folder left behind

    merged = StableDiffusionPipeline.from_pretrained(out / "model", safety_checker=None, local_files_only=True)
    from_file = load_single_file_pipeline(out / "model.safetensors", config=out / "model")
    files = {
        "unet": "unet/diffusion_pytorch_model.safetensors",
        "vae": "vae/diffusion_pytorch_model.safetensors",
        "text_encoder": "text_encoder/model.safetensors",
    }
    for component, file in files.items():
        # the files spell the text encoder's keys as transformers 4 does (`text_model.`), its state dict here does not
        weights_a, weights_b = (
            {key.removeprefix("text_model."): value for key, value in load_file(folder / file).items()}
            for folder in (tiny_sd_dir, other_sd_dir)
        )
        for pipeline in (merged, from_file):
            weights = getattr(pipeline, component).state_dict()
            assert weights.keys() == weights_a.keys()
            for key, value in weights.items():
                assert torch.equal(value, (weights_a[key] + weights_b[key]) / 2), f"{component} {key}"
    image = merged(
        ["a red sks shape"], num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0)
    ).images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()

    record = json.loads((out / "recipe.json").read_text())
    assert record["recipe"]["method"] == "weighted_sum" and record["recipe"]["alpha"] == 0.5
    assert [item["source"] for item in record["inputs"]] == ["base", str(other_sd_dir)]
    unet_file = "unet/diffusion_pytorch_model.safetensors"
    assert record["inputs"][1]["sha256"][unet_file] == file_sha256(other_sd_dir / unet_file).hex()


def test_block_weighted_add_difference_with_mixed_dtypes(tiny_sd_dir, other_sd_dir, tmp_path):
    half_file = save_single_file(other_sd_dir, tmp_path / "other-fp16.safetensors", dtype="fp16")
    alpha = {"BASE": 0.0, "IN01": 1.0, "M00": 0.5, "OUT11": 2.0}
    recipe = {
        "method": "add_difference",
        "inputs": {"a": "base", "b": str(half_file), "c": str(tiny_sd_dir)},
        "alpha": alpha,
        "dtype": "bf16",
    }
    out = run_recipe(recipe, tiny_sd_dir, tmp_path / "out", name="blocks")
    a, b = read_all(tiny_sd_dir), read_all(half_file)
    merged = read_all(out / "model.safetensors")
    assert merged.keys() == a.keys()
    for key, value in merged.items():
        weight = alpha.get(block_of(key), 0.0)
        assert value.dtype == torch.bfloat16, key
        assert torch.equal(value, (a[key] + weight * (b[key].float() - a[key])).to(torch.bfloat16)), key
    assert torch.equal(
        merged["first_stage_model.decoder.conv_in.weight"], a["first_stage_model.decoder.conv_in.weight"].bfloat16()
    )
    with safe_open(out / "model" / "unet" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


def test_dare_recipe_without_drops_is_add_difference_and_outputs_are_bitwise_reproducible(
    tiny_sd_dir, other_sd_dir, tmp_path
):
    dare = {
        "method": "dare",
        "inputs": {"base": "base", "models": [str(other_sd_dir)]},
        "drop_rate": 0.0,
        "weights": [0.3],
    }
    add = {"method": "add_difference", "inputs": {"a": "base", "b": str(other_sd_dir), "c": "base"}, "alpha": 0.3}
    dare_out = run_recipe(dare, tiny_sd_dir, tmp_path, name="dare")
    add_out = run_recipe(add, tiny_sd_dir, tmp_path, name="add")
    dare_weights, add_weights = load_file(dare_out / "model.safetensors"), load_file(add_out / "model.safetensors")
    assert dare_weights.keys() == add_weights.keys()
    assert all(torch.equal(dare_weights[key], add_weights[key]) for key in add_weights)

    again = run_recipe(add, tiny_sd_dir, tmp_path / "again", name="add")
    for file in ("model.safetensors", "model/unet/diffusion_pytorch_model.safetensors", "recipe.json"):
        assert (again / file).read_bytes() == (add_out / file).read_bytes(), file


def test_mismatched_architectures_name_the_first_differing_key(tiny_sd_dir, tmp_path):
    weights = read_all(tiny_sd_dir)
    changed_key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    weights[changed_key] = torch.zeros(8, *weights[changed_key].shape[1:])
    save_safetensors(weights, tmp_path / "wider.safetensors")
    dropped_key = "cond_stage_model.transformer.text_model.final_layer_norm.bias"
    del weights[dropped_key]
    weights[changed_key] = read_all(tiny_sd_dir)[changed_key]
    save_safetensors(weights, tmp_path / "shorter.safetensors")

    recipe = {"method": "slerp", "inputs": {"a": "base", "b": str(tmp_path / "wider.safetensors")}, "alpha": 0.5}
    with pytest.raises(
        SdpipeError,
        match=rf"merge\.recipes\.bad: .*{changed_key}' is \[64, 64, 1, 1\] in inputs\.a .* but \[8, 64, 1, 1\] in "
        r"inputs\.b",
    ):
        run_recipe(recipe, tiny_sd_dir, tmp_path / "out", name="bad")
    recipe["inputs"]["b"] = str(tmp_path / "shorter.safetensors")
    with pytest.raises(
        SdpipeError, match=rf"merge\.recipes\.bad: .*{dropped_key}' is in inputs\.a .* but not in inputs\.b"
    ):
        run_recipe(recipe, tiny_sd_dir, tmp_path / "out", name="bad")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_each_method_of_a_recipe_runs_its_tensor_math(tmp_path):
    tensors = dict(zip(("a", "b", "c"), random_tensors(3)))
    key = "model.diffusion_model.middle_block.1.proj_out.weight"
    task = {"base": "x", "models": ["y", "z"], "target": "w"}
    cases = [
        (
            {"method": "triple_sum", "inputs": dict.fromkeys("abc", "x"), "alpha": 0.2, "beta": 0.3},
            methods.triple_sum(tensors["a"], tensors["b"], tensors["c"], 0.2, 0.3),
        ),
        (
            {"method": "sum_twice", "inputs": dict.fromkeys("abc", "x"), "alpha": 0.2, "beta": 0.3},
            methods.sum_twice(tensors["a"], tensors["b"], tensors["c"], 0.2, 0.3),
        ),
        (
            {"method": "slerp", "inputs": dict.fromkeys("ab", "x"), "alpha": 0.3},
            methods.slerp(tensors["a"], tensors["b"], 0.3),
        ),
        (
            {"method": "ties", "inputs": task, "density": 0.4, "weights": [1, 2], "scale": 0.7},
            methods.ties(tensors["c"], [tensors["a"], tensors["b"]], [1.0, 2.0], 0.4, 0.7, target=tensors["b"]),
        ),
        (
            {"method": "dare", "inputs": task, "drop_rate": 0.5, "seed": 5},
            methods.dare(
                tensors["c"],
                [tensors["a"], tensors["b"]],
                [1.0, 1.0],
                0.5,
                methods.key_generator(5, key),
                target=tensors["b"],
            ),
        ),
    ]
    roles = {
        "base": tensors["c"],
        "models[0]": tensors["a"],
        "models[1]": tensors["b"],
        "target": tensors["b"],
        **tensors,
    }
    for recipe, expected in cases:
        merger = Merger(recipe_of(recipe), TINY_KEYS, seed=0)
        assert torch.equal(merger(key, roles), expected), recipe["method"]


def test_cosine_adaptive_recipe_scales_similarities_over_the_model(tmp_path):
    a_weights = dict(zip(TINY_KEYS, random_tensors(len(TINY_KEYS), seed=1)))
    b_weights = {
        key: tensor + (index / 4) * torch.randn(tensor.shape) for index, (key, tensor) in enumerate(a_weights.items())
    }
    save_safetensors(a_weights, tmp_path / "a.safetensors")
    save_safetensors(b_weights, tmp_path / "b.safetensors")
    recipe = recipe_of({"method": "cosine_adaptive", "inputs": {"a": "x", "b": "y"}, "alpha": 0.1})
    merger = Merger(recipe, TINY_KEYS, seed=0)
    with open_checkpoint(tmp_path / "a.safetensors", "a") as a, open_checkpoint(tmp_path / "b.safetensors", "b") as b:
        merger.prepare({"a": a, "b": b}, TINY_KEYS)
    similarities = [methods.cosine_similarity(a_weights[key], b_weights[key]) for key in TINY_KEYS]
    assert similarities[0] == 1.0 and merger.similarities == dict(zip(TINY_KEYS, similarities))
    low, high = methods.similarity_range(similarities)
    for key, similarity in zip(TINY_KEYS, similarities):
        expected = methods.cosine_adaptive(a_weights[key], b_weights[key], 0.1, similarity, low, high)
        assert torch.equal(merger(key, {"a": a_weights[key], "b": b_weights[key]}), expected), key
    assert torch.equal(
        merger(TINY_KEYS[-1], {"a": a_weights[TINY_KEYS[-1]], "b": b_weights[TINY_KEYS[-1]]}), b_weights[TINY_KEYS[-1]]
    )


def test_architecture_folder_must_fit_the_inputs(tiny_sd_dir):
    from sdpipe.merge.output import check_fits, diffusers_layout

    layout = diffusers_layout(tiny_sd_dir, "merge.recipes.x.config")
    with open_checkpoint(tiny_sd_dir, "k") as checkpoint:
        shapes = {key: stored.shape for key, stored in checkpoint.tensors.items()}
    check_fits(layout, shapes, tiny_sd_dir, "merge.recipes.x")
    missing = "first_stage_model.decoder.mid.attn_1.q.weight"
    with pytest.raises(
        SdpipeError,
        match=rf"merge\.recipes\.x: .*its vae has '{missing}' and the inputs do not; set merge\.recipes\.x\.config",
    ):
        check_fits(
            layout, {key: shape for key, shape in shapes.items() if key != missing}, tiny_sd_dir, "merge.recipes.x"
        )


def test_a_failing_recipe_leaves_the_previous_output_and_nothing_partial(
    tiny_sd_dir, other_sd_dir, tmp_path, monkeypatch
):
    import sdpipe.merge.recipe

    def fail(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(sdpipe.merge.recipe, "write_diffusers_folder", fail)
    (tmp_path / "blend").mkdir()
    (tmp_path / "blend" / "recipe.json").write_text("{}")
    recipe = {"method": "weighted_sum", "inputs": {"a": "base", "b": str(other_sd_dir)}, "alpha": 0.5}
    with pytest.raises(RuntimeError, match="disk full"):
        run_recipe(recipe, tiny_sd_dir, tmp_path, name="blend")
    assert [p.name for p in tmp_path.iterdir()] == ["blend"]
    assert [p.name for p in (tmp_path / "blend").iterdir()] == ["recipe.json"]
