"""Fault injection: `kill -9` of a real `train@textual_inversion` stage process, then running it again.

The killed run must leave no model or metrics (only complete checkpoints), and the rerun must resume from the last
checkpoint and end with the same files an uninterrupted run writes.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sdpipe.training.checkpoints import list_checkpoints

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 40


def write_project(root: Path, base_model: Path, write_star_dataset, max_steps: int = MAX_STEPS) -> Path:
    """A project folder with the `star` dataset's captions and latents and a params.yaml training TI on them."""
    write_star_dataset(root)
    params = {
        "paths": {"captions": str(root / "captions"), "latents": str(root / "latents"), "train": str(root / "train")},
        "base": {"base_model": str(base_model), "datasets": ["star"], "device": "cpu"},
        "train": {
            "methods": ["textual_inversion"],
            "common": {
                "batch_size": 2,
                "checkpoint_every": 2,
                "keep_checkpoints": 2,
                "sample_every": 10,
                "sample_steps": 2,
            },
            "textual_inversion": {"datasets": ["star"], "max_steps": max_steps},
        },
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    return root / "train" / "textual_inversion"


def train_command() -> list[str]:
    return [sys.executable, str(REPO / "stages" / "train.py"), "textual_inversion"]


def environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def outputs(out_dir: Path) -> dict[str, bytes]:
    """Every file the stage wrote except its checkpoints, by relative path."""
    return {
        str(path.relative_to(out_dir)): path.read_bytes()
        for path in sorted(out_dir.rglob("*"))
        if path.is_file() and "checkpoints" not in path.relative_to(out_dir).parts
    }


def test_a_killed_train_stage_resumes_and_ends_as_an_uninterrupted_run(tmp_path, tiny_sd_dir, write_star_dataset):
    uninterrupted = write_project(tmp_path / "a", tiny_sd_dir, write_star_dataset)
    subprocess.run(train_command(), cwd=tmp_path / "a", env=environment(), check=True, capture_output=True)

    out_dir = write_project(tmp_path / "b", tiny_sd_dir, write_star_dataset)
    kill_after = random.Random(os.getpid()).choice([2, 4, 6, 8])  # the checkpoint step after which to kill
    process = subprocess.Popen(
        train_command(), cwd=tmp_path / "b", env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 300
        while not any(step >= kill_after for step, _ in list_checkpoints(out_dir / "checkpoints")):
            assert process.poll() is None, "the stage ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    saved_steps = [step for step, _ in list_checkpoints(out_dir / "checkpoints")]
    assert saved_steps and max(saved_steps) < MAX_STEPS
    assert not (out_dir / "model").exists() and not (out_dir / "metrics.json").exists()
    assert not [path for path in out_dir.rglob("*tmp*") if "checkpoints" not in path.relative_to(out_dir).parts]

    # `dvc repro` deletes a stage's outputs before running it again: the checkpoint must bring their history back.
    for output in ("live", "samples"):
        shutil.rmtree(out_dir / output, ignore_errors=True)
    rerun = subprocess.run(train_command(), cwd=tmp_path / "b", env=environment(), check=True, capture_output=True)
    log = " ".join((rerun.stdout + rerun.stderr).decode().split())  # rich may wrap lines
    assert f"(step {max(saved_steps)} of {MAX_STEPS})" in log, "the rerun did not resume from the last checkpoint"
    loss_rows = (out_dir / "live" / "plots" / "metrics" / "loss.tsv").read_text().splitlines()[1:]
    assert [int(row.split("\t")[0]) for row in loss_rows] == list(range(1, MAX_STEPS + 1))  # one row per step
    resumed, expected = outputs(out_dir), outputs(uninterrupted)
    assert {"model/sks.safetensors", "metrics.json", "samples/step-000040.png"} <= set(expected)
    assert resumed.keys() == expected.keys()
    for name in expected:  # the model, the metrics, every sample and every DVCLive row
        assert resumed[name] == expected[name], f"{name} differs from the uninterrupted run's"


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_train_stage_writes_no_model(tmp_path, tiny_sd_dir, write_star_dataset, signal_number):
    # far more steps than run before the signal lands: a busy machine may delay this process's polling, and a short
    # run could then finish (and write its model) before it is stopped
    out_dir = write_project(tmp_path, tiny_sd_dir, write_star_dataset, max_steps=100_000)
    process = subprocess.Popen(
        train_command(),
        cwd=tmp_path,
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # as from a terminal: a shell without job control starts background commands with SIGINT ignored, and
        # the stage, inheriting that, would never see the Ctrl-C this test sends
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 300
        while not list_checkpoints(out_dir / "checkpoints"):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        process.send_signal(signal_number)
        process.wait(timeout=60)
    finally:
        process.kill()
        process.wait()
    assert process.returncode != 0
    assert not (out_dir / "model").exists() and not (out_dir / "metrics.json").exists()
