"""DreamBooth: class images generated once and deterministically, the prior-preservation loss, a supplied class
dataset, and the outputs loaded by diffusers."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from sdpipe.class_images import load_class_examples, write_class_images
from sdpipe.config import ParamsError, parse_params
from sdpipe.encode import save_safetensors
from sdpipe.errors import SdpipeError
from sdpipe.io import write_jsonl
from sdpipe.methods import dreambooth
from sdpipe.training import MODEL_DIR

PROMPTS = ["a small red shape", "a large blue shape", "a small green shape"]
NUM_CLASS_IMAGES = 4  # the fourth image takes the first prompt again
UNET_FILE = "diffusers/unet/diffusion_pytorch_model.safetensors"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run faster on one thread


def dreambooth_params(root, base_model, datasets=("star",), class_images=None, **settings):
    tiny = {"prompts": PROMPTS, "num_images": NUM_CLASS_IMAGES, "steps": 2, "batch_size": 3}
    class_images = tiny | (class_images or {})
    paths = {
        "latents": f"{root}/latents",
        "captions": f"{root}/captions",
        "train": f"{root}/train",
        "class_images": f"{root}/class_images",
    }
    return parse_params(
        {
            "paths": paths,
            "base": {"base_model": str(base_model), "datasets": list(datasets), "device": "cpu"},
            "train": {
                "methods": ["dreambooth"],
                "common": {"batch_size": 2, "checkpoint_every": 0, "sample_every": 0, "lr_warmup_steps": 1},
                "dreambooth": {"max_steps": 2, "learning_rate": 1e-3, "class_images": class_images, **settings},
            },
        }
    )


def generate(params, out_dir=None):
    out_dir = out_dir or params.paths.class_images
    return write_class_images(out_dir, params.train.dreambooth.class_images, params.base, params.encode)


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_sd_dir, write_star_dataset):
    """The star dataset's latents and captions, and the class images generated for them."""
    root = tmp_path_factory.mktemp("dreambooth")
    write_star_dataset(root)
    generate(dreambooth_params(root, tiny_sd_dir))
    return root


@pytest.fixture(scope="module")
def trained(root, tiny_sd_dir):
    """Output folders of runs with prior_loss_weight 1 and 0."""
    outs = {}
    for weight in (1.0, 0.0):
        params = dreambooth_params(root, tiny_sd_dir, prior_loss_weight=weight)
        outs[weight] = root / "train" / f"dreambooth-{weight}"
        dreambooth.train(params, outs[weight])
    return outs


def folder_bytes(folder):
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_class_images_are_generated_once_and_deterministically(root, tiny_sd_dir, tmp_path):
    params = dreambooth_params(root, tiny_sd_dir)
    folder = root / "class_images"
    files = folder_bytes(folder)
    expected_images = {f"images/class_{i:04d}.png" for i in range(NUM_CLASS_IMAGES)}
    assert expected_images <= set(files)
    assert {"manifest.jsonl", "captions/class.jsonl", "latents/class.safetensors", "class_images.json"} <= set(files)
    rows = [json.loads(line) for line in files["captions/class.jsonl"].decode().splitlines()]
    assert [row["caption"] for row in rows] == PROMPTS + PROMPTS[:1]
    with safe_open(str(folder / "latents" / "class.safetensors"), framework="pt") as f:
        assert len(f.keys()) == 2 * NUM_CLASS_IMAGES  # and their flips, as `encode` writes them
        assert f.get_tensor("class_0000").shape == (4, 8, 8)
        assert f.metadata()["base_model"] == str(tiny_sd_dir)

    # The same settings give the same bytes (here in another folder) ...
    generate(params, tmp_path / "again")
    assert folder_bytes(tmp_path / "again") == files
    # ... and a folder that already holds them is left alone.
    mtimes = {path: path.stat().st_mtime_ns for path in folder.rglob("*")}
    generate(params)
    assert {path: path.stat().st_mtime_ns for path in folder.rglob("*")} == mtimes

    examples, inputs = load_class_examples(
        params.train.dreambooth.class_images, folder, root / "latents", root / "captions", params.base
    )
    assert [example.caption for example in examples] == PROMPTS + PROMPTS[:1]
    assert inputs == [folder / "latents" / "class.safetensors", folder / "captions" / "class.jsonl"]


def test_the_prior_loss_changes_the_result(trained):
    with_prior, without = trained[1.0], trained[0.0]
    metrics = json.loads((with_prior / "metrics.json").read_text())
    assert metrics["class_images"] == NUM_CLASS_IMAGES and metrics["images"] == 6
    assert "class_images" not in json.loads((without / "metrics.json").read_text())
    class_losses = (with_prior / "live" / "plots" / "metrics" / "class_loss.tsv").read_text().splitlines()[1:]
    assert len(class_losses) == 2 and all(float(row.split("\t")[1]) > 0 for row in class_losses)
    assert (with_prior / MODEL_DIR / UNET_FILE).read_bytes() != (without / MODEL_DIR / UNET_FILE).read_bytes()


def test_the_outputs_load_in_diffusers(trained, tiny_sd_dir):
    model_dir = trained[1.0] / MODEL_DIR
    folder = model_dir / "diffusers"
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    single = StableDiffusionPipeline.from_single_file(
        str(model_dir / "model.safetensors"), config=str(folder), local_files_only=True, safety_checker=None,
        image_encoder=None,
    )
    base = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    for name, key in (("unet", "conv_in.weight"), ("text_encoder", "embeddings.token_embedding.weight")):
        trained_weights, single_weights, base_weights = (getattr(p, name).state_dict() for p in (pipe, single, base))
        assert trained_weights.keys() == single_weights.keys()
        assert all(torch.equal(trained_weights[k], single_weights[k]) for k in trained_weights), name
        assert not torch.equal(trained_weights[key], base_weights[key]), f"{name} did not train"  # both do by default
    assert all(torch.equal(a, b) for a, b in zip(pipe.vae.parameters(), base.vae.parameters()))


def test_class_images_of_other_settings_are_refused(root, tiny_sd_dir, tmp_path):
    params = dreambooth_params(root, tiny_sd_dir, class_images={"prompts": ["a small yellow shape"]})
    stale = r"made with other train\.dreambooth\.class_images settings.*dvc repro class_images"
    with pytest.raises(SdpipeError, match=stale):
        dreambooth.train(params, tmp_path / "out")
    moved = params.paths.model_copy(update={"class_images": str(tmp_path / "none")})
    with pytest.raises(SdpipeError, match=r"no class images; run the `class_images` stage first"):
        dreambooth.train(params.model_copy(update={"paths": moved}), tmp_path / "out")


def write_shapes_dataset(root, count: int = 3) -> None:
    """What `encode` and `caption` would write for a user's own class images."""
    generator = torch.Generator().manual_seed(7)
    latents = {f"shapes_{i}": torch.randn(4, 8, 8, generator=generator) for i in range(count)}
    rows = [
        {"id": f"shapes_{i}", "file": f"images/shapes_{i}.png", "caption": "a red shape", "caption_source": "sidecar"}
        for i in range(count)
    ]
    save_safetensors(latents, root / "latents" / "shapes.safetensors", {"scaling_factor": "0.18215"})
    write_jsonl(root / "captions" / "shapes.jsonl", rows)


def test_a_supplied_class_dataset_replaces_the_generated_images(root, tiny_sd_dir, tmp_path):
    write_shapes_dataset(root)
    params = dreambooth_params(root, tiny_sd_dir, datasets=("star", "shapes"), class_images={"dataset": "shapes"})
    out = tmp_path / "class_images"
    generate(params, out)
    assert sorted(path.name for path in out.iterdir()) == ["class_images.json"]  # nothing generated
    metrics = dreambooth.train(params, tmp_path / "train")
    assert metrics["class_images"] == 3 and metrics["images"] == 6  # the star images only


@pytest.mark.parametrize(
    "dreambooth_settings, message",
    [
        ({"datasets": None, "class_images": {"dataset": "shapes"}}, "must list the instance datasets"),
        ({"datasets": ["star", "shapes"], "class_images": {"dataset": "shapes"}}, "is also an instance dataset"),
    ],
)
def test_a_class_dataset_must_not_be_an_instance_dataset(dreambooth_settings, message):
    with pytest.raises(ParamsError, match=message):
        parse_params({"train": {"dreambooth": dreambooth_settings}})
