"""The evaluate stages: sample each model with the same prompts and seeds, score it; then one scoreboard.

Models: the base, each trained method (loaded the way a user loads its files: `load_textual_inversion`,
`load_lora_weights`, `from_pretrained`, ... — each method module's `sampling_pipeline`), and each merge. A method
that makes nothing to sample new prompts with (null-text inversion: per-image records) reports its own measure
instead (its module's `evaluation_metrics`: reconstruction PSNR).

Each model is its own DVC stage (`evaluate_base`, `evaluate@<method>`, `evaluate_merge@<recipe>`: `evaluate_model`),
writing `<eval>/models/<name>/metrics.json` and its grid `<eval>/grids/<name>/<name>.png`, so a change to one method
re-scores only that method. The `scoreboard` stage (`summarize`, `write_summary`) gathers them into `summary.json`
and `summary.md` (the base first, as the reference row) and adds what compares a model with the base. The metrics:

- `color_accuracy`, `shape_accuracy`, `joint_accuracy`: the oracle's reading of `a <color> <shape>` samples
  for the shapes the base model knows; `prior_preservation` (scoreboard): `joint_accuracy` relative to the base's.
- `concept`: what the row is scored on, the first of its method's datasets that `evaluate.concepts` lists (the base
  and merges of untrained models: `evaluate.concept_dataset`). A shape concept (star, cross) gets `fidelity`, the
  share of `a <color> <trigger> <class word>` samples that show the shape, and `editability`, the share that also
  has the prompted color; a style concept (outlined, dark) gets `style`, the share of the `a <color> <shape>` samples
  (prompts that do not name it) in the style. `concept_rates` holds the same reading for every concept, so the
  scoreboard sets the base's rate beside each row (`base_rate`) and their ratio (`x_base`).
- `clip_t`, `clip_i`, `kid`: with a CLIP model (the tiny world's own, `<base model>/clip`, or
  `evaluate.clip_model`): text alignment of the concept samples to `a <color> <concept shape>`, image
  alignment to the concept dataset, and the kernel inception distance and Fréchet distance (FID's formula; with
  CLIP image features) to it; `dino`: mean cosine similarity of DINO embeddings of the concept samples and the concept
  dataset, with a DINO / DINOv2 model folder in `evaluate.dino_model`.
- `validation_loss`: the diffusion loss on the held-out `evaluate.validation_datasets` (fixed noise and
  timesteps, so models compare).

The oracle's metrics are the tiny world's: with `evaluate.oracle: false` (a real model) only the concept prompts are
sampled (for CLIP, DINO and the grid) and nothing of `sdpipe.tinyworld` is imported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, DiffusionPipeline
from PIL import Image

from sdpipe.config.merge import LORA_FILE_METHODS
from sdpipe.encode import dataset_images, load_latents
from sdpipe.errors import SdpipeError
from sdpipe.families import pipeline_family
from sdpipe.families.sdxl import time_ids
from sdpipe.io import atomic_path, read_jsonl, write_json
from sdpipe.methods.registry import METHODS
from sdpipe.models.loading import load_pipeline
from sdpipe.progress import log
from sdpipe.sampling import image_grid, sample

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalization
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINO's normalization
IMAGENET_STD = (0.229, 0.224, 0.225)
VALIDATION_TIMESTEPS = (50, 200, 400, 600, 800, 950)


@dataclass
class Candidate:
    """A model to evaluate: how to build its pipeline, and the word its prompts use for the concept."""

    name: str
    pipeline: DiffusionPipeline | None
    trigger: str
    metrics: dict | None = None  # a method scored by its own measure instead of by sampling (null-text inversion)


def model_names(params) -> list[str]:
    """The scoreboard's rows, in order: `base`, each method of `train.methods`, `merge-<recipe>` for each recipe that
    writes a model."""
    return ["base", *params.train.methods, *(f"merge-{recipe}" for recipe in merge_recipe_names(params))]


def merge_recipe_names(params) -> list[str]:
    """The merge recipes that write a model (`lora_extract` and `lora_resize` write a LoRA file: not scored here)."""
    return [name for name, recipe in params.merge.recipes.items() if recipe.method not in LORA_FILE_METHODS]


def model_metrics_path(params, name: str) -> Path:
    return Path(params.paths.eval) / "models" / name / "metrics.json"


def trained_datasets(method_params) -> list[str]:
    """The datasets a method's params train on, in order (custom diffusion: its concepts'; CLIP inversion: its one)."""
    if getattr(method_params, "concepts", None):
        return [concept.dataset for concept in method_params.concepts]
    if getattr(method_params, "dataset", None):
        return [method_params.dataset]
    return list(getattr(method_params, "datasets", None) or [])


def row_concept(params, name: str) -> str:
    """The concept (a key of `evaluate.concepts`) row `name` is scored on: its method's first dataset with a concept;
    a merge's, that of its first trained input; else `evaluate.concept_dataset`."""
    concepts = params.evaluate.concepts
    methods = []
    if name in params.train.methods:
        methods = [name]
    elif name.startswith("merge-") and name.removeprefix("merge-") in params.merge.recipes:
        inputs = params.merge.recipes[name.removeprefix("merge-")].inputs.model_dump().values()
        sources = [source for value in inputs for source in (value if isinstance(value, list) else [value])]
        methods = [source.removeprefix("train:") for source in sources if str(source).startswith("train:")]
        methods = [method for method in methods if method in params.train.methods]
    for method in methods:
        for dataset in trained_datasets(getattr(params.train, method)):
            if dataset in concepts:
                return dataset
    return params.evaluate.concept_dataset


def load_candidate(params, name: str, device: torch.device) -> Candidate:
    """Model `name` (`base`, a method of `train.methods` or `merge-<recipe>`), loaded as a user loads it."""
    trigger = params.evaluate.trigger
    if name == "base":
        return Candidate("base", load_pipeline(params.base.base_model, params.base.base_model_config, device=device), trigger)
    if name in params.train.methods:
        entry = METHODS[name]
        model_dir = Path(params.paths.train) / name / "model"
        if not model_dir.is_dir():
            raise SdpipeError(f"{model_dir}: no trained model; run `dvc repro train@{name}` first")
        if entry.own_metrics:
            return Candidate(name, None, trigger, entry.evaluation_metrics(params, model_dir.parent, row_concept(params, name)))
        pipeline, method_trigger = entry.sampling_pipeline(params, model_dir, device)
        return Candidate(name, pipeline, method_trigger)
    recipe = name.removeprefix("merge-")
    if name.startswith("merge-") and recipe in params.merge.recipes:
        folder = Path(params.paths.merge) / recipe / "model"
        if not folder.is_dir():
            raise SdpipeError(f"{folder}: no merged model; run `dvc repro merge` first")
        # in its family's pipeline class, as the merge wrote it (an SDXL merge is a StableDiffusionXLPipeline folder)
        return Candidate(name, load_pipeline(str(folder), device=device, key=f"merge.recipes.{recipe}"), trigger)
    raise SdpipeError(
        f"evaluate: no model {name!r}; expected base, a method of train.methods ({', '.join(params.train.methods)}) "
        f"or merge-<recipe> for a recipe of merge.recipes ({', '.join(params.merge.recipes) or 'none'})"
    )


def evaluate_model(params, name: str, device: torch.device, row: str | None = None) -> dict:
    """Scores one model (the `evaluate_base`, `evaluate@<method>` and `evaluate_merge@<recipe>` stages, and the
    `_family` ones): writes `<eval>/models/<row>/metrics.json` and the sample grid `<eval>/grids/<row>/<row>.png`
    (`row`: `name`, or `<family>-<name>` for an extra family's model); returns the metrics.

    The grid's folder is the stage's plots output, so it is made even where no grid is (a method scored by its own
    measure). A merge recipe that writes a LoRA file gets a metrics file saying it is not scored."""
    row = row or name
    out_dir = Path(params.paths.eval)
    grid_dir = out_dir / "grids" / row
    grid_dir.mkdir(parents=True, exist_ok=True)
    recipe = params.merge.recipes.get(name.removeprefix("merge-")) if name.startswith("merge-") else None
    if recipe is not None and recipe.method in LORA_FILE_METHODS:
        metrics = {"not_scored": f"merge.recipes.{name.removeprefix('merge-')} ({recipe.method}) writes a LoRA file"}
    else:
        log(f"evaluate: {name}")
        concept = row_concept(params, name)
        candidate = load_candidate(params, name, device)
        if candidate.metrics is not None:
            metrics = {"concept": concept, **candidate.metrics}
        else:
            reference = Reference(params, device, concept)
            metrics = evaluate_candidate(candidate, params.evaluate, reference, concept, grid_dir / f"{row}.png")
    write_json(model_metrics_path(params, row), metrics)
    return metrics


def scoreboard_rows(params) -> dict[str, dict]:
    """The scoreboard: the main base's rows (`summarize`), then those of each of `base.extra_families`
    (`<family>-<model>`, compared with their own base); every row says its model family."""
    from sdpipe.config.sdxl import family_view
    from sdpipe.models.loading import model_family

    rows = {}
    for family in [None, *params.base.extra_families]:
        view = params if family is None else family_view(params, family)
        family_name = model_family(view.base.base_model, view.base.base_model_config).name
        for name, metrics in summarize(view, prefix="" if family is None else f"{family}-").items():
            rows[name] = {"family": family_name, **metrics}
    return rows


def summarize(params, prefix: str = "") -> dict[str, dict]:
    """The scoreboard's rows from each model's `metrics.json` (see `model_names`; rows `<prefix><model>`), with
    `prior_preservation`: a sampled model's `joint_accuracy` relative to the base's (1.0 for the base; only with
    the oracle)."""
    rows: dict[str, dict] = {}
    for name in model_names(params):
        path = model_metrics_path(params, prefix + name)
        if not path.is_file():
            stage = "evaluate_base" if name == "base" else f"evaluate@{name}" if name in params.train.methods else (
                f"evaluate_merge@{name.removeprefix('merge-')}"
            )
            raise SdpipeError(f"{path}: missing; run `dvc repro {stage}` (or its `_family` stage) first")
        rows[prefix + name] = json.loads(path.read_text(encoding="utf-8"))
    base_joint = rows[prefix + "base"].get("joint_accuracy")
    base_rates = rows[prefix + "base"].get("concept_rates", {})
    for metrics in rows.values():
        if "joint_accuracy" in metrics:
            metrics["prior_preservation"] = round(metrics["joint_accuracy"] / base_joint, 4) if base_joint else 0.0
        concept = metrics.get("concept")
        if concept in base_rates and concept in metrics.get("concept_rates", {}):
            metrics["base_rate"] = base_rates[concept]
            if base_rates[concept] > 0:
                metrics["x_base"] = round(metrics["concept_rates"][concept] / base_rates[concept], 2)
    return rows


def evaluate_models(params, device: torch.device) -> dict[str, dict]:
    """Every model in turn (what the evaluate stages do one by one); returns the scoreboard's rows."""
    for name in model_names(params):
        evaluate_model(params, name, device)
    return summarize(params)


class Reference:
    """What every model is compared with: the concept dataset's images (CLIP features), the validation latents."""

    def __init__(self, params, device: torch.device, concept: str):
        settings = params.evaluate
        self.device = device
        self.clip = load_clip(settings.clip_model, params.base.base_model, device)
        self.concept_features = None
        if concept not in params.base.datasets:
            key = "evaluate.concept_dataset" if concept == settings.concept_dataset else "the concept dataset"
            raise SdpipeError(
                f"{key} {concept!r} is not in base.datasets ({', '.join(params.base.datasets)}); only those are prepared"
            )
        images = dataset_images(Path(params.paths.prepared) / concept)
        if self.clip is not None:
            self.concept_features = self.clip.image_features(images)
        self.dino = DinoScorer(settings.dino_model, device) if settings.dino_model else None
        self.concept_dino = self.dino.image_features(images) if self.dino is not None else None
        self.validation = [
            validation_examples(Path(params.paths.latents), Path(params.paths.captions), name, params.base.datasets)
            for name in settings.validation_datasets
        ]


def evaluate_candidate(candidate: Candidate, settings, reference: Reference, concept: str, grid_path: Path) -> dict:
    pipeline = candidate.pipeline
    pipeline.set_progress_bar_config(disable=True)
    seeds = list(range(settings.seeds_per_prompt))
    concept_prompts = [f"a {color} {candidate.trigger} {settings.class_word}" for color in settings.colors]
    if concept not in settings.concepts:
        raise SdpipeError(f"evaluate.concepts has no entry {concept!r}; it lists {', '.join(settings.concepts)}")
    concept_shape = settings.concepts[concept].shape
    metrics = {"concept": concept}
    if settings.oracle:
        from sdpipe.tinyworld import (  # the tiny world's ground truth: only with the oracle
            oracle,
            scoring,
            world,
        )

        check_oracle_settings(settings, oracle, world)
        prior_probes = scoring.color_shape_probes(world.PRETRAIN_SHAPES)
        prompts = [probe.prompt for probe in prior_probes] + concept_prompts
    else:
        prompts = concept_prompts
    images = sample(pipeline, prompts, seeds, settings.steps, settings.guidance_scale, settings.batch_size)
    concept_images = images[len(images) - len(concept_prompts) * len(seeds):]

    if settings.oracle:
        prior_images = images[: len(prior_probes) * len(seeds)]
        prior_readings = oracle.read_batch(prior_images)
        prior = scoring.score_probes(prior_readings, prior_probes, len(seeds))  # read once, scored from the readings
        concept_readings = oracle.read_batch(concept_images)
        prompted_colors = [color for color in settings.colors for _ in seeds]
        rates = {}
        for name, target in settings.concepts.items():
            if target.shape is not None:
                rates[name] = share(reading.shape == target.shape for reading in concept_readings)
            else:
                rates[name] = share(oracle.shows_style(reading, target.style) for reading in prior_readings)
        metrics |= {
            "color_accuracy": prior["color"],
            "shape_accuracy": prior["shape"],
            "joint_accuracy": prior["all"],
        }
        if concept_shape is not None:
            metrics["fidelity"] = rates[concept]
            metrics["editability"] = share(
                reading.shape == concept_shape and reading.color == color
                for reading, color in zip(concept_readings, prompted_colors)
            )
        else:
            metrics["style"] = rates[concept]
        metrics["concept_rates"] = rates
    if reference.clip is not None:
        features = reference.clip.image_features(concept_images)
        texts = [f"a {color} {concept_shape or settings.class_word}" for color in settings.colors for _ in seeds]
        metrics["clip_t"] = round(float((features * reference.clip.text_features(texts)).sum(-1).mean()), 4)
        metrics["clip_i"] = round(float((features @ reference.concept_features.T).mean()), 4)
        metrics["kid"] = round(kernel_inception_distance(features, reference.concept_features), 5)
        metrics["fid"] = round(frechet_distance(features, reference.concept_features), 5)
    if reference.dino is not None:
        metrics["dino"] = round(float((reference.dino.image_features(concept_images) @ reference.concept_dino.T).mean()), 4)
    if reference.validation:
        losses = [validation_loss(pipeline, latents, captions, candidate.trigger, settings) for latents, captions in reference.validation]
        metrics["validation_loss"] = round(sum(losses) / len(losses), 5)
    metrics["images"] = len(images)

    grid_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(grid_path) as tmp:
        image_grid(images, columns=len(seeds) * 2).save(tmp, format="PNG")
    return metrics


def share(flags) -> float:
    flags = list(flags)
    return round(sum(flags) / len(flags), 4) if flags else 0.0


def check_oracle_settings(settings, oracle, world) -> None:
    """The oracle reads only the tiny world's colors, shapes and styles: name the key that asks for more."""
    unknown = [color for color in settings.colors if color not in world.COLORS]
    if unknown:
        raise SdpipeError(f"evaluate.colors: the oracle reads only {', '.join(world.COLORS)}, not {', '.join(unknown)}")
    for name, concept in settings.concepts.items():
        if concept.shape is not None and concept.shape not in oracle.PROTOTYPE_SHAPES:
            raise SdpipeError(
                f"evaluate.concepts.{name}.shape: the oracle reads {', '.join(oracle.PROTOTYPE_SHAPES)}, not {concept.shape!r}"
            )
        if concept.style is not None and concept.style not in oracle.STYLES:
            raise SdpipeError(
                f"evaluate.concepts.{name}.style: the oracle reads {', '.join(oracle.STYLES)}, not {concept.style!r}"
            )


def validation_examples(latents_dir: Path, captions_dir: Path, name: str, datasets: list[str]):
    """The held-out dataset's latents (no flips) and captions."""
    if name not in datasets:
        raise SdpipeError(
            f"evaluate.validation_datasets lists {name!r}, which base.datasets ({', '.join(datasets)}) does not; "
            "only datasets in base.datasets are prepared and encoded"
        )
    latents, _ = load_latents(latents_dir / f"{name}.safetensors")
    rows = read_jsonl(captions_dir / f"{name}.jsonl")
    ids = [row["id"] for row in rows]
    return torch.stack([latents[image_id] for image_id in ids]), [row["caption"] for row in rows]


@torch.no_grad()
def validation_loss(pipeline, latents: torch.Tensor, captions: list[str], trigger: str, settings) -> float:
    """Mean squared error of the model's prediction at fixed timesteps with fixed noise (seed 0)."""
    device = pipeline.device
    captions = [replace_word(caption, settings.trigger, trigger) for caption in captions]
    family = pipeline_family(pipeline)
    conditioning = family.pipeline_conditioning(pipeline, captions, device)
    height, width = (side * pipeline.vae_scale_factor for side in latents.shape[-2:])
    image_time_ids = time_ids([(height, width)] * len(latents), [(0, 0)] * len(latents), (height, width))
    scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    generator = torch.Generator().manual_seed(0)
    latents = latents.to(device, dtype=pipeline.unet.dtype)
    losses = []
    for timestep in VALIDATION_TIMESTEPS:
        noise = torch.randn(latents.shape, generator=generator).to(device, dtype=latents.dtype)
        timesteps = torch.full((len(latents),), timestep, device=device, dtype=torch.long)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = family.predict(pipeline.unet, noisy, timesteps, conditioning, image_time_ids.to(device))
        target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
        losses.append(torch.nn.functional.mse_loss(prediction.float(), target.float()).item())
    return sum(losses) / len(losses)


def replace_word(text: str, word: str, replacement: str) -> str:
    return " ".join(replacement if token == word else token for token in text.split(" "))


class ClipScorer:
    """Unit-norm CLIP image and text embeddings."""

    def __init__(self, model, tokenizer, device):
        self.model, self.tokenizer, self.device = model.to(device).eval(), tokenizer, device
        self.size = model.config.vision_config.image_size

    @torch.no_grad()
    def image_features(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = normalized_pixels(images, self.size, CLIP_MEAN, CLIP_STD)
        features = self.model.get_image_features(pixel_values=pixels.to(self.device))
        features = getattr(features, "pooler_output", features)  # transformers 5 returns an output object
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.tokenizer.model_max_length, return_tensors="pt")
        features = self.model.get_text_features(input_ids=tokens.input_ids.to(self.device))
        features = getattr(features, "pooler_output", features)
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()


def normalized_pixels(images: list[Image.Image], size: int, mean, std) -> torch.Tensor:
    """Images resized (bicubic) to size x size and normalized per channel: [N, 3, size, size] fp32."""
    pixels = np.stack([np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC)) for image in images])
    pixels = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(255)
    return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


class DinoScorer:
    """Unit-norm DINO / DINOv2 image embeddings (the CLS token): the subject-fidelity measure of the DreamBooth paper."""

    def __init__(self, folder: str, device: torch.device):
        from transformers import AutoModel

        if not Path(folder).is_dir():
            raise SdpipeError(f"evaluate.dino_model: {folder} is not a folder with a DINO model (config.json + weights)")
        self.model, self.device = AutoModel.from_pretrained(folder).to(device).eval(), device
        self.size = self.model.config.image_size

    @torch.no_grad()
    def image_features(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = normalized_pixels(images, self.size, IMAGENET_MEAN, IMAGENET_STD)
        cls = self.model(pixel_values=pixels.to(self.device)).last_hidden_state[:, 0]
        return torch.nn.functional.normalize(cls.float(), dim=-1).cpu()


def load_clip(clip_model: str | None, base_model: str, device: torch.device) -> ClipScorer | None:
    """`evaluate.clip_model`, else the tiny world's CLIP shipped beside the base model; None when neither exists."""
    from transformers import CLIPModel, CLIPTokenizer

    folder = Path(clip_model) if clip_model else Path(base_model) / "clip"
    if not folder.is_dir():
        if clip_model:
            raise SdpipeError(f"evaluate.clip_model: {folder} is not a folder with a CLIP model (config.json + weights)")
        return None
    tokenizer_folder = folder if (folder / "tokenizer_config.json").is_file() else Path(base_model) / "tokenizer"
    return ClipScorer(CLIPModel.from_pretrained(folder), CLIPTokenizer.from_pretrained(tokenizer_folder), device)


def kernel_inception_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD² with the cubic polynomial kernel of Bińkowski et al. (2018), on the given features."""
    dim = x.shape[1]
    x, y = x.double(), y.double()

    def kernel(a, b):
        return (a @ b.T / dim + 1) ** 3

    m, n = len(x), len(y)
    k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
    term_x = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    term_y = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return float(term_x + term_y - 2 * k_xy.mean())


def frechet_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """FID's Fréchet distance between Gaussians fitted to two feature sets: |mu_x - mu_y|² + tr(S_x + S_y -
    2 (S_x S_y)^½), the trace of the square root taken as that of the symmetric S_x^½ S_y S_x^½ (same eigenvalues)."""
    x, y = x.double(), y.double()
    mean_x, mean_y = x.mean(0), y.mean(0)
    cov_x, cov_y = torch.cov(x.T), torch.cov(y.T)
    values, vectors = torch.linalg.eigh(cov_x)
    sqrt_x = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    middle = torch.linalg.eigvalsh(sqrt_x @ cov_y @ sqrt_x).clamp(min=0).sqrt().sum()
    return float((mean_x - mean_y).square().sum() + cov_x.trace() + cov_y.trace() - 2 * middle)


def write_summary(rows: dict[str, dict], out_dir: Path) -> None:
    """`summary.json` and a markdown table, one row per model, the base first as the reference."""
    write_json(out_dir / "summary.json", rows)
    columns = [c for c in SUMMARY_COLUMNS if any(c in metrics for metrics in rows.values())]
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, metrics in rows.items():
        cells = [format_cell(metrics.get(column)) for column in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    with atomic_path(out_dir / "summary.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    log("\n".join(lines))


SUMMARY_COLUMNS = (
    "family",
    "concept",
    "fidelity",
    "editability",
    "style",
    "base_rate",
    "x_base",
    "prior_preservation",
    "joint_accuracy",
    "color_accuracy",
    "shape_accuracy",
    "clip_t",
    "clip_i",
    "kid",
    "fid",
    "dino",
    "validation_loss",
    "psnr_null_text",
    "psnr_ddim",
    "psnr_gain",
    "fidelity_at_init",
)


def format_cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 0.01 else f"{value:.3f}"
    return "" if value is None else str(value)
