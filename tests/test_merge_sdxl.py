"""Merging SDXL models: every whole-model method against the tensor-wise formula on every key (both text encoders
included), folder and single-file inputs alike, SDXL's own block list, LoRA bake / extract / resize with kohya's SDXL
names, the refusal of recipes that mix families, and outputs that plain diffusers loads."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from merge_helpers import read_all, run_recipe
from safetensors.torch import load_file

from sdpipe.config import ParamsError, parse_params
from sdpipe.errors import SdpipeError
from sdpipe.formats import kohya
from sdpipe.merge import methods
from sdpipe.merge.blocks import BLOCK_LISTS, BlockWeight, block_of
from sdpipe.merge.lora import model_layers
from sdpipe.merge.sources import open_checkpoint
from sdpipe.models.single_file import save_single_file
from sdpipe.tinyworld.models import build_random_sdxl_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

SDXL_IDS = BLOCK_LISTS["sdxl"].ids
COMPONENT_FILES = (
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
    "text_encoder_2/model.safetensors",
)


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    """Three random tiny SDXL folders (a, b, c) and the single files of a and b."""
    root = tmp_path_factory.mktemp("merge_sdxl")
    folders = {name: build_random_sdxl_pipeline(root / name, seed=seed) for seed, name in enumerate("abc")}
    files = {f"{name}.safetensors": save_single_file(folders[name], root / f"{name}.safetensors") for name in "ab"}
    return {**folders, **files}


# --- whole-model merges --------------------------------------------------------------------------------


def test_an_sdxl_folder_reads_as_its_single_file_under_the_sgm_keys(xl):
    with open_checkpoint(xl["a"], "k") as folder, open_checkpoint(xl["a.safetensors"], "k") as single:
        assert folder.family.name == single.family.name == "sdxl"
        assert folder.tensors.keys() == single.tensors.keys()
        for key in folder.tensors:
            assert folder.tensors[key].shape == single.tensors[key].shape, key
            assert torch.equal(folder.read(key), single.read(key)), key
    prefixes = ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.", "conditioner.embedders.1.")
    assert all(key.startswith(prefixes) for key in folder.tensors)
    assert all(any(key.startswith(prefix) for key in folder.tensors) for prefix in prefixes)
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in folder.tensors
    assert "conditioner.embedders.1.model.text_projection" in folder.tensors
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in folder.tensors


def test_weighted_sum_of_two_sdxl_models_is_the_formula_on_every_key_and_loads_in_diffusers(xl, tmp_path):
    recipe = {"method": "weighted_sum", "inputs": {"a": str(xl["a"]), "b": str(xl["b"])}, "alpha": 0.3}
    out = run_recipe(recipe, xl["a"], tmp_path, name="blend")
    assert sorted(p.name for p in out.iterdir()) == ["model", "model.safetensors", "recipe.json"]

    a, b = load_file(xl["a.safetensors"]), load_file(xl["b.safetensors"])
    merged = load_file(out / "model.safetensors")
    assert merged.keys() == a.keys()
    assert any(key.startswith("conditioner.embedders.0.") for key in merged)
    assert any(key.startswith("conditioner.embedders.1.") for key in merged)
    for key, value in merged.items():
        assert torch.equal(value, (1 - 0.3) * a[key] + 0.3 * b[key]), key
    for file in COMPONENT_FILES:  # the diffusers folder, text_encoder_2's q/k/v and projection cut back out
        a_part, b_part = load_file(xl["a"] / file), load_file(xl["b"] / file)
        merged_part = load_file(out / "model" / file)
        assert merged_part.keys() == a_part.keys(), file
        for key, value in merged_part.items():
            assert torch.equal(value, (1 - 0.3) * a_part[key] + 0.3 * b_part[key]), f"{file} {key}"

    folder = StableDiffusionXLPipeline.from_pretrained(out / "model", local_files_only=True)
    single = StableDiffusionXLPipeline.from_single_file(
        str(out / "model.safetensors"), config=str(out / "model"), local_files_only=True
    )
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        expected, read = getattr(folder, name).state_dict(), getattr(single, name).state_dict()
        assert expected.keys() == read.keys()
        assert all(torch.equal(expected[key], read[key]) for key in expected), name
    image = folder(
        "a red circle", num_inference_steps=2, height=32, width=32, output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()
    record = json.loads((out / "recipe.json").read_text())
    assert "text_encoder_2/model.safetensors" in record["inputs"][1]["sha256"]


def test_folder_and_single_file_inputs_give_the_same_merge(xl, tmp_path):
    folders = run_recipe(
        {"method": "add_difference", "inputs": {"a": str(xl["a"]), "b": str(xl["b"]), "c": str(xl["c"])}, "alpha": 0.7},
        xl["a"], tmp_path / "folders",
    )
    files = run_recipe(
        {
            "method": "add_difference",
            "inputs": {"a": str(xl["a.safetensors"]), "b": str(xl["b.safetensors"]), "c": str(xl["c"])},
            "alpha": 0.7,
        },
        xl["a"], tmp_path / "files",
    )
    from_folders, from_files = load_file(folders / "model.safetensors"), load_file(files / "model.safetensors")
    assert from_folders.keys() == from_files.keys()
    assert all(torch.equal(from_folders[key], from_files[key]) for key in from_folders)
    for file in COMPONENT_FILES:
        assert (folders / "model" / file).read_bytes() == (files / "model" / file).read_bytes(), file


@pytest.mark.parametrize(
    ("method", "settings"),
    [
        ("triple_sum", {"alpha": 0.2, "beta": 0.3}),
        ("sum_twice", {"alpha": 0.2, "beta": 0.3}),
        ("slerp", {"alpha": 0.4}),
        ("cosine_adaptive", {"alpha": 0.1}),
        ("ties", {"density": 0.5, "weights": [1.0, 2.0]}),
        ("dare", {"drop_rate": 0.5, "weights": [0.5, 0.5], "seed": 3}),
    ],
)
def test_every_merge_method_runs_on_sdxl_tensor_by_tensor(method, settings, xl, tmp_path):
    if method in ("ties", "dare"):
        inputs = {"base": str(xl["a"]), "models": [str(xl["b.safetensors"]), str(xl["c"])]}
    elif method in ("triple_sum", "sum_twice"):
        inputs = {"a": str(xl["a"]), "b": str(xl["b.safetensors"]), "c": str(xl["c"])}
    else:
        inputs = {"a": str(xl["a"]), "b": str(xl["b.safetensors"])}
    out = run_recipe({"method": method, "inputs": inputs, **settings}, xl["a"], tmp_path)
    a, b, c = read_all(xl["a"]), read_all(xl["b"]), read_all(xl["c"])
    merged = load_file(out / "model.safetensors")
    assert merged.keys() == a.keys()
    if method == "cosine_adaptive":  # its weights depend on the whole model's similarities: every key from A and B
        similarities = {key: methods.cosine_similarity(a[key], b[key]) for key in a}
        low, high = methods.similarity_range(list(similarities.values()))
    for key, value in merged.items():
        match method:
            case "triple_sum":
                expected = methods.triple_sum(a[key], b[key], c[key], 0.2, 0.3)
            case "sum_twice":
                expected = methods.sum_twice(a[key], b[key], c[key], 0.2, 0.3)
            case "slerp":
                expected = methods.slerp(a[key], b[key], 0.4)
            case "cosine_adaptive":
                expected = methods.cosine_adaptive(a[key], b[key], 0.1, similarities[key], low, high)
            case "ties":
                expected = methods.ties(a[key], [b[key], c[key]], [1.0, 2.0], 0.5)
            case "dare":
                generator = methods.key_generator(3, key)
                expected = methods.dare(a[key], [b[key], c[key]], [0.5, 0.5], 0.5, generator)
        assert torch.equal(value, expected), key
    StableDiffusionXLPipeline.from_pretrained(out / "model", local_files_only=True)


# --- block weights ---------------------------------------------------------------------------------------


def test_sdxl_block_list_follows_supermerger_on_the_real_architecture():
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from sdpipe.models.sdxl_configs import SDXL_UNET
    from sdpipe.models.single_file import unet_to_original

    assert SDXL_IDS == ("BASE", *(f"IN0{i}" for i in range(9)), "M00", *(f"OUT0{i}" for i in range(9)))
    with init_empty_weights():
        unet = UNet2DConditionModel(**SDXL_UNET)
    keys = [f"model.diffusion_model.{key}" for key in unet_to_original(unet.state_dict(), unet.config)]
    assert {block_of(key, "sdxl") for key in keys} == set(SDXL_IDS) - {"BASE"}  # input/output_blocks 0-8, every one
    unet = "model.diffusion_model."
    assert block_of(unet + "label_emb.0.0.weight", "sdxl") == "IN00"
    assert block_of(unet + "time_embed.2.bias", "sdxl") == "IN00"
    assert block_of(unet + "input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight", "sdxl") == "IN08"
    assert block_of(unet + "middle_block.1.proj_in.weight", "sdxl") == "M00"
    assert block_of(unet + "output_blocks.8.0.skip_connection.weight", "sdxl") == "OUT08"
    assert block_of(unet + "out.2.weight", "sdxl") == "OUT08"
    assert block_of("conditioner.embedders.1.model.text_projection", "sdxl") == "BASE"
    assert block_of("first_stage_model.decoder.conv_in.weight", "sdxl") == "BASE"


@pytest.mark.parametrize("form", ["list", "mapping"])
def test_sdxl_block_weights_apply_per_block(form, xl, tmp_path):
    weights = {"BASE": 0.1, "IN00": 0.9, "IN04": 1.0, "M00": 0.5, "OUT02": 0.25, "OUT08": 0.7}
    alpha = [weights.get(block, 0.1) for block in SDXL_IDS] if form == "list" else weights
    recipe = {"method": "weighted_sum", "inputs": {"a": str(xl["a.safetensors"]), "b": str(xl["b"])}, "alpha": alpha}
    out = run_recipe(recipe, xl["a"], tmp_path)
    a, b = read_all(xl["a"]), read_all(xl["b"])
    merged = load_file(out / "model.safetensors")
    for key, value in merged.items():
        assert torch.equal(value, methods.weighted_sum(a[key], b[key], weights.get(block_of(key, "sdxl"), 0.1))), key
    # the tiny SDXL UNet's own blocks (input_blocks.4 is its second downsampler) and those supermerger puts elsewhere
    unet = "model.diffusion_model."
    for key, alpha in [
        (unet + "input_blocks.4.0.op.weight", 1.0),
        (unet + "label_emb.0.0.weight", 0.9),
        (unet + "time_embed.0.weight", 0.9),
        (unet + "out.2.weight", 0.7),
        (unet + "output_blocks.2.1.proj_out.weight", 0.25),
        ("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight", 0.1),
        ("conditioner.embedders.0.transformer.text_model.final_layer_norm.weight", 0.1),
    ]:
        assert torch.equal(merged[key], (1 - alpha) * a[key] + alpha * b[key]), key


def test_block_weights_of_the_wrong_family_are_refused_by_params_key(xl, tiny_sd_dir, tmp_path):
    sd_list = [0.5] * 26
    recipe = {"method": "weighted_sum", "inputs": {"a": str(xl["a"]), "b": str(xl["b"])}, "alpha": sd_list}
    with pytest.raises(SdpipeError, match=r"merge\.recipes\.test\.alpha: 26 block weights, but the inputs are SDXL "
                       r"models, whose block list has 20 \(SDXL: BASE, IN00-IN08, M00, OUT00-OUT08"):
        run_recipe(recipe, xl["a"], tmp_path)
    recipe["alpha"] = {"BASE": 0.5, "IN10": 1.0}
    with pytest.raises(SdpipeError, match=r"merge\.recipes\.test\.alpha: sets a weight for IN10, which is not in the "
                       r"block list of SDXL"):
        run_recipe(recipe, xl["a"], tmp_path)
    recipe["alpha"] = {"BASE": 0.5, "IN07": 1.0}  # SDXL's, but the tiny UNet has input_blocks 0-5 only
    with pytest.raises(SdpipeError, match=r"merge\.recipes\.test\.alpha: sets a weight for IN07, which this model"):
        run_recipe(recipe, xl["a"], tmp_path)
    recipe = {"method": "weighted_sum", "inputs": {"a": "base", "b": "base"}, "alpha": [0.5] * 20}
    with pytest.raises(SdpipeError, match=r"merge\.recipes\.test\.alpha: 20 block weights, but the inputs are SD "
                       r"1\.x/2\.x models, whose block list has 26"):
        run_recipe(recipe, tiny_sd_dir, tmp_path)
    assert not (tmp_path / "test").exists()
    with pytest.raises(ParamsError, match=r"merge\.recipes\.x\.weighted_sum\.alpha.*26 block weights .* or 20 \(SDXL"):
        parse_params({"merge": {"recipes": {"x": {"method": "weighted_sum", "inputs": {"a": "a", "b": "b"},
                                                  "alpha": [0.5] * 19}}}})
    assert BlockWeight([0.0] * 20, "k", "sdxl")("model.diffusion_model.out.0.bias") == 0.0


# --- LoRA recipes with kohya's SDXL names --------------------------------------------------------------


def sdxl_lora(config_folder, rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random kohya SDXL LoRA on attention, conv and MLP layers of the UNet and both text encoders (LoCon on the
    3x3 convs), with alpha = rank / 2."""
    layers = model_layers(config_folder, "config")
    names = [
        "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q",
        "lora_unet_input_blocks_5_1_transformer_blocks_1_attn2_to_k",
        "lora_unet_middle_block_1_proj_in",
        "lora_unet_output_blocks_0_1_transformer_blocks_0_ff_net_2",
        "lora_unet_input_blocks_1_0_in_layers_2",  # the first ResNet's 3x3 conv1
        "lora_unet_output_blocks_2_0_skip_connection",
        # whole attention layers of both text encoders, as kohya trains them (diffusers tells the format of a text
        # encoder's LoRA keys by its out_proj); SDXL's second one's q, k, v: thirds of OpenCLIP's in_proj_weight
        *(f"lora_te{i}_text_model_encoder_layers_0_self_attn_{part}_proj" for i in (1, 2) for part in ("q", "k", "v", "out")),
        "lora_te1_text_model_encoder_layers_1_mlp_fc2",
        "lora_te2_text_model_encoder_layers_1_mlp_fc1",
    ]
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in names:
        shape = layers[name].shape
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, *shape[1:], generator=generator) * 0.1
        ones = [1] * (len(shape) - 2)
        tensors[f"{name}.lora_up.weight"] = torch.randn(shape[0], rank, *ones, generator=generator) * 0.1
        tensors[f"{name}.alpha"] = torch.tensor(rank / 2)
    return tensors


@pytest.fixture(scope="module")
def xl_lora(xl, tmp_path_factory):
    path = tmp_path_factory.mktemp("sdxl_lora") / "lora.safetensors"
    kohya.save_kohya_lora(sdxl_lora(xl["a"]), path, {"ss_base_model_version": kohya.SDXL_BASE_MODEL_VERSION})
    return path


def test_sdxl_model_layers_have_kohyas_sdxl_names(xl):
    layers = model_layers(xl["a"], "config")
    prefixes = {name.split("_")[1] for name in layers}
    assert prefixes == {"unet", "te1", "te2"}
    # SGM module paths: input_blocks…, middle_block…, output_blocks…, time_embed…, label_emb…, out…
    assert {name.split("_")[2] for name in layers if name.startswith("lora_unet_")} == {
        "input", "middle", "output", "time", "label", "out"}
    assert "lora_unet_input_blocks_4_0_op" in layers and "lora_unet_output_blocks_1_2_conv" in layers
    q, k = layers["lora_te2_text_model_encoder_layers_0_self_attn_q_proj"], layers[
        "lora_te2_text_model_encoder_layers_0_self_attn_k_proj"]
    assert q.key == k.key == "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    assert (q.part, k.part, q.parts) == (0, 1, 3)
    assert not any("text_projection" in name for name in layers)  # no kohya LoRA layer


def test_lora_bake_on_sdxl_equals_diffusers_models_with_the_lora_merged(xl, xl_lora, tmp_path):
    recipe = {"method": "lora_bake", "inputs": {"model": str(xl["a.safetensors"]), "loras": [str(xl_lora)]},
              "strength": 0.8, "config": str(xl["a"])}
    out = run_recipe(recipe, xl["a"], tmp_path, name="baked")
    assert json.loads((out / "recipe.json").read_text())["baked_layers"] == {"loras[0]": 16}

    # the same LoRA merged by sdpipe's kohya reader into the diffusers models (as sampling with a LoRA does)
    expected = StableDiffusionXLPipeline.from_pretrained(xl["a"], local_files_only=True)
    tensors, _ = kohya.load_kohya_lora(xl_lora)
    names = kohya.sdxl_unet_names(kohya.model_kohya_names(expected.unet, "unet").values(), expected.unet.config)
    baked = StableDiffusionXLPipeline.from_pretrained(out / "model", local_files_only=True)
    base = StableDiffusionXLPipeline.from_pretrained(xl["a"], local_files_only=True)
    for name in ("unet", "text_encoder", "text_encoder_2"):
        merged = kohya.merge_lora(getattr(expected, name), name, kohya.from_sdxl_names(tensors, names), strength=0.8)
        assert merged, name
        want, got, before = (getattr(p, name).state_dict() for p in (expected, baked, base))
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-6)
        changed = [key for key in want if not torch.equal(got[key], before[key])]
        assert len(changed) == len(merged), name  # exactly the LoRA's layers changed
    single = load_file(out / "model.safetensors")
    assert any(key.startswith("conditioner.embedders.1.") for key in single)


def test_lora_extract_of_a_bake_gives_the_lora_back_with_kohya_sdxl_keys(xl, xl_lora, tmp_path):
    baked = run_recipe(
        {"method": "lora_bake", "inputs": {"model": str(xl["a"]), "loras": [str(xl_lora)]}, "strength": 1.0},
        xl["a"], tmp_path, name="baked",
    )
    out = run_recipe(
        {"method": "lora_extract", "inputs": {"tuned": str(baked / "model.safetensors"), "base": str(xl["a"])},
         "rank": 4},
        xl["a"], tmp_path, name="extracted",
    )
    extracted, metadata = kohya.load_kohya_lora(out / "lora.safetensors")
    original, _ = kohya.load_kohya_lora(xl_lora)
    assert metadata["ss_base_model_version"] == kohya.SDXL_BASE_MODEL_VERSION
    assert set(kohya.group_by_layer(extracted)) == set(kohya.group_by_layer(original))
    want, got = kohya.delta_weights(original), kohya.delta_weights(extracted)
    for name, delta in want.items():
        got_delta = got[name].reshape(delta.shape)
        assert ((got_delta - delta).norm() / delta.norm()).item() < 1e-4, name

    # diffusers reads the extracted file's names back to an adapter on every one of its layers
    pipeline = StableDiffusionXLPipeline.from_pretrained(xl["a"], local_files_only=True)
    pipeline.load_lora_weights(str(out), weight_name="lora.safetensors")
    adapted = sum(
        1
        for component in (pipeline.unet, pipeline.text_encoder, pipeline.text_encoder_2)
        for module in component.modules()
        if hasattr(module, "lora_A") and len(module.lora_A)
    )
    assert adapted == len(kohya.group_by_layer(extracted))


def test_lora_resize_on_sdxl_keeps_the_keys(xl, xl_lora, tmp_path):
    out = run_recipe({"method": "lora_resize", "inputs": {"lora": str(xl_lora)}, "rank": 2}, xl["a"], tmp_path)
    resized, metadata = kohya.load_kohya_lora(out / "lora.safetensors")
    original, _ = kohya.load_kohya_lora(xl_lora)
    assert resized.keys() == original.keys()
    assert all(resized[key].shape[0] == 2 for key in resized if key.endswith("lora_down.weight"))
    assert metadata["ss_base_model_version"] == kohya.SDXL_BASE_MODEL_VERSION
    same = run_recipe({"method": "lora_resize", "inputs": {"lora": str(xl_lora)}, "rank": 4}, xl["a"], tmp_path,
                      name="same")
    want, got = kohya.delta_weights(original), kohya.delta_weights(kohya.load_kohya_lora(same / "lora.safetensors")[0])
    for name, delta in want.items():
        torch.testing.assert_close(got[name], delta, rtol=1e-4, atol=1e-6)


# --- families --------------------------------------------------------------------------------------------


def test_a_recipe_that_mixes_families_is_refused_before_any_work(xl, xl_lora, tiny_sd_dir, tmp_path):
    sd_file = save_single_file(tiny_sd_dir, tmp_path / "sd.safetensors")
    recipe = {"method": "weighted_sum", "inputs": {"a": str(sd_file), "b": str(xl["b"])}, "alpha": 0.5}
    with pytest.raises(
        SdpipeError,
        match=rf"merge\.recipes\.test: the inputs are of different model families: inputs\.a \({sd_file}: {sd_file}\) "
        rf"is Stable Diffusion 1\.x/2\.x and inputs\.b \({xl['b']}: {xl['b']}\) is Stable Diffusion XL",
    ):
        run_recipe(recipe, tiny_sd_dir, tmp_path)
    recipe = {"method": "lora_bake", "inputs": {"model": "base", "loras": [str(xl_lora)]}}
    with pytest.raises(SdpipeError, match=rf"inputs\.loras\[0\] \({xl_lora}: {xl_lora}\): LoRA layer .* matches no "
                       rf"linear or conv layer .*: inputs\.loras\[0\] is a Stable Diffusion XL LoRA and inputs\.model "
                       rf"\(base: {tiny_sd_dir}\) is Stable Diffusion 1\.x/2\.x"):
        run_recipe(recipe, tiny_sd_dir, tmp_path)
    recipe = {"method": "slerp", "inputs": {"a": str(xl["a.safetensors"]), "b": str(xl["b.safetensors"])},
              "alpha": 0.5}  # single files, and the base model (the architecture folder) is SD
    with pytest.raises(SdpipeError, match=r"the inputs are Stable Diffusion XL models .* but the architecture folder "
                       rf"{tiny_sd_dir} is Stable Diffusion 1\.x/2\.x; set merge\.recipes\.test\.config"):
        run_recipe(recipe, tiny_sd_dir, tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["sd.safetensors"]
