"""The pretrain recipe end to end at toy size, resume by phase, and the shipped tiny-world base model."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImageVariationPipeline, StableDiffusionPipeline
from transformers import CLIPModel

from sdpipe import sampling
from sdpipe.config.pretrain import PretrainParams
from sdpipe.tinyworld import oracle, pretrain, scoring, world

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "artifacts" / "pretrain" / "tinyworld"

TOY = PretrainParams(
    num_images=64, sparks=16, crosses=8, vae_doodles=16, vae_steps=2, vae_batch_size=4, clip_steps=2, clip_batch_size=8,
    unet_steps=2, unet_batch_size=4, variations_steps=2, variations_batch_size=4, warmup_steps=1,
)


def test_toy_pretrain_writes_loadable_pipelines_and_resumes_by_phase(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain, "VARIATIONS_PROBE_IMAGES", 4)
    out, work, metrics_path = tmp_path / "model", tmp_path / "work", tmp_path / "metrics.json"
    variations_dir = tmp_path / "variations"
    run = dict(seed=0, out_dir=out, variations_dir=variations_dir, work_dir=work, metrics_path=metrics_path)
    metrics = pretrain.pretrain(TOY, **run)
    assert set(metrics["seconds"]) == {"vae", "clip", "unet", "variations", "this_run"}
    assert set(metrics["variations_accuracy"]) >= {"color", "shape", "all"}
    assert json.loads(metrics_path.read_text())["num_images"] == 64
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "feature_extractor", "clip"):
        assert (out / part).is_dir(), part
    # a real SD 1.5 folder's components: no image encoder, which a single file would not hold (from_single_file fails)
    assert json.loads((out / "model_index.json").read_text()).get("image_encoder", [None, None]) == [None, None]
    assert not (out / "image_encoder").exists()

    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    first = {k: v.clone() for k, v in pipe.unet.state_dict().items()}

    # phase 4 starts from the text UNet and trains on image embeddings; diffusers' image-variations pipeline loads it
    variations = StableDiffusionImageVariationPipeline.from_pretrained(variations_dir, local_files_only=True)
    assert variations.unet.config.cross_attention_dim == variations.image_encoder.config.projection_dim
    assert any(not torch.equal(a, b) for a, b in zip(variations.unet.parameters(), pipe.unet.parameters()))
    # its vision tower trained beside it (variations_train_encoder), the base's did not
    clip = CLIPModel.from_pretrained(out / "clip")
    trained = zip(variations.image_encoder.vision_model.parameters(), clip.vision_model.parameters())
    assert any(not torch.equal(a, b) for a, b in trained)
    variations.set_progress_bar_config(disable=True)
    image = world.render(world.sample_scene(np.random.default_rng(0)))
    assert variations(image, height=32, width=32, num_inference_steps=2).images[0].size == (32, 32)

    # a second run with only the UNet's params changed reuses the VAE and CLIP phases
    changed = TOY.model_copy(update={"unet_lr": TOY.unet_lr / 2})
    pretrain.pretrain(changed, **run)
    assert len(list(work.glob("vae-*"))) == len(list(work.glob("clip-*"))) == len(list(work.glob("unet-*"))) == 1
    assert len(list(work.glob("variations-*"))) == 1  # retrained: it starts from the UNet
    again = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert any(not torch.equal(first[k], v) for k, v in again.unet.state_dict().items())


def test_training_set_holds_out_stars_and_outlines_and_rarely_names_the_cross():
    params = PretrainParams(
        num_images=500, sparks=100, crosses=100, generic_share=0.5, cross_named_share=0.2, dark_share=0.2, dark_named_share=0.3
    )
    _, scenes, captions = pretrain.make_training_set(params, seed=0)
    assert {s.shape for s in scenes[:500]} == set(world.PRETRAIN_SHAPES)
    assert {s.shape for s in scenes[500:600]} == set(world.SPARK_SHAPES)
    assert {s.shape for s in scenes[600:]} == {"cross"}
    assert {s.style for s in scenes} == {"filled"}
    texts = [text for variants in captions for text in variants]
    assert all("star" not in text and "five" not in text and "outlined" not in text for text in texts)
    assert "a small red spark with four points" in {text.split(" at ")[0] for text in texts}
    # the cross has the generic word, which the named shapes get about half of the time, or (a fifth of the time) its
    # rare word, which nothing else gets
    words = [
        (scene.shape, text.split(" at ")[0].removesuffix(" on a dark background").split()[-1])
        for scene, variants in zip(scenes, captions)
        for text in variants
    ]
    cross_words = [word for shape, word in words if shape == "cross"]
    assert set(cross_words) == {"shape", "plus"}
    assert 0.12 < cross_words.count("plus") / len(cross_words) < 0.28
    assert not any(word == "plus" for shape, word in words if shape != "cross")
    named = [text for scene, variants in zip(scenes[:500], captions[:500]) for text in variants]
    generic = sum(" shape" in text for text in named) / len(named)
    assert 0.45 < generic < 0.55
    # about a fifth of all scenes are dark, and about 30% of their captions say so; no light scene's does
    dark = [s.background == "dark" for s in scenes]
    assert 0.16 < sum(dark) / len(scenes) < 0.24
    dark_texts = [text for d, variants in zip(dark, captions) if d for text in variants]
    assert 0.22 < sum("dark background" in text for text in dark_texts) / len(dark_texts) < 0.38
    assert not any("dark" in text for d, variants in zip(dark, captions) if not d for text in variants)


def test_clip_captions_name_the_cross_more_often_and_are_otherwise_the_unets():
    params = PretrainParams(num_images=200, sparks=50, crosses=200, cross_named_share=0.15)
    pixels, scenes, unet_captions = pretrain.make_training_set(params, seed=0)
    clip_pixels, _, clip_captions = pretrain.make_training_set(params, seed=0, cross_named_share=0.5)
    assert torch.equal(pixels, clip_pixels)
    named = {"unet": 0, "clip": 0}
    for scene, unet_variants, clip_variants in zip(scenes, unet_captions, clip_captions):
        for unet_text, clip_text in zip(unet_variants, clip_variants):
            named["unet"] += " plus" in unet_text
            named["clip"] += " plus" in clip_text
            # the same caption, or the UNet's generic word where CLIP's reads the rare one
            assert clip_text == unet_text or (scene.shape == "cross" and clip_text == unet_text.replace(" shape", " plus"))
    crosses = 4 * sum(scene.shape == "cross" for scene in scenes)
    assert 0.1 < named["unet"] / crosses < 0.2 and 0.42 < named["clip"] / crosses < 0.58


def test_sparks_never_have_five_points_and_the_oracle_reads_none_as_a_star_or_a_cross():
    assert 5 not in world.SPARK_POINTS
    scenes = [world.sample_scene(np.random.default_rng(i), shapes=world.SPARK_SHAPES) for i in range(40)]
    readings = [r.shape for r in oracle.read_batch(world.render(s) for s in scenes)]
    assert "star" not in readings and "cross" not in readings, readings


@pytest.fixture(scope="module")
def shipped_scores():
    if not SHIPPED.is_dir():
        pytest.skip("the tiny-world base model has not been built")
    pipe = StableDiffusionPipeline.from_pretrained(SHIPPED, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    probes = scoring.color_shape_probes()
    images = sampling.sample(pipe, [p.prompt for p in probes], seeds=[0, 1], steps=20)
    assert images[0].size == (world.RESOLUTION, world.RESOLUTION)
    return scoring.score_probes(images, probes, seeds_per_probe=2)


def test_shipped_base_model_loads_offline_and_meets_the_accuracy_targets(shipped_scores):
    # issue 3's targets are 0.90 on benchmarks/tinyworld_base.py's 96 images; on this 24-image probe a reading or
    # two may flip between CPUs' float rounding, so the bar here is 21 of 24 (chance: color 0.25, shape 0.33)
    assert shipped_scores["shape"] >= 0.875 and shipped_scores["color"] >= 0.875, shipped_scores


def test_toy_pretrain_xl_builds_an_sdxl_on_the_sd_base_that_diffusers_loads(tiny_sd_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from sdpipe.config.pretrain import PretrainXLParams
    from sdpipe.families import SDXL
    from sdpipe.tinyworld.pretrain_xl import pretrain_xl

    xl = PretrainXLParams(clip_steps=2, clip_batch_size=8, unet_steps=2, unet_batch_size=4)
    run = dict(seed=0, sd_base=tiny_sd_dir, out_dir=tmp_path / "xl", work_dir=tmp_path / "work",
               metrics_path=tmp_path / "metrics.json")
    metrics = pretrain_xl(TOY, xl, **run)
    assert set(metrics["seconds"]) == {"xl_clip", "xl_unet", "this_run"}
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "xl", local_files_only=True)
    assert pipe.config.force_zeros_for_empty_prompt is False  # the unconditional input is the empty caption's
    assert pipe.tokenizer_2.pad_token == "!"
    sd = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, local_files_only=True)
    for name in ("vae", "text_encoder"):  # SDXL's VAE and first text encoder are the SD base's
        ours, theirs = getattr(pipe, name).state_dict(), getattr(sd, name).state_dict()
        assert all(torch.equal(ours[key], theirs[key]) for key in theirs), name
    # the UNet takes what SDXL's pipeline gives it: context of both encoders, pooled embedding, time ids
    conditioning = SDXL.encode([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2],
                               ["a red circle"], torch.device("cpu"))
    assert conditioning.context.shape[-1] == pipe.unet.config.cross_attention_dim
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a red circle", height=32, width=32, num_inference_steps=2).images[0].size == (32, 32)

    # a second run with only the UNet's settings changed reuses the second text encoder's phase (the same folder)
    [clip_phase] = (tmp_path / "work").glob("xl_clip-*")
    inode = clip_phase.stat().st_ino
    pretrain_xl(TOY, xl.model_copy(update={"unet_lr": xl.unet_lr / 2}), **run)
    assert [path.stat().st_ino for path in (tmp_path / "work").glob("xl_clip-*")] == [inode]
    assert len(list((tmp_path / "work").glob("xl_unet-*"))) == 1
