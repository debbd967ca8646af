"""What the methods that train the model's own weights share (full fine-tuning, DreamBooth): which weights train and
at what learning rates, their caption dropout (which keeps the unconditional prediction that classifier-free guidance
subtracts in step with the conditional one), the EMA setting, and the outputs, a whole Stable Diffusion model in two
formats:

- `model/diffusers/`: a diffusers folder of the base model's family (`StableDiffusionPipeline`,
  `StableDiffusionXLPipeline`), the base model's (VAE, tokenizers, scheduler, ...) with the trained UNet (and text
  encoders); `<PipelineClass>.from_pretrained(folder)` loads it;
- `model/model.safetensors`: the same UNet, VAE and text encoders as one single-file checkpoint in the original
  layout (SD 1.x/2.x's, or SDXL's `conditioner.embedders`; A1111, ComfyUI;
  `<PipelineClass>.from_single_file(path, config=folder)`).

When the method keeps an EMA (`ema_decay`), the training core puts the averaged weights into the models before
`save`, so both files hold them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdpipe.config.base import BaseParams
from sdpipe.config.caption import CaptionOps
from sdpipe.config.train import WeightTrainingParams
from sdpipe.models.loading import load_pipeline
from sdpipe.models.saving import save_pipeline
from sdpipe.models.single_file import save_single_file
from sdpipe.training.method import Models, TrainingMethod

DIFFUSERS_DIR = "diffusers"
SINGLE_FILE = "model.safetensors"


def load_trained_pipeline(model_dir: Path, device: str | torch.device = "cpu"):
    """The trained model as a user loads it: the pipeline of `<model_dir>/diffusers`, in its family's class."""
    return load_pipeline(str(Path(model_dir) / DIFFUSERS_DIR), device=device, key=f"{model_dir}/{DIFFUSERS_DIR}")


class WeightTrainingMethod(TrainingMethod):
    """Trains every UNet weight, and the text encoders' when `train_text_encoder` is on (at their own learning rate)."""

    def __init__(self, params: WeightTrainingParams, base: BaseParams):
        super().__init__(params)
        self.base = base
        self.trained_models = ("unet", "text_encoder") if params.train_text_encoder else ("unet",)

    @property
    def ema_decay(self) -> float | None:
        return self.params.ema_decay

    def caption_ops(self, common_ops: CaptionOps) -> CaptionOps:
        """`train.common.caption_ops` with this method's own `caption_dropout`, when it has one."""
        if self.params.caption_dropout is None:
            return common_ops
        return common_ops.model_copy(update={"caption_dropout": self.params.caption_dropout})

    def setup(self, models: Models) -> None:
        models.unet.requires_grad_(True)
        self.unet_parameters = list(models.unet.parameters())
        self.text_encoder_parameters = []
        if self.params.train_text_encoder:  # every text encoder of the family (SDXL's two)
            self.trained_models = ("unet", *models.family.text_encoders)
            for text_encoder in models.text_encoders:
                text_encoder.requires_grad_(True)
                self.text_encoder_parameters += list(text_encoder.parameters())

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return self.unet_parameters + self.text_encoder_parameters

    def parameter_groups(self) -> list[dict]:
        groups = [{"params": self.unet_parameters}]  # at `learning_rate`
        if self.text_encoder_parameters:
            groups.append({"params": self.text_encoder_parameters, "lr": self.params.text_encoder_learning_rate})
        return groups

    def save(self, models: Models, folder: Path, step: int) -> None:
        """The base pipeline with the trained models in it, as a diffusers folder and as a single file."""
        trained = {name: getattr(models, name) for name in self.trained_models}
        pipeline = load_pipeline(self.base.base_model, self.base.base_model_config, components=trained)
        save_pipeline(pipeline, folder / DIFFUSERS_DIR)
        metadata = {"sdpipe_method": self.name, "sdpipe_steps": str(step), "sdpipe_base_model": self.base.base_model}
        save_single_file(pipeline, folder / SINGLE_FILE, metadata=metadata)
