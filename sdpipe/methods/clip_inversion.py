"""CLIP inversion: textual inversion's idea in CLIP image-embedding space.

A model conditioned on CLIP image embeddings (an image-variations model: SD image variations, unCLIP's decoder; the
tiny world ships one, `artifacts/pretrain/tinyworld_variations/`, fine-tuned from its text UNet by `pretrain`) draws
what an embedding describes. CLIP inversion learns one vector in that space for a concept:

1. `setup` swaps the base UNet for the image-variations UNet (same latent space) and puts the concept vector where
   the text encoder was: `ConceptContext` gives the vector as the UNet's one-token context for a caption, and zeros
   (the image-variations model's unconditional input) for a dropped caption. The vector starts from the mean CLIP
   image embedding of the training images (`init: dataset_mean`).
2. The training core runs the diffusion loss through the frozen UNet; only the vector trains.
3. `save` writes `clip_embedding.safetensors`: `clip_image_embedding` [1, dim] (the learned vector) and
   `clip_image_embedding_init` (where it started). Use it as diffusers' image-variations pipeline uses an
   image's embedding: `encoder_hidden_states = vector[:, None, :]`, zeros for the unconditional pass
   (`StableDiffusionPipeline(..., unet=variations_unet)(prompt_embeds=..., negative_prompt_embeds=zeros)`).

The model has no text input: a prompt either names the concept (`train.clip_inversion.trigger_word`) or is refused.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from sdpipe.encode import dataset_images
from sdpipe.errors import SdpipeError
from sdpipe.families import Conditioning
from sdpipe.io import save_safetensors
from sdpipe.models.clip_image import ClipImageEncoder
from sdpipe.models.loading import resolve_device
from sdpipe.sampling import sample
from sdpipe.tinyworld import oracle
from sdpipe.training import Models, TrainingMethod, run_training
from sdpipe.training.datasets import method_datasets

KEY = "train.clip_inversion"
EMBEDDING_FILE = "clip_embedding.safetensors"
LEARNED, INIT = "clip_image_embedding", "clip_image_embedding_init"


def train(params, out_dir: Path) -> dict:
    """The `train@clip_inversion` stage: learns the vector and writes `<out_dir>/model/clip_embedding.safetensors`."""
    settings = params.train.clip_inversion
    check_variations_model(settings.variations_model)
    datasets = method_datasets(params.base.datasets, settings.datasets, KEY)
    images = [image for name in datasets for image in dataset_images(Path(params.paths.prepared) / name)]
    if settings.init == "dataset_mean":
        encoder = ClipImageEncoder.from_pipeline_folder(settings.variations_model, resolve_device(params.base.device))
        start = encoder.features(images).mean(0)
    else:
        start = torch.zeros(image_embedding_size(settings.variations_model))
    return run_training(params, ClipInversion(settings, start[None]), out_dir)


def check_variations_model(folder: str) -> None:
    parts = ("unet", "image_encoder", "feature_extractor")
    if not all((Path(folder) / part).is_dir() for part in parts):
        raise SdpipeError(
            f"{KEY}.variations_model: {folder} is not an image-variations model folder ({', '.join(parts)}/); the "
            "tiny world's is built by the `pretrain` stage (artifacts/pretrain/tinyworld_variations)"
        )


def image_embedding_size(folder: str) -> int:
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig.from_pretrained(Path(folder) / "image_encoder").projection_dim


class ConceptContext(torch.nn.Module):
    """The image-variations UNet's context in place of a text encoder's: the concept vector as one token for a
    caption, zeros (the unconditional input) for a dropped (empty) caption."""

    def __init__(self, start: torch.Tensor):
        super().__init__()
        self.vector = torch.nn.Parameter(start.clone().float())  # [1, dim]

    def forward(self, conditioned: torch.Tensor) -> torch.Tensor:
        """`conditioned`: [batch] booleans; returns [batch, 1, dim]."""
        return torch.where(conditioned[:, None, None], self.vector[None], torch.zeros_like(self.vector[None]))

    def gradient_checkpointing_enable(self) -> None:
        """Nothing to recompute: one vector."""


class ClipInversion(TrainingMethod):
    """Trains the concept vector; the image-variations UNet stays frozen."""

    name = "clip_inversion"
    trained_models = ("text_encoder",)  # where `ConceptContext` stands in for the text encoder

    def __init__(self, params, start: torch.Tensor):
        super().__init__(params)
        self.start = start

    def setup(self, models: Models) -> None:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(Path(self.params.variations_model) / "unet")
        if unet.config.in_channels != models.unet.config.in_channels:
            raise SdpipeError(
                f"{KEY}.variations_model: its UNet takes {unet.config.in_channels} latent channels, base.base_model's "
                f"{models.unet.config.in_channels}; they must share the VAE"
            )
        models.unet = unet.requires_grad_(False).eval()
        self.context = models.text_encoder = ConceptContext(self.start)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [self.context.vector]

    def encode_text(self, models: Models, captions: list[str]) -> Conditioning:
        conditioned = torch.tensor([bool(caption.strip()) for caption in captions], device=models.device)
        return Conditioning(models.text_encoder(conditioned))

    def sample_embeddings(self, models: Models, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Every sample prompt draws the concept (the model reads no text)."""
        vectors = models.text_encoder(torch.ones(len(prompts), dtype=torch.bool, device=models.device))
        return vectors, torch.zeros_like(vectors)

    def save(self, models: Models, folder: Path, step: int) -> None:
        learned = models.text_encoder.vector.detach().float().cpu().contiguous()
        metadata = {"variations_model": str(self.params.variations_model), "step": str(step)}
        save_safetensors({LEARNED: learned, INIT: self.start.float().contiguous()}, folder / EMBEDDING_FILE, metadata)


# ---------------------------------------------------------------------------------------------------------
# Sampling and evaluation


def load_embedding(model_dir: Path) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The learned vector [1, dim], the one it started from, and the file's metadata."""
    path = Path(model_dir) / EMBEDDING_FILE
    if not path.is_file():
        raise SdpipeError(f"{path}: missing; run `dvc repro train@clip_inversion` first")
    with safe_open(str(path), "pt") as f:
        if not {LEARNED, INIT} <= set(f.keys()):
            raise SdpipeError(f"{path}: not a CLIP inversion embedding (needs {LEARNED} and {INIT})")
        return f.get_tensor(LEARNED), f.get_tensor(INIT), f.metadata() or {}


class ConceptPipeline(StableDiffusionPipeline):
    """The image-variations model driven by prompts: a prompt that names the concept (the trigger word) is drawn
    from the concept vector, with zeros as the unconditional input; any other prompt is refused."""

    concept: torch.Tensor
    trigger_word: str

    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None, **kwargs):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
        strays = [text for text in prompts if self.trigger_word.lower() not in text.lower().split()]
        if not prompts or strays:
            raise SdpipeError(
                f"clip_inversion draws its concept only: name it with {self.trigger_word!r} in the prompt "
                f"(the image-variations model reads no text); got {strays[0] if strays else prompt!r}"
            )
        if negative_prompt:
            raise SdpipeError("clip_inversion takes no negative prompt (the model reads no text)")
        vectors = self.concept.to(self.device, self.unet.dtype)[None].expand(len(prompts), -1, -1)
        return super().__call__(prompt_embeds=vectors, negative_prompt_embeds=torch.zeros_like(vectors), **kwargs)


def sampling_pipeline(params, model_dir: Path, device: torch.device):
    """The image-variations model with the learned vector, and the word that names the concept in prompts."""
    from diffusers import StableDiffusionImageVariationPipeline

    learned, _, metadata = load_embedding(model_dir)
    folder = metadata.get("variations_model") or params.train.clip_inversion.variations_model
    check_variations_model(folder)
    parts = StableDiffusionImageVariationPipeline.from_pretrained(folder, safety_checker=None, local_files_only=True)
    pipeline = ConceptPipeline(
        vae=parts.vae, text_encoder=None, tokenizer=None, unet=parts.unet, scheduler=parts.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).to(device)
    pipeline.concept, pipeline.trigger_word = learned, params.train.clip_inversion.trigger_word
    return pipeline, pipeline.trigger_word


def evaluation_metrics(params, method_dir: Path, concept: str) -> dict:
    """What evaluate reports for this method: the model reads no prompts, so only the concept is sampled
    (`evaluate.seeds_per_prompt` × 4 seeds): `fidelity`, the share the oracle reads as the shape of `concept` (its
    dataset's, a key of `evaluate.concepts`), for the learned vector and for the one it started from
    (`fidelity_at_init`: plain image variations of the dataset's mean embedding)."""
    settings = params.evaluate
    concept_shape = settings.concepts[concept].shape
    if concept_shape is None:
        raise SdpipeError(f"clip_inversion: its dataset's concept {concept!r} is a style; CLIP inversion learns a shape")
    device = resolve_device(params.base.device)
    pipeline, trigger = sampling_pipeline(params, Path(method_dir) / "model", device)
    pipeline.set_progress_bar_config(disable=True)
    learned, start, _ = load_embedding(Path(method_dir) / "model")
    seeds = list(range(settings.seeds_per_prompt * 4))
    metrics = {"images": len(seeds)}
    for name, vector in (("fidelity", learned), ("fidelity_at_init", start)):
        pipeline.concept = vector
        images = sample(pipeline, [f"a {trigger}"], seeds, settings.steps, settings.guidance_scale, settings.batch_size)
        shapes = [reading.shape for reading in oracle.read_batch(images)]
        metrics[name] = round(sum(shape == concept_shape for shape in shapes) / len(shapes), 4)
    metrics["concept_rates"] = {concept: metrics["fidelity"]}
    return metrics
