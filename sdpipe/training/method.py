"""The seam between the training core and a training method.

A method subclasses `TrainingMethod` and says:

- `setup(models)`: how it changes the base models (new tokens, adapters) and which parameters train
  (the core has already frozen everything; `setup` turns on `requires_grad` where it trains);
- `trainable_parameters()`: what the optimizer updates (`parameter_groups()`: in groups with their own learning
  rates, when one rate does not fit all);
- `trained_models`: which `Models` attributes hold those parameters (the core prepares them with accelerate
  for mixed precision and multi-GPU, and checkpoints them);
- `caption(text)`: how a caption (or sample prompt) is rewritten for it (e.g. the trigger word becomes a token);
  `caption_ops(common_ops)`: the caption operations (dropout, shuffles) it trains with, when not `train.common`'s;
- `encode_text(models, captions)` / `predict(models, ...)`: how a batch's conditioning is built and the UNet
  called, when the defaults (CLIP text encoder hidden states; a plain UNet call) do not fit, and
  `sample_embeddings(models, prompts)` the sample images' conditioning when it is not the text encoder's;
- `after_optimizer_step(models)`: anything to restore after an update;
- `save(models, folder, step)`: its final files, in the formats the ecosystem loads;
- `ema_decay`: for methods that train model weights, an exponential moving average of them, saved instead of the
  last weights (None: none);
- `prior_preservation()`: class images to train beside its own (DreamBooth), with the weight of their loss.

The core (`sdpipe.training.loop.run_training`) does everything else: data, noise, loss, optimizer, schedule,
mixed precision, checkpoints and resume, samples, metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sdpipe.config.caption import CaptionOps
from sdpipe.config.train import MethodParams
from sdpipe.training.data import PriorPreservation


@dataclass
class Models:
    """The parts of the base model that training uses. Trained ones may be wrapped by accelerate (DDP)."""

    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object
    device: torch.device


class TrainingMethod:
    """Base class of the training methods; the defaults suit a method that trains the UNet only."""

    name: str = ""
    """The method's name: its params are `train.<name>`, its outputs `<paths.train>/<name>/`."""

    trained_models: tuple[str, ...] = ()
    """`Models` attributes (`unet`, `text_encoder`) whose parameters train."""

    def __init__(self, params: MethodParams):
        self.params = params

    @property
    def params_key(self) -> str:
        """The method's params section, for error messages."""
        return f"train.{self.name}"

    @property
    def text_encoder_trains(self) -> bool:
        """Whether text encoder outputs change during training (then they are never cached)."""
        return "text_encoder" in self.trained_models

    def setup(self, models: Models) -> None:
        """Changes the (frozen, CPU, fp32) base models before training and turns on `requires_grad` where it trains."""

    @property
    def ema_decay(self) -> float | None:
        """Keep an exponential moving average of the trained parameters with this decay (`sdpipe.training.ema`) and
        save it instead of the last weights; None: no average."""
        return None

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        raise NotImplementedError

    def parameter_groups(self) -> list[dict]:
        """The optimizer's parameter groups (`{"params": [...], "lr": ...}`; a group without `lr` trains at
        `learning_rate`); by default one group of `trainable_parameters()`."""
        return [{"params": self.trainable_parameters()}]

    def prior_preservation(self) -> PriorPreservation | None:
        """Class images to train beside the method's own images, and the weight of their loss; None: none."""
        return None

    def caption_ops(self, common_ops: CaptionOps) -> CaptionOps:
        """The caption operations applied to the dataset captions before `caption`: `train.common.caption_ops`."""
        return common_ops

    def caption(self, caption: str) -> str:
        """The caption this method trains on (and the sample prompt it samples) for a dataset caption."""
        return caption

    def encode_text(self, models: Models, captions: list[str]) -> torch.Tensor:
        """The UNet's `encoder_hidden_states` for `captions`: the CLIP text encoder's last hidden states."""
        tokenizer = models.tokenizer
        input_ids = tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return models.text_encoder(input_ids.to(models.device))[0]

    def predict(
        self, models: Models, noisy_latents: torch.Tensor, timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        """The UNet's prediction for a batch (a method may add conditioning or combine several calls)."""
        return models.unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]

    def sample_embeddings(self, models: Models, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The (conditional, unconditional) UNet contexts of the sample prompts when the method's conditioning is
        not the text encoder's (CLIP inversion); None: the sampling pipeline encodes the prompts."""
        return None

    def after_optimizer_step(self, models: Models) -> None:
        """Called after every optimizer step."""

    def save(self, models: Models, folder: Path, step: int) -> None:
        """Writes the method's final files into `folder` (an empty temporary folder, moved into place afterwards).

        `models` are unwrapped (plain diffusers/transformers modules).
        """
        raise NotImplementedError
