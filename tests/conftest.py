"""Shared fixtures: a randomly initialized tiny-world Stable Diffusion folder, built once per session."""

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A diffusers StableDiffusionPipeline folder with random tiny-world weights."""
    from sdpipe.tinyworld.models import build_random_pipeline

    return build_random_pipeline(tmp_path_factory.mktemp("tiny_sd") / "pipeline", seed=0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
