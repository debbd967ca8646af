"""Shared fixtures: a randomly initialized tiny-world Stable Diffusion folder, built once per session."""

import pytest
import torch

from sdpipe.encode import save_safetensors
from sdpipe.io import write_jsonl


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A diffusers StableDiffusionPipeline folder with random tiny-world weights."""
    from sdpipe.tinyworld.models import build_random_pipeline

    return build_random_pipeline(tmp_path_factory.mktemp("tiny_sd") / "pipeline", seed=0)


@pytest.fixture(scope="module")
def one_thread():
    """Runs a module's tests on one torch thread: tiny models run faster so, and far faster when other processes share
    the cores. A module asks for it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def write_star_dataset():
    """A function writing what `encode` and `caption` would write for a small `star` dataset under a root."""
    return _write_star_dataset


def _write_star_dataset(root, count: int = 6, time_ids: bool = False) -> None:
    """What `encode` and `caption` would write for `count` images of the `star` dataset (with `time_ids`: what it
    writes for an SDXL base, whose UNet takes each image's size and crop)."""
    generator = torch.Generator().manual_seed(0)
    latents, rows = {}, []
    for index in range(count):
        image_id = f"star_{index:02d}"
        latents[image_id] = torch.randn(4, 8, 8, generator=generator)
        latents[f"{image_id}.flip"] = torch.flip(latents[image_id], dims=[-1])
        if time_ids:  # a 48x32 original center-cropped to 32x32 (8 px off each side), and its mirror image
            latents[f"{image_id}.time_ids"] = torch.tensor([32.0, 48.0, 0.0, 8.0, 32.0, 32.0])
            latents[f"{image_id}.flip.time_ids"] = torch.tensor([32.0, 48.0, 0.0, 8.0, 32.0, 32.0])
        color = ("red", "blue", "green")[index % 3]
        caption = f"a {color} sks shape"
        rows.append({"id": image_id, "file": f"images/{image_id}.png", "caption": caption, "caption_source": "sidecar"})
    (root / "latents").mkdir(parents=True)
    save_safetensors(latents, root / "latents" / "star.safetensors", {"scaling_factor": "0.18215"})
    write_jsonl(root / "captions" / "star.jsonl", rows)
