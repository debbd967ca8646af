"""Real size on the CPU: an SD 1.5-architecture model with random weights (fp32, 4.3 GB of weights) goes through the
real stage scripts (prepare, caption, encode, DreamBooth with the text encoder) and `sdpipe convert`, each in its own
process, and the peak memory of each stays within the rule of issue #24: the training state plus one more copy of
the model, and for single-file writes the model's size plus 1 GB. The files keep SD 1.5's real key names.

`benchmarks/real_size.py` runs every stage and method this way and prints the table; this test covers the parts that
fit CI's time (a few minutes on two cores) and the stage that ran out of memory before (DreamBooth's save).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
SLACK_GIB = 1.0  # the Python interpreter, torch and diffusers themselves, before any model
# Disk the module needs at once: the random model (4.3 GB) and a test's outputs (a diffusers folder and a single
# file, 8.6 GB), with room to spare. Each test deletes its outputs, and the model goes when the module ends.
DISK_NEEDED_GIB = 16.0

pytestmark = pytest.mark.slow

# Keys and shapes of the original SD 1.5 checkpoint layout (v1-5-pruned-emaonly.safetensors), one per part.
SD15_KEYS = {
    "model.diffusion_model.time_embed.0.weight": [1280, 320],
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": [320, 768],
    "model.diffusion_model.middle_block.1.proj_in.weight": [1280, 1280, 1, 1],
    "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.2.weight": [320, 1280],
    "model.diffusion_model.out.2.weight": [4, 320, 3, 3],
    "first_stage_model.decoder.mid.attn_1.q.weight": [512, 512, 1, 1],
    "first_stage_model.quant_conv.weight": [8, 8, 1, 1],
    "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": [768, 3072],
    "cond_stage_model.transformer.text_model.final_layer_norm.weight": [768],
}


def run_measured(command: list[str], cwd: Path) -> float:
    """Runs `command` in `cwd` (failing the test on a non-zero exit); returns the process's peak RSS in GiB."""
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = process.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(process.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, output[-4000:]
    return usage.ru_maxrss * 1024 / GIB


def weights_gib(folder: Path) -> float:
    return sum(path.stat().st_size for path in folder.rglob("*.safetensors")) / GIB


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    """An SD 1.5 diffusers folder with random weights in fp32, built in a child process (this one stays small, so the
    stages' peaks measured below are their own)."""
    folder = tmp_path_factory.mktemp("sd15")
    free = shutil.disk_usage(folder).free / GIB
    if free < DISK_NEEDED_GIB:
        pytest.skip(f"real-size tests need {DISK_NEEDED_GIB:.0f} GiB free disk in {folder.parent}, {free:.1f} GiB free")
    command = [sys.executable, "-m", "sdpipe.models.random_weights", "sd15", str(folder), "fp32", "--model-only"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    yield folder / "model"
    shutil.rmtree(folder)


@pytest.fixture
def outputs(tmp_path) -> Path:
    """A test's own folder, deleted when the test ends, pass or fail (its files are gigabytes each)."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_dreambooth_with_the_text_encoder_trains_and_saves_within_its_memory_budget(sd15, outputs):
    work = outputs / "work"
    (work / "datasets").mkdir(parents=True)
    os.symlink(REPO / "datasets" / "star", work / "datasets" / "star")
    params = {
        "base": {"base_model": str(sd15), "resolution": 64, "datasets": ["star"]},
        "train": {
            "methods": ["dreambooth"],
            "common": {"batch_size": 1, "checkpoint_every": 0, "sample_every": 0, "lr_warmup_steps": 0},
            "dreambooth": {"max_steps": 2, "train_text_encoder": True, "prior_loss_weight": 0.0},
        },
    }
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    for stage in ("prepare", "caption", "encode"):
        run_measured([sys.executable, str(REPO / "stages" / f"{stage}.py")], work)
    peak = run_measured([sys.executable, str(REPO / "stages" / "train.py"), "dreambooth"], work)

    model = weights_gib(sd15)
    unet_and_text_encoder = weights_gib(sd15 / "unet") + weights_gib(sd15 / "text_encoder")
    training_state = 4 * unet_and_text_encoder  # weights, gradients and Adam's two moments, all fp32
    assert peak <= training_state + model + SLACK_GIB, f"peak {peak:.2f} GiB; model {model:.2f} GiB"

    out = work / "artifacts" / "train" / "dreambooth" / "model"
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        shapes = {key: list(f.get_slice(key).get_shape()) for key in SD15_KEYS}
    assert shapes == SD15_KEYS
    index = json.loads((out / "diffusers" / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]


def test_convert_writes_a_single_file_within_the_model_size_plus_one_gib(sd15, outputs):
    single_file = outputs / "model.safetensors"
    convert = [sys.executable, "-m", "sdpipe.cli", "convert"]
    peak = run_measured([*convert, str(sd15), str(single_file)], outputs)
    model = weights_gib(sd15)
    assert peak <= model + 1.0 + SLACK_GIB, f"folder -> single file peaked at {peak:.2f} GiB for {model:.2f} GiB"
    with safe_open(str(single_file), framework="pt") as f:
        assert {key: list(f.get_slice(key).get_shape()) for key in SD15_KEYS} == SD15_KEYS

    peak = run_measured([*convert, str(single_file), str(outputs / "back"), "--to", "diffusers", "--config",
                         str(sd15)], outputs)
    assert peak <= model + 1.0 + SLACK_GIB, f"single file -> folder peaked at {peak:.2f} GiB for {model:.2f} GiB"
