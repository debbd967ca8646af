"""Data-parallel training: how a `train@<method>` stage launches itself under `accelerate launch`, and which rows
of each batch a process trains on.

With `train.common.processes` above 1 (or an `accelerate_config`), `stages/train.py` replaces itself by
`accelerate launch --num_processes N stages/train.py <method>`: `dvc repro` and `dvc exp run` then run the
processes and record their outputs in `dvc.lock` like any other stage run. Each launched process (a "worker")
runs the stage as usual.

The processes split every micro-batch of the stream that one process would train on with a batch of
processes × `batch_size`: process `p` takes rows `p × batch_size` to `(p + 1) × batch_size` of it, and of its
noise, timesteps and caption changes, which every process draws for the whole micro-batch. N processes therefore
train on exactly the draws of one process with an N times larger batch; only the sums and means of the gradients
and losses are made in another order (DDP's all-reduce), so the results agree to rounding, not bit for bit.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from sdpipe.errors import SdpipeError
from sdpipe.progress import log
from sdpipe.training.data import Batch

LAUNCHED = "SDPIPE_LAUNCHED"
"""In the environment of the processes that a stage launched (so that they never launch again): the process id of
their launcher, which is the stage's own (the stage process becomes the launcher)."""


@dataclass(frozen=True)
class ProcessShare:
    """The rows of each micro-batch that process `index` of `count` trains on."""

    index: int = 0
    count: int = 1

    def rows(self, size: int) -> slice:
        """This process's rows of a micro-batch of `count` × `size` rows."""
        return slice(self.index * size, (self.index + 1) * size)

    def take(self, batch: Batch) -> Batch:
        """This process's rows of `batch`, a whole micro-batch."""
        if len(batch.keys) % self.count:
            raise ValueError(f"a batch of {len(batch.keys)} rows does not split over {self.count} processes")
        rows = self.rows(len(batch.keys) // self.count)
        return batch.rows(rows)


ONE_PROCESS = ProcessShare()
"""All of each micro-batch: a run without other processes."""


def is_launched() -> bool:
    """Whether this process is one of several that a launcher started (by this stage, or by hand)."""
    return LAUNCHED in os.environ or "WORLD_SIZE" in os.environ


def needs_launch(common) -> bool:
    """Whether the stage must launch itself under accelerate (`train.common.processes` / `accelerate_config`)."""
    return (common.processes > 1 or common.accelerate_config is not None) and not is_launched()


def launch_command(script: str, args: list[str], processes: int, config_file: str | None, device: str) -> list[str]:
    """The `accelerate launch` command that runs `script args` in `processes` processes.

    Without a config file: one machine, processes on the GPUs or, with `base.device: cpu` or without CUDA, on the CPU
    (accelerate's multi-GPU launcher is torchrun; the Accelerator, made with `cpu=True`, then joins the processes
    with the gloo backend). Precision is not passed: the Accelerator takes it from `base.precision`.
    """
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes)]
    if config_file is not None:
        path = Path(config_file).expanduser()
        if not path.is_file():
            raise SdpipeError(f"train.common.accelerate_config: {config_file} is not a file")
        command += ["--config_file", str(path)]
    else:
        if device.startswith("cuda:") and processes > 1:
            raise SdpipeError(
                f"base.device is {device}, but train.common.processes ({processes}) processes take one GPU each; set "
                "base.device to auto or cuda, and choose the GPUs with CUDA_VISIBLE_DEVICES or the gpu_ids of "
                "train.common.accelerate_config"
            )
        if processes > 1:
            command += ["--multi_gpu", "--main_process_port", str(free_port())]
        command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return [*command, script, *args]


def launch(command: list[str]) -> None:
    """Replaces this process by `command` (so signals sent to the stage reach the launcher, which passes them on to
    its workers); where a process cannot be replaced, runs it and exits with its status. Does not return."""
    log(f"launching {' '.join(command[1:])}")
    env = {**os.environ, LAUNCHED: str(os.getpid())}
    sys.stdout.flush()
    sys.stderr.flush()
    if os.name == "posix":
        os.execve(sys.executable, command, env)
    sys.exit(subprocess.run(command, env=env, check=False).returncode)


def die_with_launcher() -> None:
    """Makes the kernel kill this worker when its launcher dies (Linux). torchrun starts each worker in a session of
    its own, so a worker whose launcher was killed (`kill -9` of the stage) would go on training, and even write the
    outputs, beside the next run of the stage."""
    if sys.platform != "linux" or LAUNCHED not in os.environ:
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if str(os.getppid()) != os.environ[LAUNCHED]:  # the launcher died before the call above
        os.kill(os.getpid(), signal.SIGKILL)


def free_port() -> int:
    """A TCP port free now, for the processes' rendezvous (two stages launched at once must not share one)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
