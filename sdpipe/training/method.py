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
  called, when the defaults (the model family's text conditioning and UNet call) do not fit, and
  `sample_embeddings(models, prompts)` the sample images' conditioning when it is not the text encoder's;
- `extra_loss(models, batch)`: a loss of its own added to the diffusion loss (DreamArtist's reconstruction);
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
from sdpipe.families import SD, Conditioning, ModelFamily
from sdpipe.training.data import PriorPreservation


@dataclass
class Models:
    """The parts of the base model that training uses. Trained ones may be wrapped by accelerate (DDP)."""

    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object
    device: torch.device
    family: ModelFamily = SD
    tokenizer_2: object = None
    text_encoder_2: torch.nn.Module | None = None
    """The second tokenizer and text encoder of a family that has two (SDXL)."""

    @property
    def tokenizers(self) -> list:
        return [getattr(self, name) for name in self.family.tokenizers]

    @property
    def text_encoders(self) -> list:
        return [getattr(self, name) for name in self.family.text_encoders]


@dataclass
class PredictedBatch:
    """One batch as the UNet saw it: its clean latents, the noised ones, their timesteps and the prediction."""

    latents: torch.Tensor
    noisy_latents: torch.Tensor
    timesteps: torch.Tensor
    prediction: torch.Tensor


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

    def encode_text(self, models: Models, captions: list[str]) -> Conditioning:
        """The UNet's conditioning for `captions`, as the model family's pipeline computes it (for SD 1.x/2.x the
        CLIP text encoder's last hidden states)."""
        return models.family.encode(models.tokenizers, models.text_encoders, captions, models.device)

    def predict(
        self,
        models: Models,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: Conditioning,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The UNet's prediction for a batch (a method may add conditioning or combine several calls)."""
        return models.family.predict(models.unet, noisy_latents, timesteps, conditioning, time_ids)

    def sample_embeddings(self, models: Models, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The (conditional, unconditional) UNet contexts of the sample prompts when the method's conditioning is
        not the text encoder's (CLIP inversion); None: the sampling pipeline encodes the prompts."""
        return None

    def extra_loss(self, models: Models, batch: PredictedBatch) -> torch.Tensor | None:
        """A loss added to the batch's diffusion loss (None, the default: none)."""
        return None

    def after_optimizer_step(self, models: Models) -> None:
        """Called after every optimizer step."""

    def save(self, models: Models, folder: Path, step: int) -> None:
        """Writes the method's final files into `folder` (an empty temporary folder, moved into place afterwards).

        `models` are unwrapped (plain diffusers/transformers modules).
        """
        raise NotImplementedError
