"""An exponential moving average (EMA) of the trained weights, for the methods that train model weights.

`Ema` wraps diffusers' `EMAModel` (the average the diffusers training examples keep): after every optimizer step
each averaged weight moves toward the trained one, `ema -= (1 - decay) * (ema - weight)`, with diffusers' warmup:
the n-th update's decay is `min(ema_decay, n / (n + 9))`, except the first, which copies the weights. Its state goes
into each training checkpoint as `ema.safetensors`, so a resumed run continues the same average.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

from sdpipe.errors import SdpipeError
from sdpipe.io import save_safetensors

EMA_FILE = "ema.safetensors"


class Ema:
    """The moving average of `parameters` (kept on their device, in fp32 like them)."""

    def __init__(self, parameters: Sequence[torch.nn.Parameter], decay: float):
        from diffusers.training_utils import EMAModel

        self.average = EMAModel(list(parameters), decay=decay)

    @property
    def updates(self) -> int:
        """How many optimizer steps the average has taken in."""
        return self.average.optimization_step

    def step(self, parameters: Sequence[torch.nn.Parameter]) -> None:
        """Takes in the weights after an optimizer step."""
        self.average.step(parameters)

    def copy_to(self, parameters: Sequence[torch.nn.Parameter]) -> None:
        """Overwrites `parameters` with the averaged weights."""
        self.average.copy_to(parameters)

    def release(self) -> None:
        """Drops the averaged copy of the weights (after `copy_to`, when nothing more will read it)."""
        self.average.shadow_params = []

    @contextmanager
    def applied(self, parameters: Sequence[torch.nn.Parameter]) -> Iterator[None]:
        """The averaged weights in `parameters` for the duration of the block; the trained ones back afterwards."""
        self.average.store(parameters)
        self.average.copy_to(parameters)
        try:
            yield
        finally:
            self.average.restore(parameters)

    def save(self, folder: Path) -> None:
        """Writes the average into `folder/ema.safetensors` (tensors `0`, `1`, … in parameter order)."""
        shadows = self.average.shadow_params
        tensors = {str(index): shadow.detach().cpu().contiguous() for index, shadow in enumerate(shadows)}
        metadata = {"updates": str(self.updates), "decay": repr(self.average.decay)}
        save_safetensors(tensors, Path(folder) / EMA_FILE, metadata)

    def load(self, folder: Path) -> None:
        """Reads the average that `save` wrote into `folder`."""
        path = Path(folder) / EMA_FILE
        if not path.is_file():
            raise SdpipeError(
                f"{path}: the checkpoint has no EMA weights (it was made without EMA); delete {Path(folder).parent} "
                "or set train.common.resume to false to start over"
            )
        shadows = self.average.shadow_params
        with safe_open(str(path), framework="pt") as f:
            if len(f.keys()) != len(shadows):
                raise SdpipeError(f"{path}: holds {len(f.keys())} EMA tensors but {len(shadows)} weights train")
            with torch.no_grad():
                for index, shadow in enumerate(shadows):
                    shadow.copy_(f.get_tensor(str(index)))
            self.average.optimization_step = int((f.metadata() or {})["updates"])
