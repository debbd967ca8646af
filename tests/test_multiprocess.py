"""Data-parallel training: the `train@<method>` stage with `train.common.processes: 2` launches itself under
`accelerate launch` (two CPU processes, gloo, one torch thread each), and each process trains on its rows of
what one process with a twice larger batch draws.

The unit tests check the split without launching anything; the stage tests run textual inversion on the random
tiny model: the outputs of two processes are those of one process with the same effective batch (to rounding),
and a killed two-process run resumes and ends as an uninterrupted one, bit for bit.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from sdpipe.config import parse_params
from sdpipe.config.caption import CaptionOps
from sdpipe.config.train import MethodParams, TrainCommon
from sdpipe.errors import SdpipeError
from sdpipe.training import TrainingMethod, run_training
from sdpipe.training.checkpoints import list_checkpoints
from sdpipe.training.data import Batch, Example, LatentBatches, PriorPreservation
from sdpipe.training.loop import TrainingData, diffusion_losses, draw_micro_batch, load_models
from sdpipe.training.processes import LAUNCHED, ProcessShare, launch_command, needs_launch

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 8

LOSS_TOLERANCE = 1e-5
"""How far the losses of 2 processes × batch 1 may be from those of 1 process × batch 2 (relative). They train on
the same draws and differ only in the order of the sums (DDP averages the two processes' gradients); measured on
this test's run: at most 1.0e-7 relative on a step's loss (over 8 steps), and 9e-7 of its largest value on the
learned embedding (float32 rounding); runs on other draws differ from the first step by far more than this."""


# --- the split, without launching ------------------------------------------------------------------------------


def examples(count: int, shape=(4, 4, 4)) -> list[Example]:
    generator = torch.Generator().manual_seed(count)
    found = []
    for index in range(count):
        latents = torch.randn(shape, generator=generator)
        caption = f"a, {('red', 'blue', 'green')[index % 3]}, sks, shape, {index}"
        found.append(Example(f"d/{index}", latents, torch.flip(latents, dims=[-1]), caption))
    return found


def training_data(batch_size: int, processes: int) -> TrainingData:
    """What `load_data` makes of 5 images and 3 class images for `processes` processes."""
    size = batch_size * processes
    prior = PriorPreservation(examples(3), [Path("class.safetensors")], 1.0)
    return TrainingData(
        examples=examples(5),
        batches=LatentBatches(examples(5), size, seed=3, flip=True),
        prior=prior,
        class_batches=LatentBatches(prior.examples, size, seed=4, flip=True),
        latents_dir=Path("latents"),
        input_files=[],
    )


class Captions(TrainingMethod):
    name = "captions"

    def caption(self, caption: str) -> str:
        return caption.replace("sks", "<sks>")


def test_two_processes_take_the_halves_of_what_one_process_with_twice_the_batch_draws():
    method = Captions(MethodParams())
    ops = CaptionOps(shuffle_tags=True, keep_tokens=1, tag_dropout=0.3, caption_dropout=0.2)
    one, two = training_data(batch_size=4, processes=1), training_data(batch_size=2, processes=2)
    for index in range(7):  # more than an epoch of the 5 images
        whole = draw_micro_batch(method, one, ops, 0, index, ProcessShare(0, 1))
        halves = [draw_micro_batch(method, two, ops, 0, index, ProcessShare(p, 2)) for p in (0, 1)]
        assert [len(half.batch.keys) for half in halves] == [2, 2]
        assert halves[0].batch.keys + halves[1].batch.keys == whole.batch.keys
        assert torch.equal(torch.cat([half.batch.latents for half in halves]), whole.batch.latents)
        assert halves[0].captions + halves[1].captions == whole.captions
        assert halves[0].class_batch.keys + halves[1].class_batch.keys == whole.class_batch.keys
        assert torch.equal(torch.cat([half.class_batch.latents for half in halves]), whole.class_batch.latents)
        noise = [torch.randn(3, generator=micro.noise_generator) for micro in (whole, *halves)]
        assert torch.equal(noise[0], noise[1]) and torch.equal(noise[0], noise[2])  # drawn for the whole
    assert any("<sks>" in caption for caption in whole.captions)  # the method's mapping is applied


def test_the_losses_of_two_process_shares_average_to_the_loss_of_the_whole_micro_batch(tiny_sd_dir):
    base = SimpleNamespace(base_model=str(tiny_sd_dir), base_model_config=None)
    models = load_models(base, torch.device("cpu"))
    accelerator = SimpleNamespace(device=torch.device("cpu"), autocast=lambda: torch.autocast("cpu", enabled=False))
    common = TrainCommon(snr_gamma=5.0, noise_offset=0.1)
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    captions = ["a red sks shape", "a blue sks shape", "a green shape", "a shape"]
    keys = ["a", "b", "c", "d"]
    method = Captions(MethodParams())

    def losses(share: ProcessShare) -> list[torch.Tensor]:
        rows = share.rows(len(captions) // share.count)
        with torch.no_grad():
            parts = [
                Batch(latents[rows], captions[rows], keys[rows]),
                Batch(latents.flip(0)[rows], captions[::-1][rows], keys[rows]),
            ]
            return diffusion_losses(
                method, models, parts, None, torch.Generator().manual_seed(7), common, accelerator, share
            )

    whole, halves = losses(ProcessShare(0, 1)), [losses(ProcessShare(p, 2)) for p in (0, 1)]
    for part in range(2):
        assert torch.allclose((halves[0][part] + halves[1][part]) / 2, whole[part], rtol=1e-6)
    assert not torch.allclose(halves[0][0], halves[1][0])  # the halves are different rows


def test_the_stage_launches_itself_only_with_processes_or_a_config(monkeypatch, tmp_path):
    monkeypatch.delenv(LAUNCHED, raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not needs_launch(TrainCommon())
    assert needs_launch(TrainCommon(processes=2))
    assert needs_launch(TrainCommon(accelerate_config="configs/accelerate/single_gpu.yaml"))
    monkeypatch.setenv(LAUNCHED, "1")  # a launched worker never launches again
    assert not needs_launch(TrainCommon(processes=2))

    command = launch_command("stages/train.py", ["lora"], 2, None, "cpu")
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert command[command.index("--num_processes") + 1] == "2" and "--multi_gpu" in command
    assert command[-2:] == ["stages/train.py", "lora"]
    config = tmp_path / "multi.yaml"
    config.write_text("num_processes: 8\n")
    command = launch_command("stages/train.py", ["lora"], 4, str(config), "auto")
    assert command[command.index("--config_file") + 1] == str(config)
    assert command[command.index("--num_processes") + 1] == "4"  # params win over the file
    with pytest.raises(SdpipeError, match="train.common.accelerate_config: .*missing.yaml is not a file"):
        launch_command("stages/train.py", ["lora"], 2, str(tmp_path / "missing.yaml"), "cpu")
    with pytest.raises(SdpipeError, match="base.device is cuda:1"):
        launch_command("stages/train.py", ["lora"], 2, None, "cuda:1")


@pytest.mark.parametrize("config", sorted((REPO / "configs" / "accelerate").glob("*.yaml")), ids=lambda path: path.name)
def test_the_shipped_accelerate_configs_load(config):
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(config))
    assert loaded.compute_environment.value == "LOCAL_MACHINE"
    if loaded.num_machines > 1:
        assert loaded.main_process_ip and loaded.main_process_port and loaded.machine_rank == 0


def test_a_run_with_another_number_of_processes_than_the_params_say_is_refused(tmp_path, tiny_sd_dir):
    params = parse_params(
        {
            "paths": {"latents": f"{tmp_path}/latents", "captions": f"{tmp_path}/captions"},
            "base": {"base_model": str(tiny_sd_dir), "datasets": ["star"], "device": "cpu"},
            "train": {"common": {"processes": 2}},
        }
    )
    with pytest.raises(SdpipeError, match="train.common.processes is 2, but this run has 1 process"):
        run_training(params, Captions(MethodParams(max_steps=1)), tmp_path / "out")


# --- the stage, in two processes ---------------------------------------------------------------------------------


def write_project(root: Path, base_model: Path, write_star_dataset, processes: int, batch_size: int) -> Path:
    """A project training textual inversion on the `star` dataset with `processes` × `batch_size` images a step."""
    write_star_dataset(root)
    common = {
        "processes": processes,
        "batch_size": batch_size,
        "checkpoint_every": 2,
        "keep_checkpoints": 2,
        "sample_every": 4,
        "sample_steps": 2,
        "lr_warmup_steps": 2,
        "caption_ops": {"shuffle_tags": True, "caption_dropout": 0.2},  # draws of their own, and no text cache
    }
    params = {
        "paths": {"captions": str(root / "captions"), "latents": str(root / "latents"), "train": str(root / "train")},
        "base": {"base_model": str(base_model), "datasets": ["star"], "device": "cpu"},
        "train": {
            "methods": ["textual_inversion"],
            "common": common,
            "textual_inversion": {"datasets": ["star"], "max_steps": MAX_STEPS},
        },
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    return root / "train" / "textual_inversion"


def train_command() -> list[str]:
    return [sys.executable, str(REPO / "stages" / "train.py"), "textual_inversion"]


def environment() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in (LAUNCHED, "WORLD_SIZE")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def run_stage(root: Path) -> str:
    done = subprocess.run(train_command(), cwd=root, env=environment(), capture_output=True, timeout=300, check=False)
    log = (done.stdout + done.stderr).decode()
    assert done.returncode == 0, log[-3000:]
    return " ".join(log.split())  # rich may wrap lines


def outputs(out_dir: Path) -> dict[str, bytes]:
    """Every file the stage wrote except its checkpoints, by relative path."""
    return {
        str(path.relative_to(out_dir)): path.read_bytes()
        for path in sorted(out_dir.rglob("*"))
        if path.is_file() and "checkpoints" not in path.relative_to(out_dir).parts
    }


def step_losses(out_dir: Path) -> list[float]:
    rows = (out_dir / "live" / "plots" / "metrics" / "loss.tsv").read_text().splitlines()[1:]
    return [float(row.split("\t")[1]) for row in rows]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, tiny_sd_dir, write_star_dataset) -> Path:
    """The output folder of an uninterrupted two-process run (2 × batch 1)."""
    root = tmp_path_factory.mktemp("two_processes")
    out_dir = write_project(root, tiny_sd_dir, write_star_dataset, processes=2, batch_size=1)
    log = run_stage(root)
    assert "launching" in log and "--num_processes 2" in log
    return out_dir


def test_two_processes_write_what_one_process_with_twice_the_batch_writes(
    tmp_path, tiny_sd_dir, write_star_dataset, two_process_run
):
    one_process = write_project(tmp_path, tiny_sd_dir, write_star_dataset, processes=1, batch_size=2)
    assert "launching" not in run_stage(tmp_path)
    two, one = outputs(two_process_run), outputs(one_process)
    assert {"model/sks.safetensors", "metrics.json", "samples/step-000008.png"} <= set(one)
    assert two.keys() == one.keys()
    loss_rows = two["live/plots/metrics/loss.tsv"].decode().splitlines()[1:]
    assert [int(row.split("\t")[0]) for row in loss_rows] == list(range(1, MAX_STEPS + 1))  # once, by the main process

    losses_two, losses_one = step_losses(two_process_run), step_losses(one_process)
    assert len(losses_two) == len(losses_one) == MAX_STEPS
    assert losses_two == pytest.approx(losses_one, rel=LOSS_TOLERANCE)
    metrics_two, metrics_one = json.loads(two["metrics.json"]), json.loads(one["metrics.json"])
    assert metrics_two["loss"] == pytest.approx(metrics_one["loss"], rel=LOSS_TOLERANCE)
    assert metrics_two["steps"] == metrics_one["steps"] and metrics_two["images"] == metrics_one["images"]
    embedding_two = load_file(str(two_process_run / "model" / "sks.safetensors"))
    embedding_one = load_file(str(one_process / "model" / "sks.safetensors"))
    assert embedding_two.keys() == embedding_one.keys()
    for name in embedding_one:
        assert torch.allclose(embedding_two[name], embedding_one[name], rtol=LOSS_TOLERANCE, atol=1e-7)


def test_a_killed_two_process_stage_resumes_and_ends_as_an_uninterrupted_run(
    tmp_path, tiny_sd_dir, write_star_dataset, two_process_run
):
    out_dir = write_project(tmp_path, tiny_sd_dir, write_star_dataset, processes=2, batch_size=1)
    kill_after = random.Random(os.getpid()).choice([2, 4])  # the checkpoint step after which to kill
    process = subprocess.Popen(
        train_command(), cwd=tmp_path, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 300
        while not any(step >= kill_after for step, _ in list_checkpoints(out_dir / "checkpoints")):
            assert process.poll() is None, "the stage ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        workers = psutil.Process(process.pid).children(recursive=True)
        assert len(workers) >= 2
        process.send_signal(signal.SIGKILL)  # the stage process, which became the launcher
    finally:
        process.kill()
        process.wait()
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, "the workers outlived their launcher"
    saved_steps = [step for step, _ in list_checkpoints(out_dir / "checkpoints")]
    assert saved_steps and max(saved_steps) < MAX_STEPS
    assert not (out_dir / "model").exists() and not (out_dir / "metrics.json").exists()

    for output in ("live", "samples"):  # as `dvc repro` deletes them before it runs the stage again
        shutil.rmtree(out_dir / output, ignore_errors=True)
    log = run_stage(tmp_path)
    assert f"(step {max(saved_steps)} of {MAX_STEPS})" in log, "the rerun did not resume from the last checkpoint"
    resumed, expected = outputs(out_dir), outputs(two_process_run)
    assert resumed.keys() == expected.keys()
    for name in expected:  # the embedding, the metrics, every sample and every DVCLive row
        assert resumed[name] == expected[name], f"{name} differs from the uninterrupted run's"
