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

SDXL has two text encoders, so it takes two CLIPs (`clip_model: [<ViT-L/14>, <ViT-bigG/14>]`, for SDXL 1.0
openai/clip-vit-large-patch14 and laion/CLIP-ViT-bigG-14-laion2B-39B-b160k; the tiny world's are the SD base's
`clip/` and `artifacts/pretrain/tinyworld_xl_clip`): the embedding file holds one aesthetic embedding per encoder
(`clip_l`, `clip_g`, as SDXL textual-inversion files name them; no `.pt`, since the A1111 extension has no SDXL
form), each encoder is steered toward its own, and the blend applies to the context (both encoders' penultimate
hidden states) and to the pooled embedding (the second encoder's projected output), as `AestheticGradientXLPipeline`
does.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open

from sdpipe.encode import dataset_images
from sdpipe.errors import SdpipeError
from sdpipe.families import SDXL, pipeline_family
from sdpipe.families.base import token_ids
from sdpipe.formats.embeddings import SDXL_EMBEDDING_KEYS
from sdpipe.io import atomic_path, save_safetensors, write_json
from sdpipe.models.clip_image import ClipImageEncoder
from sdpipe.models.loading import load_pipeline, model_family, resolve_device
from sdpipe.training.datasets import method_datasets

KEY = "train.aesthetic_gradient"
SAFETENSORS_KEY = "aesthetic_embedding"


def train(params, out_dir: Path) -> dict:
    """The `train@aesthetic_gradient` stage: writes `<out_dir>/model/<name>.safetensors` (SD 1.x/2.x also the A1111
    `<name>.pt`) and metrics."""
    settings = params.train.aesthetic_gradient
    out_dir = Path(out_dir)
    device = resolve_device(params.base.device)
    datasets = method_datasets(params.base.datasets, settings.datasets, KEY)
    clip_models = clip_model_folders(settings, params.base)
    images = [image for name in datasets for image in dataset_images(Path(params.paths.prepared) / name)]

    features = [
        ClipImageEncoder.load(clip_model, params.base.base_model, device, key=f"{KEY}.clip_model").features(images)
        for clip_model in clip_models
    ]
    embeddings = [aesthetic_embedding(encoder_features) for encoder_features in features]
    name = embedding_name(settings, datasets)

    with atomic_path(out_dir / "model") as tmp:
        tmp.mkdir()
        metadata = {"datasets": ",".join(datasets), "images": str(len(images)), "name": name}
        if len(embeddings) == 1:
            torch.save(embeddings[0].clone(), tmp / f"{name}.pt")
            save_safetensors({SAFETENSORS_KEY: embeddings[0]}, tmp / f"{name}.safetensors", metadata)
        else:
            save_safetensors(dict(zip(SDXL_EMBEDDING_KEYS, embeddings, strict=True)), tmp / f"{name}.safetensors", metadata)
    # The outputs every train@<method> stage declares in dvc.yaml; this method has no steps to log or resume.
    for folder in ("samples", "live/plots/metrics"):
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
    similarities = [
        round(float((torch.nn.functional.normalize(encoder_features, dim=-1) @ embedding.T).mean()), 4)
        for encoder_features, embedding in zip(features, embeddings)
    ]
    metrics = {"images": len(images)}
    if len(embeddings) == 1:
        metrics.update(embedding_dim=embeddings[0].shape[1], mean_similarity=similarities[0])
    else:
        metrics.update(
            embedding_dim=dict(zip(SDXL_EMBEDDING_KEYS, [embedding.shape[1] for embedding in embeddings])),
            mean_similarity=dict(zip(SDXL_EMBEDDING_KEYS, similarities)),
        )
    write_json(out_dir / "metrics.json", metrics)
    return metrics


def clip_model_folders(settings, base) -> list[str | None]:
    """One CLIP model per text encoder of the base (None: the CLIP beside the base, `<base_model>/clip/`)."""
    family = model_family(base.base_model, base.base_model_config)
    clip_models = settings.clip_model if isinstance(settings.clip_model, list) else [settings.clip_model]
    if len(clip_models) != len(family.text_encoders):
        raise SdpipeError(
            f"{KEY}.clip_model: base.base_model {base.base_model!r} is a {family.title} model with "
            f"{len(family.text_encoders)} text encoder(s); give one CLIP model folder per text encoder, in order "
            f"(SDXL: [<CLIP ViT-L/14>, <OpenCLIP ViT-bigG/14>]), not {len(clip_models)}"
        )
    if len(clip_models) > 1 and None in clip_models:
        raise SdpipeError(f"{KEY}.clip_model: name every CLIP model folder of the list; null only stands for a single one")
    return clip_models


def sampling_pipeline(params, model_dir: Path, device: torch.device):
    """The base pipeline that steers every prompt toward the aesthetic embedding in `model_dir`, and the trigger
    word of its prompts (`evaluate.trigger`: this method learns a style, not a concept word)."""
    settings = params.train.aesthetic_gradient
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if len(files) != 1:
        raise SdpipeError(f"{model_dir}: expected one aesthetic embedding (.safetensors), found {len(files)}")
    embeddings = load_embeddings(files[0])
    clip_models = clip_model_folders(settings, params.base)
    if len(embeddings) != len(clip_models):
        raise SdpipeError(f"{files[0]}: {len(embeddings)} aesthetic embedding(s) for a base with {len(clip_models)} text encoder(s)")
    base = load_pipeline(params.base.base_model, params.base.base_model_config, device=device)
    pipeline_class = AestheticGradientXLPipeline if pipeline_family(base) is SDXL else AestheticGradientPipeline
    pipeline = pipeline_class.from_pipe(base)
    projections = [load_text_projection(clip_model, params.base.base_model) for clip_model in clip_models]
    pipeline.set_aesthetic(embeddings, projections, settings)
    return pipeline, params.evaluate.trigger


def aesthetic_embedding(features: torch.Tensor) -> torch.Tensor:
    """The unit-norm mean of the (unnormalized) CLIP image embeddings `features` [N, dim], as [1, dim] fp32."""
    mean = features.float().mean(dim=0, keepdim=True)
    return torch.nn.functional.normalize(mean, dim=-1).contiguous()


def embedding_name(settings, datasets: list[str]) -> str:
    return settings.embedding_name or "-".join(datasets)


def load_embeddings(path: Path) -> list[torch.Tensor]:
    """A saved aesthetic embedding, one unit-norm [1, dim] tensor per text encoder: a `.safetensors` (SD's
    `aesthetic_embedding`, SDXL's `clip_l` and `clip_g`) or an A1111 `.pt` read with `weights_only=True`."""
    path = Path(path)
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())  # noqa: SIM118 (safe_open has no __contains__)
            names = [SAFETENSORS_KEY] if SAFETENSORS_KEY in keys else list(SDXL_EMBEDDING_KEYS)
            if not set(names) <= keys:
                raise SdpipeError(f"{path}: no {SAFETENSORS_KEY!r} (or SDXL's clip_l and clip_g) tensor; not an aesthetic embedding")
            embeddings = [f.get_tensor(name) for name in names]
    else:
        embedding = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(embedding, torch.Tensor):
            raise SdpipeError(f"{path}: expected a tensor [1, dim] (A1111 aesthetic embedding)")
        embeddings = [embedding]
    return [torch.nn.functional.normalize(embedding.float().reshape(1, -1), dim=-1) for embedding in embeddings]


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


def blend(original: torch.Tensor, steered: torch.Tensor, settings) -> torch.Tensor:
    """(1 - weight) × original + weight × steered, or their slerp (`aesthetic_slerp`), in `original`'s dtype."""
    weight = settings.aesthetic_weight
    steered = steered.to(original.dtype)
    if settings.aesthetic_slerp:
        return slerp(original.float(), steered.float(), weight).to(original.dtype)
    return (1 - weight) * original + weight * steered


def projected_text(model: torch.nn.Module, projection: torch.nn.Linear, input_ids: torch.Tensor) -> torch.Tensor:
    """The text embedding of `input_ids` in CLIP's shared space: through `projection` from the pooled output, or
    for an encoder with its own projection (SDXL's second), its `text_embeds`, which are the same."""
    output = model(input_ids)
    if getattr(output, "text_embeds", None) is not None:
        return output.text_embeds
    return projection(output.pooler_output)


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
            text = torch.nn.functional.normalize(projected_text(model, projection, input_ids), dim=-1)
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


class AestheticSteering:
    """What both families' aesthetic pipelines share: per text encoder, a copy tuned toward that encoder's aesthetic
    embedding for each prompt. Call `set_aesthetic` once after building the pipeline. Steered outputs are cached
    per prompt (they are deterministic)."""

    def set_aesthetic(self, embeddings: list[torch.Tensor], projections: list[torch.nn.Linear], settings) -> None:
        """`embeddings`: unit-norm [1, dim], one per text encoder; `projections`: each CLIP's text projection;
        `settings`: the method's params."""
        self.aesthetic_embeddings = embeddings
        self.aesthetic_projections = projections
        self.aesthetic_settings = settings
        self.steered_cache: dict[tuple, torch.Tensor] = {}

    def steering(self) -> bool:
        settings = getattr(self, "aesthetic_settings", None)
        return settings is not None and settings.aesthetic_weight > 0 and settings.aesthetic_steps > 0

    def steered(self, encoder: int, prompt: str, device: torch.device, clip_skip: int | None):
        """Text encoder `encoder`'s steered output for one prompt (`steered_output` of the tuned copy), on `device`."""
        key = (encoder, prompt, clip_skip)
        if key not in self.steered_cache:
            settings = self.aesthetic_settings
            tokenizer, text_encoder = self.steering_encoders()[encoder]
            input_ids = token_ids(tokenizer, [prompt]).to(device)
            tuned = tuned_text_encoder(
                text_encoder, self.aesthetic_projections[encoder], input_ids, self.aesthetic_embeddings[encoder],
                settings.aesthetic_steps, settings.aesthetic_lr,
            )
            self.steered_cache[key] = self.steered_output(tuned, input_ids, clip_skip)
        return tuple(tensor.to(device) for tensor in self.steered_cache[key])


class AestheticGradientPipeline(AestheticSteering, StableDiffusionPipeline):
    """A `StableDiffusionPipeline` whose `encode_prompt` steers each prompt toward an aesthetic embedding."""

    def steering_encoders(self):
        return [(self.tokenizer, self.text_encoder)]

    def steered_output(self, tuned, input_ids, clip_skip):
        return (hidden_states(tuned, input_ids, clip_skip),)

    def encode_prompt(self, prompt, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt=None,
                      prompt_embeds=None, negative_prompt_embeds=None, lora_scale=None, clip_skip=None):
        given_embeds = prompt_embeds is not None
        prompt_embeds, negative_prompt_embeds = super().encode_prompt(
            prompt, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, lora_scale=lora_scale,
            clip_skip=clip_skip,
        )
        if given_embeds or not self.steering():
            return prompt_embeds, negative_prompt_embeds
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        steered = torch.cat([self.steered(0, text, device, clip_skip)[0] for text in prompts])
        # super() repeats each prompt num_images_per_prompt times in a row
        steered = steered.repeat_interleave(num_images_per_prompt, dim=0)
        return blend(prompt_embeds, steered, self.aesthetic_settings), negative_prompt_embeds


class AestheticGradientXLPipeline(AestheticSteering, StableDiffusionXLPipeline):
    """A `StableDiffusionXLPipeline` whose `encode_prompt` steers each prompt toward the aesthetic embeddings: both
    text encoders toward their own, the context and the pooled embedding blended."""

    def steering_encoders(self):
        return [(self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)]

    @torch.no_grad()
    def steered_output(self, tuned, input_ids, clip_skip):
        # as StableDiffusionXLPipeline.encode_prompt: the penultimate hidden states (further back with clip_skip)
        output = tuned(input_ids, output_hidden_states=True)
        hidden = output.hidden_states[-(2 if clip_skip is None else clip_skip + 2)]
        pooled = getattr(output, "text_embeds", None)
        return (hidden,) if pooled is None else (hidden, pooled)

    def encode_prompt(self, prompt, prompt_2=None, device=None, num_images_per_prompt=1, do_classifier_free_guidance=True,
                      negative_prompt=None, negative_prompt_2=None, prompt_embeds=None, negative_prompt_embeds=None,
                      pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None, lora_scale=None, clip_skip=None):
        given_embeds = prompt_embeds is not None
        embeds, negative_embeds, pooled, negative_pooled = super().encode_prompt(
            prompt, prompt_2, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt,
            negative_prompt_2, prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
            negative_pooled_prompt_embeds, lora_scale, clip_skip,
        )
        if given_embeds or not self.steering():
            return embeds, negative_embeds, pooled, negative_pooled
        device = device or self._execution_device
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts_2 = prompts if prompt_2 is None else ([prompt_2] if isinstance(prompt_2, str) else list(prompt_2))
        first = [self.steered(0, text, device, clip_skip) for text in prompts]
        second = [self.steered(1, text, device, clip_skip) for text in prompts_2]
        steered = torch.cat([torch.cat([a[0], b[0]], dim=-1) for a, b in zip(first, second)])
        steered_pooled = torch.cat([b[1] for b in second])
        # super() repeats each prompt num_images_per_prompt times in a row
        settings = self.aesthetic_settings
        embeds = blend(embeds, steered.repeat_interleave(num_images_per_prompt, dim=0), settings)
        pooled = blend(pooled, steered_pooled.repeat_interleave(num_images_per_prompt, dim=0), settings)
        return embeds, negative_embeds, pooled, negative_pooled
