"""Diffusers folder <-> original-layout single-file checkpoint: key names, shapes, dtype, metadata, round trip."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdpipe.errors import SdpipeError
from sdpipe.models.sd15 import SD15_UNET, SD15_VAE
from sdpipe.models.single_file import (
    load_single_file_pipeline,
    load_single_file_state_dict,
    open_clip_text_encoder_to_original,
    save_single_file,
    unet_to_original,
    vae_to_original,
)

PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.transformer.",
}



@pytest.fixture(scope="module")
def changed_pipeline(tiny_sd_dir):
    """The tiny pipeline with every UNet/VAE/text-encoder weight changed, so that equal weights after the
    round trip can only have come from the file, not from the config folder's own weights."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, local_files_only=True)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for model in (pipe.unet, pipe.vae, pipe.text_encoder):
            for param in model.parameters():
                param.add_(torch.randn(param.shape, generator=generator))
    return pipe


@pytest.fixture(scope="module")
def single_file(changed_pipeline, tmp_path_factory):
    path = tmp_path_factory.mktemp("single_file") / "model.safetensors"
    save_single_file(changed_pipeline, path, metadata={"sdpipe.stage": "export", "base": "tiny"})
    return path


def test_round_trip_restores_every_tensor(changed_pipeline, single_file, tiny_sd_dir):
    loaded = load_single_file_pipeline(single_file, config=tiny_sd_dir)
    for name in PREFIXES:
        original, restored = getattr(changed_pipeline, name).state_dict(), getattr(loaded, name).state_dict()
        assert restored.keys() == original.keys(), name
        unequal = [key for key in original if not torch.equal(original[key], restored[key])]
        assert unequal == [], f"{name}: {unequal[:5]}"


def test_from_single_file_as_the_readme_types_it(single_file, tiny_sd_dir):
    """A user's call names the file and the config folder, nothing else: every component of the tiny base's folder
    must come from the file or the folder (an `image_encoder` component, which neither holds, made it fail)."""
    loaded = StableDiffusionPipeline.from_single_file(str(single_file), config=str(tiny_sd_dir))
    assert loaded.unet is not None and loaded.text_encoder is not None


def test_diffusers_from_single_file_with_local_config_folder(changed_pipeline, single_file, tiny_sd_dir):
    """The plain diffusers call a user makes: the folder gives the architecture, the file the weights."""
    loaded = StableDiffusionPipeline.from_single_file(
        str(single_file), config=str(tiny_sd_dir), local_files_only=True, safety_checker=None, image_encoder=None
    )
    original, restored = changed_pipeline.unet.state_dict(), loaded.unet.state_dict()
    assert all(torch.equal(original[key], restored[key]) for key in original)


def test_file_has_original_prefixes_and_conv_shaped_vae_attention(changed_pipeline, single_file):
    state_dict = load_single_file_state_dict(single_file)
    for name, prefix in PREFIXES.items():
        count = sum(key.startswith(prefix) for key in state_dict)
        assert count == len(getattr(changed_pipeline, name).state_dict()), name
    assert len(state_dict) == sum(len(getattr(changed_pipeline, name).state_dict()) for name in PREFIXES)
    channels = changed_pipeline.vae.config.block_out_channels[-1]
    for part in ("encoder", "decoder"):
        for weight in ("q", "k", "v", "proj_out"):
            key = f"first_stage_model.{part}.mid.attn_1.{weight}.weight"
            assert state_dict[key].shape == (channels, channels, 1, 1)
    # tiny world: 2 levels x 1 layer, so up level 0's upsampler follows its attention in output_blocks.1
    assert "model.diffusion_model.output_blocks.1.2.conv.weight" in state_dict
    assert "model.diffusion_model.input_blocks.2.0.op.weight" in state_dict
    assert "first_stage_model.decoder.up.0.block.1.conv1.weight" in state_dict
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in state_dict


def test_metadata_is_written(single_file):
    with safe_open(single_file, framework="pt") as f:
        assert f.metadata() == {"sdpipe.stage": "export", "base": "tiny"}


def test_fp16_file_from_folder(tiny_sd_dir, tmp_path):
    path = save_single_file(tiny_sd_dir, tmp_path / "half.safetensors", dtype="fp16")
    state_dict = load_single_file_state_dict(path)
    assert {tensor.dtype for tensor in state_dict.values()} == {torch.float16}

    loaded = load_single_file_pipeline(path, config=tiny_sd_dir, torch_dtype=torch.float16)
    original = load_file(tiny_sd_dir / "unet" / "diffusion_pytorch_model.safetensors")
    restored = loaded.unet.state_dict()
    assert all(restored[key].dtype == torch.float16 for key in original)
    assert all(torch.equal(original[key].half(), restored[key]) for key in original)


def test_a_half_precision_folder_converts_in_its_own_dtype(tiny_sd_dir, tmp_path):
    """Without `dtype`, an fp16 folder's single file is fp16 too (diffusers alone would load it as fp32: twice the
    memory and the file's size), tensor for tensor the folder's."""
    from sdpipe.models.saving import save_pipeline

    save_pipeline(StableDiffusionPipeline.from_pretrained(tiny_sd_dir).to(torch.float16), tmp_path / "half")
    path = save_single_file(tmp_path / "half", tmp_path / "half.safetensors")
    state_dict = load_single_file_state_dict(path)
    assert {tensor.dtype for tensor in state_dict.values() if tensor.is_floating_point()} == {torch.float16}
    folder_unet = load_file(tmp_path / "half" / "unet" / "diffusion_pytorch_model.safetensors")
    restored = load_single_file_pipeline(path, config=tiny_sd_dir, torch_dtype=torch.float16).unet.state_dict()
    assert all(torch.equal(folder_unet[key], restored[key]) for key in folder_unet)

    from sdpipe.conversion import convert_model

    convert_model(path, tmp_path / "back", config=tiny_sd_dir)  # and back to a folder: fp16 still, the same tensors
    back_unet = load_file(tmp_path / "back" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(back_unet[key].dtype == torch.float16 and torch.equal(folder_unet[key], back_unet[key]) for key in folder_unet)


def test_sd15_unet_gets_the_original_key_names():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
    state_dict = unet.state_dict()
    original = unet_to_original(state_dict, unet.config)
    assert len(original) == 686  # the number of model.diffusion_model.* weights in SD 1.5
    expected_shapes = {
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (320, 320),
        "middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
        "out.2.weight": (4, 320, 3, 3),
        "time_embed.0.weight": (1280, 320),
        "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),  # up level 0 has no attention: upsampler at .1
        "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),  # after the attention: .2
        "output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        "input_blocks.6.0.op.weight": (640, 640, 3, 3),
        "input_blocks.11.0.in_layers.2.weight": (1280, 1280, 3, 3),
        "middle_block.2.emb_layers.1.weight": (1280, 1280),
    }
    for key, shape in expected_shapes.items():
        assert original[key].shape == shape, key
    beyond_sd15 = ("input_blocks.12", "output_blocks.12", "output_blocks.11.2")
    assert not any(key.startswith(beyond_sd15) for key in original)

    # diffusers' own original -> diffusers converter maps every weight back to where it came from
    checkpoint = {f"model.diffusion_model.{key}": tensor for key, tensor in original.items()}
    restored = convert_ldm_unet_checkpoint(checkpoint, dict(unet.config))
    assert restored.keys() == state_dict.keys()
    assert all(restored[key] is state_dict[key] for key in state_dict)


def test_sd15_vae_gets_the_original_key_names():
    with torch.device("meta"):
        vae = AutoencoderKL(**SD15_VAE)
    original = vae_to_original(vae.state_dict())
    assert len(original) == len(vae.state_dict())
    for key in (
        "encoder.down.3.block.1.conv2.weight",
        "encoder.down.2.downsample.conv.weight",
        "encoder.down.1.block.0.nin_shortcut.weight",
        "encoder.norm_out.weight",
        "decoder.up.3.block.2.conv1.weight",
        "decoder.up.3.upsample.conv.weight",
        "decoder.up.0.block.0.nin_shortcut.weight",
        "decoder.mid.block_2.conv2.weight",
        "decoder.mid.attn_1.norm.weight",
    ):
        assert key in original, key
    assert original["decoder.mid.attn_1.proj_out.weight"].shape == (512, 512, 1, 1)
    assert "decoder.up.0.upsample.conv.weight" not in original
    assert "encoder.down.3.downsample.conv.weight" not in original


def test_truncated_or_garbled_file_is_a_clear_error(single_file, tiny_sd_dir, tmp_path):
    data = single_file.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    garbled = tmp_path / "garbled.safetensors"
    garbled.write_bytes(b"PK\x03\x04 not a safetensors file" * 10)
    for path in (truncated, garbled):
        with pytest.raises(SdpipeError, match=f"{path.name}.*not a valid .safetensors file"):
            load_single_file_state_dict(path)
        with pytest.raises(SdpipeError, match=path.name):
            load_single_file_pipeline(path, config=tiny_sd_dir)
    with pytest.raises(SdpipeError, match="no such file"):
        load_single_file_state_dict(tmp_path / "missing.safetensors")


def test_refuses_what_the_sd1_layout_cannot_hold(single_file, tiny_sd_dir, tmp_path):
    with pytest.raises(SdpipeError, match="no OpenCLIP equivalent: encoder.layers.0.extra"):
        open_clip_text_encoder_to_original({
            "embeddings.token_embedding.weight": torch.zeros(1), "embeddings.position_embedding.weight": torch.zeros(1),
            "final_layer_norm.weight": torch.zeros(1), "final_layer_norm.bias": torch.zeros(1),
            **{f"encoder.layers.0.{part}.{kind}": torch.zeros(1) for kind in ("weight", "bias") for part in (
                "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "layer_norm1",
                "layer_norm2", "mlp.fc1", "mlp.fc2")},
            "encoder.layers.0.extra.weight": torch.zeros(1),
        })
    with pytest.raises(SdpipeError, match="class_embedding.linear_1.weight"):
        unet_to_original({"class_embedding.linear_1.weight": torch.zeros(1)}, SD15_UNET)
    with pytest.raises(SdpipeError, match="ending in .safetensors"):
        save_single_file(tiny_sd_dir, tmp_path / "model.ckpt")
    with pytest.raises(SdpipeError, match="model_index.json"):
        load_single_file_pipeline(single_file, config=tmp_path)

    # without text encoder weights diffusers would quietly take the config folder's text encoder
    state_dict = load_single_file_state_dict(single_file)
    no_text_encoder = tmp_path / "no_text_encoder.safetensors"
    save_file({k: v for k, v in state_dict.items() if not k.startswith("cond_stage_model.")}, no_text_encoder)
    with pytest.raises(SdpipeError, match="no text encoder"):
        load_single_file_pipeline(no_text_encoder, config=tiny_sd_dir)


def test_sd2_text_encoder_is_written_in_the_open_clip_layout_and_reads_back(tmp_path):
    """SD 2.x (an OpenCLIP text encoder: GELU) gets the original SD 2 layout, `cond_stage_model.model.` with fused
    q/k/v `in_proj` weights, which diffusers' `from_single_file` converts back to the same weights."""
    from transformers import CLIPTextModel

    from sdpipe.tinyworld import models as tiny_models
    from sdpipe.tinyworld.tokenizer import build_clip_tokenizer

    torch.manual_seed(0)
    tokenizer = build_clip_tokenizer(tmp_path / "tokenizer")
    text_config = tiny_models.text_config(tokenizer)
    text_config.hidden_act = "gelu"  # OpenCLIP's, where OpenAI CLIP (SD 1.x) has quick_gelu
    unet_config = dict(tiny_models.unet_config(), use_linear_projection=True)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**tiny_models.vae_config()), text_encoder=CLIPTextModel(text_config), tokenizer=tokenizer,
        unet=UNet2DConditionModel(**unet_config), scheduler=tiny_models.sample_scheduler(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp_path / "sd2")
    path = save_single_file(pipe, tmp_path / "sd2.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())  # noqa: SIM118
        in_proj = f.get_tensor("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight")
    hidden = text_config.hidden_size
    assert in_proj.shape == (3 * hidden, hidden)
    assert not any(key.startswith("cond_stage_model.transformer.") for key in keys)
    layers = text_config.num_hidden_layers
    assert {f"cond_stage_model.model.transformer.resblocks.{layers - 1}.mlp.c_proj.weight",
            "cond_stage_model.model.positional_embedding", "cond_stage_model.model.ln_final.weight"} <= keys

    loaded = load_single_file_pipeline(path, config=tmp_path / "sd2")
    for name in PREFIXES:
        original, restored = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert restored.keys() == original.keys(), name
        assert all(torch.equal(original[key], restored[key]) for key in original), name
