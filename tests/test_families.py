"""Model families: each family's conditioning and UNet call equal what its diffusers pipeline computes, and a base
model's family is found from its folder or its single file's keys."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from sdpipe.errors import SdpipeError
from sdpipe.families import SD, SDXL, folder_family, single_file_family
from sdpipe.families.base import Conditioning
from sdpipe.families.sdxl import time_ids
from sdpipe.tinyworld.models import build_random_sdxl_pipeline

CAPTIONS = ["a red circle", "a large blue sks shape at the top left"]


@pytest.fixture(scope="module")
def tiny_sdxl_dir(tmp_path_factory):
    return build_random_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "model")


def test_sd_family_encodes_as_the_diffusers_pipeline(tiny_sd_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, local_files_only=True)
    assert folder_family(tiny_sd_dir) is SD
    with torch.no_grad():
        ours = SD.encode([pipe.tokenizer], [pipe.text_encoder], CAPTIONS, torch.device("cpu"))
        theirs, _ = pipe.encode_prompt(CAPTIONS, "cpu", 1, False)
    assert ours.pooled is None
    torch.testing.assert_close(ours.context, theirs, rtol=0, atol=0)


def test_sdxl_family_encodes_and_predicts_as_the_diffusers_pipeline(tiny_sdxl_dir):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, local_files_only=True)
    assert folder_family(tiny_sdxl_dir) is SDXL
    tokenizers = [getattr(pipe, name) for name in SDXL.tokenizers]
    text_encoders = [getattr(pipe, name) for name in SDXL.text_encoders]
    with torch.no_grad():
        ours = SDXL.encode(tokenizers, text_encoders, CAPTIONS, torch.device("cpu"))
        context, _, pooled, _ = pipe.encode_prompt(CAPTIONS, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(ours.context, context, rtol=0, atol=0)
    torch.testing.assert_close(ours.pooled, pooled, rtol=0, atol=0)
    assert ours.context.shape[-1] == pipe.unet.config.cross_attention_dim

    # the size/crop ids as the pipeline builds them, and the UNet call with the added conditioning
    ids = time_ids([(40, 32), (32, 32)], [(4, 0), (0, 0)], (32, 32))
    projection_dim = pipe.text_encoder_2.config.projection_dim
    expected = pipe._get_add_time_ids((40, 32), (4, 0), (32, 32), torch.float32, projection_dim)
    torch.testing.assert_close(ids[:1], expected)
    latents, timesteps = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 500])
    with torch.no_grad():
        prediction = SDXL.predict(pipe.unet, latents, timesteps, ours, ids)
        reference = pipe.unet(
            latents, timesteps, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}
        ).sample
        other_sizes = SDXL.predict(pipe.unet, latents, timesteps, ours, time_ids([(64, 64)] * 2, [(0, 0)] * 2, (32, 32)))
    torch.testing.assert_close(prediction, reference, rtol=0, atol=0)
    assert not torch.allclose(prediction, other_sizes)  # the time ids reach the UNet
    with pytest.raises(ValueError, match="time ids"):
        SDXL.predict(pipe.unet, latents, timesteps, ours)


def test_conditioning_rows_and_cat_keep_pooled_rows_with_their_context():
    conditioning = Conditioning(torch.arange(24.0).reshape(4, 3, 2), torch.arange(8.0).reshape(4, 2))
    parts = [conditioning.rows(i) for i in range(4)]
    assert [len(part) for part in parts] == [1, 1, 1, 1]
    joined = Conditioning.cat(parts[2:] + parts[:2])
    torch.testing.assert_close(joined.context, conditioning.context[[2, 3, 0, 1]])
    torch.testing.assert_close(joined.pooled, conditioning.pooled[[2, 3, 0, 1]])
    assert Conditioning.cat([Conditioning(torch.zeros(1, 3, 2))] * 2).pooled is None


def test_family_of_a_folder_and_of_single_file_keys(tmp_path):
    for class_name, family in [("StableDiffusionXLImg2ImgPipeline", SDXL), ("StableDiffusionPipeline", SD)]:
        folder = tmp_path / class_name
        folder.mkdir()
        (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
        assert folder_family(folder) is family
    (tmp_path / "flux").mkdir()
    (tmp_path / "flux" / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(SdpipeError, match=r"base\.base_model: .*FluxPipeline folder; sdpipe reads StableDiffusionPipeline"):
        folder_family(tmp_path / "flux")
    with pytest.raises(SdpipeError, match="model_index.json"):
        folder_family(tmp_path)
    assert single_file_family(["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"]) is SDXL
    assert single_file_family(["cond_stage_model.transformer.text_model.embeddings.position_ids"]) is SD


def test_an_sdxl_folder_loads_as_sdxl_with_both_text_encoders(tiny_sdxl_dir, tiny_sd_dir):
    from sdpipe.models.loading import load_pipeline, load_text_encoder, load_tokenizer, model_family

    assert model_family(str(tiny_sdxl_dir)) is SDXL and model_family(str(tiny_sd_dir)) is SD
    pipe = load_pipeline(str(tiny_sdxl_dir))
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    second = load_text_encoder(str(tiny_sdxl_dir), subfolder="text_encoder_2")
    for name, tensor in second.state_dict().items():
        torch.testing.assert_close(tensor, pipe.text_encoder_2.state_dict()[name], rtol=0, atol=0)
    assert load_tokenizer(str(tiny_sdxl_dir), subfolder="tokenizer_2").pad_token == "!"
    with pytest.raises(SdpipeError, match=r"is a Stable Diffusion 1.x/2.x model; it has no text_encoder_2"):
        load_text_encoder(str(tiny_sd_dir), subfolder="text_encoder_2")
