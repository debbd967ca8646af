"""The optimizer (AdamW, 8-bit when bitsandbytes and CUDA allow) and the learning-rate schedule."""

from __future__ import annotations

import importlib.util

import torch

from sdpipe.config.train import TrainCommon
from sdpipe.progress import log


def make_optimizer(
    parameters: list[torch.nn.Parameter], learning_rate: float, common: TrainCommon, device: torch.device
):
    """AdamW over `parameters` (fused on CUDA); bitsandbytes' AdamW8bit when `use_8bit_adam`, it is installed and
    `device` is CUDA."""
    kwargs = {
        "lr": learning_rate,
        "betas": (common.adam_beta1, common.adam_beta2),
        "eps": common.adam_epsilon,
        "weight_decay": common.weight_decay,
    }
    if common.use_8bit_adam and device.type == "cuda" and importlib.util.find_spec("bitsandbytes") is not None:
        import bitsandbytes as bnb

        log("optimizer: bitsandbytes AdamW8bit")
        return bnb.optim.AdamW8bit(parameters, **kwargs)
    # fused: one kernel for all parameters on CUDA; None keeps PyTorch's default (foreach) elsewhere
    return torch.optim.AdamW(parameters, **kwargs, fused=True if device.type == "cuda" else None)


def make_lr_scheduler(optimizer, common: TrainCommon, max_steps: int):
    """diffusers' `get_scheduler`, stepped once per optimizer step."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        common.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=common.lr_warmup_steps,
        num_training_steps=max_steps,
    )
