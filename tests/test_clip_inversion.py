"""CLIP inversion on the random tiny world: only the concept vector trains, through the image-variations UNet; the
file holds it and where it started; sampling draws from it and refuses prompts that do not name the concept."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from sdpipe.config import parse_params
from sdpipe.errors import SdpipeError
from sdpipe.io import write_jsonl
from sdpipe.methods import clip_inversion
from sdpipe.models.clip_image import ClipImageEncoder
from sdpipe.tinyworld.models import build_random_variations_pipeline

IMAGES = 3
STEPS = 4

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run faster on one thread


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_sd_dir, write_star_dataset):
    root = tmp_path_factory.mktemp("clip_inversion")
    write_star_dataset(root, count=IMAGES)
    variations = build_random_variations_pipeline(root / "variations", seed=1)
    prepared = root / "prepared" / "star"
    (prepared / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for index in range(IMAGES):
        image_id = f"star_{index:02d}"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(prepared / "images" / f"{image_id}.png")
        rows.append({"id": image_id, "file": f"images/{image_id}.png", "width": 32, "height": 32, "caption": "x"})
    write_jsonl(prepared / "manifest.jsonl", rows)

    def make_params(**settings):
        return parse_params(
            {
                "paths": {
                    "prepared": f"{root}/prepared", "latents": f"{root}/latents", "captions": f"{root}/captions",
                    "train": f"{root}/train",
                },
                "base": {"base_model": str(tiny_sd_dir), "datasets": ["star"], "device": "cpu"},
                "train": {
                    "methods": ["clip_inversion"],
                    "common": {"batch_size": 2, "checkpoint_every": 0, "sample_every": STEPS, "lr_warmup_steps": 0},
                    "clip_inversion": {"max_steps": STEPS, "variations_model": str(variations), **settings},
                },
                "evaluate": {"seeds_per_prompt": 2, "steps": 2},
            }
        )

    params = make_params()
    out_dir = root / "train" / "clip_inversion"
    metrics = clip_inversion.train(params, out_dir)
    return {"root": root, "params": params, "out_dir": out_dir, "metrics": metrics, "make_params": make_params}


def test_only_the_vector_trains_from_the_dataset_mean(trained):
    path = trained["out_dir"] / "model" / clip_inversion.EMBEDDING_FILE
    with safe_open(str(path), "pt") as f:
        learned, start = f.get_tensor(clip_inversion.LEARNED), f.get_tensor(clip_inversion.INIT)
        assert f.metadata()["variations_model"] == trained["params"].train.clip_inversion.variations_model
    assert learned.shape == start.shape == (1, 64)
    assert not torch.equal(learned, start)
    folder = trained["params"].train.clip_inversion.variations_model
    from sdpipe.encode import dataset_images

    images = dataset_images(trained["root"] / "prepared" / "star")
    expected_start = ClipImageEncoder.from_pipeline_folder(folder, torch.device("cpu")).features(images).mean(0)
    torch.testing.assert_close(start[0], expected_start)
    assert trained["metrics"]["steps"] == STEPS
    assert (trained["out_dir"] / "samples" / f"step-{STEPS:06d}.png").is_file()


def test_the_sampler_draws_the_vector_and_refuses_other_prompts(trained):
    pipeline, trigger = clip_inversion.sampling_pipeline(trained["params"], trained["out_dir"] / "model", torch.device("cpu"))
    pipeline.set_progress_bar_config(disable=True)
    assert trigger == "sks"

    def draw(concept):
        pipeline.concept = concept
        generator = torch.Generator().manual_seed(0)
        return pipeline("a sks", num_inference_steps=2, height=32, width=32, generator=generator, output_type="np").images

    learned = pipeline.concept
    first, again, other = draw(learned), draw(learned), draw(learned + 1)
    assert first.shape == (1, 32, 32, 3) and np.array_equal(first, again) and not np.array_equal(first, other)
    with pytest.raises(SdpipeError, match="name it with 'sks'"):
        pipeline("a red circle", num_inference_steps=2)
    with pytest.raises(SdpipeError, match="no negative prompt"):
        pipeline("a sks", negative_prompt="blurry", num_inference_steps=2)


def test_evaluate_reports_fidelity_before_and_after(trained):
    metrics = clip_inversion.evaluation_metrics(trained["params"], trained["out_dir"], "star")
    assert metrics["images"] == 8
    assert 0 <= metrics["fidelity"] <= 1 and 0 <= metrics["fidelity_at_init"] <= 1


def test_zeros_start_and_a_bad_variations_folder(trained, tmp_path):
    params = trained["make_params"](init="zeros", max_steps=1)
    clip_inversion.train(params, tmp_path / "zeros")
    with safe_open(str(tmp_path / "zeros" / "model" / clip_inversion.EMBEDDING_FILE), "pt") as f:
        assert torch.count_nonzero(f.get_tensor(clip_inversion.INIT)) == 0
    with pytest.raises(SdpipeError, match=r"train\.clip_inversion\.variations_model: .* not an image-variations model"):
        clip_inversion.train(trained["make_params"](variations_model=str(tmp_path)), tmp_path / "bad")
    assert not (tmp_path / "bad" / "model").exists()


def test_inspect_names_the_file(trained):
    from sdpipe.inspection import inspect_model

    report = inspect_model(trained["out_dir"] / "model" / clip_inversion.EMBEDDING_FILE, hashes=False)
    assert report["format"] == "clip-inversion-embedding"
    assert report["details"]["variations_model"] == trained["params"].train.clip_inversion.variations_model
