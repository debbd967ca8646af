"""Aesthetic gradients (Gallego 2022; A1111's stable-diffusion-webui-aesthetic-gradients extension).

A style is given by images; nothing of the model is trained ahead of time:

1. `train` (the stage) computes the aesthetic embedding: the mean CLIP image embedding of the datasets' prepared
   images, normalized, and writes it as `model/<name>.pt` (the extension's layout: a plain [1, dim] tensor saved
   with `torch.save`; loads with `weights_only=True`) and `model/<name>.safetensors` (key `aesthetic_embedding`).
2. At sampling time, for each prompt, a copy of the text encoder takes `aesthetic_steps` Adam steps that raise
   the cosine similarity between the prompt's CLIP text embedding (the pooled output through CLIP's
   `text_projection`) and the aesthetic embedding. The copy's hidden states are blended into the prompt's
   conditioning: (1 - `aesthetic_weight`) × original + `aesthetic_weight` × steered. `AestheticGradientPipeline`
   does this inside `encode_prompt`, so any caller of the pipeline gets steered prompts; the negative prompt is
   left as it is.

The text projection and the image features must come from the CLIP whose text tower is the base model's text
encoder: the tiny world ships it beside the base (`clip/`, with the base's `feature_extractor/`); for SD 1.x it is
openai/clip-vit-large-patch14 (`train.aesthetic_gradient.clip_model`).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from sdpipe.encode import dataset_images
from sdpipe.errors import SdpipeError
from sdpipe.io import atomic_path, save_safetensors, write_json
from sdpipe.models.clip_image import ClipImageEncoder
from sdpipe.models.loading import load_pipeline, resolve_device
from sdpipe.training.datasets import method_datasets

KEY = "train.aesthetic_gradient"
SAFETENSORS_KEY = "aesthetic_embedding"


def train(params, out_dir: Path) -> dict:
    """The `train@aesthetic_gradient` stage: writes `<out_dir>/model/<name>.pt` and `.safetensors` and metrics."""
    settings = params.train.aesthetic_gradient
    out_dir = Path(out_dir)
    device = resolve_device(params.base.device)
    datasets = method_datasets(params.base.datasets, settings.datasets, KEY)
    images = [image for name in datasets for image in dataset_images(Path(params.paths.prepared) / name)]

    encoder = ClipImageEncoder.load(settings.clip_model, params.base.base_model, device, key=f"{KEY}.clip_model")
    features = encoder.features(images)
    embedding = aesthetic_embedding(features)
    name = embedding_name(settings, datasets)

    with atomic_path(out_dir / "model") as tmp:
        tmp.mkdir()
        torch.save(embedding.clone(), tmp / f"{name}.pt")
        metadata = {"datasets": ",".join(datasets), "images": str(len(images)), "name": name}
        save_safetensors({SAFETENSORS_KEY: embedding}, tmp / f"{name}.safetensors", metadata)
    # The outputs every train@<method> stage declares in dvc.yaml; this method has no steps to log or resume.
    for folder in ("samples", "live/plots/metrics"):
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
    similarity = torch.nn.functional.normalize(features, dim=-1) @ embedding.T
    metrics = {"images": len(images), "embedding_dim": embedding.shape[1], "mean_similarity": round(float(similarity.mean()), 4)}
    write_json(out_dir / "metrics.json", metrics)
    return metrics


def sampling_pipeline(params, model_dir: Path, device: torch.device):
    """The base pipeline that steers every prompt toward the aesthetic embedding in `model_dir`, and the trigger
    word of its prompts (`evaluate.trigger`: this method learns a style, not a concept word)."""
    settings = params.train.aesthetic_gradient
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if len(files) != 1:
        raise SdpipeError(f"{model_dir}: expected one aesthetic embedding (.safetensors), found {len(files)}")
    embedding = load_embedding(files[0])
    base = load_pipeline(params.base.base_model, params.base.base_model_config, device=device)
    pipeline = AestheticGradientPipeline(**base.components, requires_safety_checker=False)
    projection = load_text_projection(settings.clip_model, params.base.base_model)
    pipeline.set_aesthetic(embedding, projection, settings)
    return pipeline, params.evaluate.trigger


def aesthetic_embedding(features: torch.Tensor) -> torch.Tensor:
    """The unit-norm mean of the (unnormalized) CLIP image embeddings `features` [N, dim], as [1, dim] fp32."""
    mean = features.float().mean(dim=0, keepdim=True)
    return torch.nn.functional.normalize(mean, dim=-1).contiguous()


def embedding_name(settings, datasets: list[str]) -> str:
    return settings.embedding_name or "-".join(datasets)


def load_embedding(path: Path) -> torch.Tensor:
    """A saved aesthetic embedding (`.safetensors`, or an A1111 `.pt` read with `weights_only=True`), unit-norm [1, dim]."""
    path = Path(path)
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            if SAFETENSORS_KEY not in f.keys():  # noqa: SIM118 (safe_open has no __contains__)
                raise SdpipeError(f"{path}: no {SAFETENSORS_KEY!r} tensor; not an aesthetic embedding")
            embedding = f.get_tensor(SAFETENSORS_KEY)
    else:
        embedding = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(embedding, torch.Tensor):
            raise SdpipeError(f"{path}: expected a tensor [1, dim] (A1111 aesthetic embedding)")
    return torch.nn.functional.normalize(embedding.float().reshape(1, -1), dim=-1)


def load_text_projection(clip_model: str | None, base_model: str) -> torch.nn.Linear:
    """CLIP's `text_projection` (pooled text output → the shared embedding space), from `clip_model` or `<base>/clip`."""
    folder = Path(clip_model) if clip_model else Path(base_model) / "clip"
    path = folder / "model.safetensors"
    if not path.is_file():
        raise SdpipeError(
            f"{KEY}.clip_model: {path} does not exist; the text projection comes from the CLIP model of the base "
            "model's text encoder (a CLIPModel folder with model.safetensors)"
        )
    with safe_open(str(path), "pt") as f:
        if "text_projection.weight" not in f.keys():  # noqa: SIM118 (safe_open has no __contains__)
            raise SdpipeError(f"{path}: no text_projection.weight; expected a CLIPModel (text and vision towers)")
        weight = f.get_tensor("text_projection.weight").float()
    projection = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    projection.weight.data.copy_(weight)
    return projection.requires_grad_(False)


def slerp(low: torch.Tensor, high: torch.Tensor, weight: float) -> torch.Tensor:
    """Spherical interpolation between the vectors of the last dimension (lengths interpolate linearly)."""
    low_unit = torch.nn.functional.normalize(low, dim=-1)
    high_unit = torch.nn.functional.normalize(high, dim=-1)
    omega = torch.acos((low_unit * high_unit).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))
    direction = (torch.sin((1 - weight) * omega) * low_unit + torch.sin(weight * omega) * high_unit) / torch.sin(omega)
    length = (1 - weight) * low.norm(dim=-1, keepdim=True) + weight * high.norm(dim=-1, keepdim=True)
    return direction * length


def tuned_text_encoder(
    text_encoder: torch.nn.Module,
    projection: torch.nn.Linear,
    input_ids: torch.Tensor,
    embedding: torch.Tensor,
    steps: int,
    learning_rate: float,
) -> torch.nn.Module:
    """A copy of `text_encoder` (fp32) tuned for `steps` Adam steps to bring the projected pooled output of
    `input_ids` [1, length] toward `embedding` (unit-norm [1, dim]); `text_encoder` itself is untouched."""
    model = copy.deepcopy(text_encoder).float().requires_grad_(True)
    projection = projection.to(input_ids.device)
    embedding = embedding.to(input_ids.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    with torch.enable_grad():
        for _ in range(steps):
            pooled = model(input_ids).pooler_output
            text = torch.nn.functional.normalize(projection(pooled), dim=-1)
            loss = -(text @ embedding.T).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.requires_grad_(False)


@torch.no_grad()
def hidden_states(text_encoder: torch.nn.Module, input_ids: torch.Tensor, clip_skip: int | None = None) -> torch.Tensor:
    """The conditioning of `input_ids`, as diffusers' `encode_prompt` computes it (with `clip_skip`)."""
    if clip_skip is None:
        return text_encoder(input_ids)[0]
    hidden = text_encoder(input_ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm(hidden)  # transformers 4.x wraps it


class AestheticGradientPipeline(StableDiffusionPipeline):
    """A `StableDiffusionPipeline` whose `encode_prompt` steers each prompt toward an aesthetic embedding.

    Call `set_aesthetic` once after building it. Steered conditioning is cached per prompt (it is deterministic).
    """

    def set_aesthetic(self, embedding: torch.Tensor, projection: torch.nn.Linear, settings) -> None:
        """`embedding`: unit-norm [1, dim]; `projection`: CLIP's text projection; `settings`: the method's params."""
        self.aesthetic = embedding
        self.aesthetic_projection = projection
        self.aesthetic_settings = settings
        self.steered_cache: dict[tuple, torch.Tensor] = {}

    def steered(self, prompt: str, device: torch.device, clip_skip: int | None) -> torch.Tensor:
        """The steered conditioning of one prompt, [1, length, hidden] fp32 on `device`."""
        key = (prompt, clip_skip)
        if key not in self.steered_cache:
            settings = self.aesthetic_settings
            input_ids = self.tokenizer(
                prompt, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
            ).input_ids.to(device)
            tuned = tuned_text_encoder(
                self.text_encoder, self.aesthetic_projection, input_ids, self.aesthetic,
                settings.aesthetic_steps, settings.aesthetic_lr,
            )
            self.steered_cache[key] = hidden_states(tuned, input_ids, clip_skip)
        return self.steered_cache[key].to(device)

    def encode_prompt(self, prompt, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt=None,
                      prompt_embeds=None, negative_prompt_embeds=None, lora_scale=None, clip_skip=None):
        given_embeds = prompt_embeds is not None
        prompt_embeds, negative_prompt_embeds = super().encode_prompt(
            prompt, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, lora_scale=lora_scale,
            clip_skip=clip_skip,
        )
        settings = getattr(self, "aesthetic_settings", None)
        if given_embeds or settings is None or settings.aesthetic_weight == 0 or settings.aesthetic_steps == 0:
            return prompt_embeds, negative_prompt_embeds
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        steered = torch.cat([self.steered(text, device, clip_skip) for text in prompts])
        # super() repeats each prompt num_images_per_prompt times in a row
        steered = steered.repeat_interleave(num_images_per_prompt, dim=0).to(prompt_embeds.dtype)
        weight = settings.aesthetic_weight
        if settings.aesthetic_slerp:
            blended = slerp(prompt_embeds.float(), steered.float(), weight).to(prompt_embeds.dtype)
        else:
            blended = (1 - weight) * prompt_embeds + weight * steered
        return blended, negative_prompt_embeds
