"""Full fine-tuning: every weight of the UNet (and optionally of the text encoder) trains on captioned datasets.

1. `setup` (`WeightTrainingMethod`) unfreezes the whole UNet, and the text encoder when `train_text_encoder` is on,
   which then trains at its own `text_encoder_learning_rate`.
2. The training core (`sdpipe.training`) trains on the datasets' cached latents and their captions as they are
   (after `train.common.caption_ops`), and keeps an exponential moving average of the weights (`ema_decay`, on by
   default), checkpointed with them.
3. `save` writes the averaged weights as a whole model: `model/diffusers/` (a diffusers folder) and
   `model/model.safetensors` (a single-file checkpoint in the original SD layout).
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdpipe.training import run_training
from sdpipe.training.weight_training import WeightTrainingMethod, load_trained_pipeline


def train(params, out_dir: Path) -> dict:
    """The `train@finetune` stage: fine-tunes the base model and writes `<out_dir>/model/`."""
    return run_training(params, Finetune(params.train.finetune, params.base), out_dir)


def sampling_pipeline(params, model_dir: Path, device: torch.device):
    """The fine-tuned pipeline (loaded from its diffusers folder) and the word that names the concept in prompts
    (the captions' trigger word, as for the base model)."""
    return load_trained_pipeline(model_dir, device), params.evaluate.trigger


class Finetune(WeightTrainingMethod):
    """Trains the model's weights on the captions as they are."""

    name = "finetune"
