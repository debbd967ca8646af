"""Null-text inversion (Mokady et al. 2022): reconstruct a real image exactly with guided sampling, then edit it.

Per image (diffusers' community `pipeline_null_text_inversion.py` and the prompt-to-prompt repository's
`null_text_w_ptp` follow the same recipe):

1. DDIM inversion: starting from the image's cached latent, the DDIM update run backwards with the caption's
   conditional noise prediction (no guidance) gives a trajectory z_0 (clean) → … → z_T (the inverted noise).
   Sampling back from z_T with guidance 7.5 drifts far from the image: guidance amplifies the inversion's error.
2. Null-text optimization: at each timestep t (from T down), the unconditional ("null") embedding is optimized
   for `inner_steps` Adam steps so that one guided DDIM step from the current latent lands on the inversion's
   latent of the next timestep; the optimized embedding is kept for that timestep and the guided step taken with
   it. The result is one null embedding per timestep that makes guided sampling from z_T retrace the inversion.
3. Editing: sampling from z_T with the per-timestep null embeddings and a new prompt (e.g. another color word)
   changes the image while keeping what the prompt does not mention (`reconstruct(pipeline, record, prompt)`).

On SDXL the "null text" is all of the unconditional input: the null context (both encoders' hidden states) and the
null pooled embedding are optimized together, and every UNet call takes the image's size and crop (its cached time
ids); the plain DDIM baseline uses the pipeline's own unconditional input (zeros when the model sets
`force_zeros_for_empty_prompt`, as SDXL 1.0 does; else the empty prompt's encoding).

This is optimization per image at inference time, not the training of a model: it does not use the
shared training loop. The stage writes, under `<out_dir>/model/`, one `<image id>.safetensors` per image
(`latent`: z_T [C, h, w]; `null_embeddings`: [steps, tokens, hidden]; SDXL also `null_pooled`: [steps, pooled]
and `time_ids`: [6]; metadata: prompt, steps, guidance scale, base model) and, in `<out_dir>/metrics.json`, the mean reconstruction PSNR (decoded image against the prepared
image) of null-text inversion, of plain DDIM inversion (the ordinary null embedding) and of the VAE alone (the
ceiling: decoding the image's own latent).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler
from PIL import Image
from safetensors import safe_open

from sdpipe.encode import TIME_IDS_SUFFIX, decode_latents, load_latents
from sdpipe.errors import SdpipeError
from sdpipe.families import Conditioning, pipeline_family
from sdpipe.io import atomic_path, read_jsonl, save_safetensors, write_json
from sdpipe.models.loading import load_pipeline, resolve_device, resolve_dtype
from sdpipe.progress import log, track
from sdpipe.sampling import image_grid
from sdpipe.training.datasets import method_datasets

KEY = "train.null_text_inversion"
EARLY_STOP_SLOPE = 2e-5  # the paper's tolerance grows by this much per timestep
LR_DECAY = 100  # the learning rate at timestep i is learning_rate × (1 - i / 100), as in the paper's code


@dataclass
class InvertedImage:
    """What null-text inversion keeps of one image: enough to reconstruct it, or to edit it by prompt."""

    image_id: str
    prompt: str
    latent: torch.Tensor
    """z_T, the inverted noise [C, h, w]."""
    null_embeddings: torch.Tensor
    """One optimized unconditional embedding per sampling step [steps, tokens, hidden]."""
    guidance_scale: float
    null_pooled: torch.Tensor | None = None
    """SDXL: the optimized unconditional pooled embedding of each step [steps, pooled]."""
    time_ids: torch.Tensor | None = None
    """SDXL: the image's size and crop conditioning [6], as `encode` cached it."""
    base_model: str | None = None
    """The model the image was inverted with (only it reconstructs the image), as the record's metadata names it."""

    @property
    def num_inference_steps(self) -> int:
        return len(self.null_embeddings)

    def null_conditioning(self, index: int) -> Conditioning:
        """The optimized unconditional input of sampling step `index`, batch of one."""
        pooled = None if self.null_pooled is None else self.null_pooled[index].unsqueeze(0)
        return Conditioning(self.null_embeddings[index].unsqueeze(0), pooled)


def train(params, out_dir: Path) -> dict:
    """The `train@null_text_inversion` stage: inverts the first `max_images` images of the datasets."""
    settings = params.train.null_text_inversion
    out_dir = Path(out_dir)
    device = resolve_device(params.base.device)
    dtype = resolve_dtype(params.base.precision, device)
    datasets = method_datasets(params.base.datasets, settings.datasets, KEY)
    examples = load_examples(params, datasets)[: settings.max_images]

    pipeline = load_pipeline(params.base.base_model, params.base.base_model_config, dtype=dtype, device=device)
    pipeline.set_progress_bar_config(disable=True)
    family = pipeline_family(pipeline)
    for name in ("unet", "vae", *family.text_encoders):
        getattr(pipeline, name).requires_grad_(False)

    records, rows = [], []
    for example in track(examples, "null-text inversion"):
        record = invert(pipeline, example.latent, example.prompt, settings, example.image_id, example.time_ids)
        original = load_image(example.image_path)
        reconstructions = {
            "vae": decode(pipeline, example.latent.unsqueeze(0).to(device))[0],
            "ddim": reconstruct(pipeline, record, use_null_embeddings=False),
            "null_text": reconstruct(pipeline, record),
        }
        row = {"id": example.image_id, **{f"psnr_{name}": psnr(image, original) for name, image in reconstructions.items()}}
        log(f"null-text inversion {example.image_id}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items() if k != "id"))
        records.append(record)
        rows.append((row, [original, *reconstructions.values()]))

    with atomic_path(out_dir / "model") as tmp:
        tmp.mkdir()
        for record in records:
            save_record(record, tmp / f"{record.image_id}.safetensors", params.base.base_model)
    samples_dir = out_dir / "samples"
    samples_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(samples_dir / "reconstructions.png") as tmp:
        # one row per image: original, VAE only, DDIM inversion, null-text inversion
        image_grid([image for _, images in rows for image in images], columns=4).save(tmp, format="PNG")
    for folder in ("live/plots/metrics",):  # declared outs of every train@<method> stage
        (out_dir / folder).mkdir(parents=True, exist_ok=True)

    metrics = {"images": len(rows), "num_inference_steps": settings.num_inference_steps, "per_image": [r for r, _ in rows]}
    for name in ("null_text", "ddim", "vae"):
        metrics[f"psnr_{name}"] = round(sum(r[f"psnr_{name}"] for r, _ in rows) / len(rows), 3)
    metrics["psnr_gain"] = round(metrics["psnr_null_text"] - metrics["psnr_ddim"], 3)
    write_json(out_dir / "metrics.json", metrics)
    log(f"null-text inversion: PSNR {metrics['psnr_null_text']} dB (DDIM inversion {metrics['psnr_ddim']} dB)")
    return metrics


def sampling_pipeline(params, model_dir: Path, device: torch.device):
    """The base pipeline, unchanged, and `evaluate.trigger`: null-text inversion learns nothing that applies to new
    prompts and seeds (its records are per image, used through `reconstruct`)."""
    pipeline = load_pipeline(params.base.base_model, params.base.base_model_config, device=device)
    return pipeline, params.evaluate.trigger


def evaluation_metrics(params, method_dir: Path, concept: str) -> dict:
    """What evaluate reports for this method instead of sampling: the reconstruction PSNRs of `metrics.json`."""
    metrics_path = Path(method_dir) / "metrics.json"
    if not metrics_path.is_file():
        raise SdpipeError(f"{metrics_path}: missing; run `dvc repro train@null_text_inversion` first")
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    return {key: metrics[key] for key in ("images", "psnr_null_text", "psnr_ddim", "psnr_vae", "psnr_gain")}


# ---------------------------------------------------------------------------------------------------------
# Data


@dataclass
class Example:
    image_id: str
    prompt: str
    latent: torch.Tensor
    image_path: Path
    time_ids: torch.Tensor | None = None


def load_examples(params, datasets: list[str]) -> list[Example]:
    """Each dataset's images in caption-file order: cached latent, caption and prepared image."""
    examples = []
    for name in datasets:
        latents, _ = load_latents(Path(params.paths.latents) / f"{name}.safetensors")
        for row in read_jsonl(Path(params.paths.captions) / f"{name}.jsonl"):
            if row["id"] not in latents:
                raise SdpipeError(
                    f"{params.paths.latents}/{name}.safetensors has no latent for {row['id']!r}; run `encode` again"
                )
            image_path = Path(params.paths.prepared) / name / row["file"]
            time_ids = latents.get(row["id"] + TIME_IDS_SUFFIX)
            examples.append(Example(row["id"], row["caption"], latents[row["id"]].float(), image_path, time_ids))
    if not examples:
        raise SdpipeError(f"{KEY}.datasets ({', '.join(datasets)}) hold no images")
    return examples


def load_image(path: Path) -> Image.Image:
    if not path.is_file():
        raise SdpipeError(f"{path}: no such prepared image; run the `prepare` stage first (dvc repro prepare)")
    with Image.open(path) as image:
        return image.convert("RGB")


# ---------------------------------------------------------------------------------------------------------
# Inversion


class DdimSteps:
    """The DDIM timesteps of `steps` sampling steps and the cumulative alphas between them, shared by the
    inversion and the sampling so that the one exactly mirrors the other."""

    def __init__(self, scheduler_config, steps: int, device: torch.device):
        scheduler = DDIMScheduler.from_config(scheduler_config)
        scheduler.set_timesteps(steps)
        self.prediction_type = scheduler.config.prediction_type
        self.timesteps = scheduler.timesteps.tolist()  # descending
        alphas = [scheduler.alphas_cumprod[t] for t in self.timesteps] + [scheduler.final_alpha_cumprod]
        self.alphas = [a.to(device, torch.float32) for a in alphas]  # alphas[i + 1]: the level after step i

    def epsilon(self, model_output: torch.Tensor, sample: torch.Tensor, index: int) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return model_output
        if self.prediction_type == "v_prediction":
            alpha = self.alphas[index]
            return alpha.sqrt() * model_output + (1 - alpha).sqrt() * sample
        raise SdpipeError(f"null-text inversion supports epsilon and v_prediction models, not {self.prediction_type!r}")

    @staticmethod
    def move(sample: torch.Tensor, epsilon: torch.Tensor, alpha_from, alpha_to) -> torch.Tensor:
        """The deterministic DDIM update between two noise levels (either direction)."""
        original = (sample - (1 - alpha_from).sqrt() * epsilon) / alpha_from.sqrt()
        return alpha_to.sqrt() * original + (1 - alpha_to).sqrt() * epsilon


def each_tensor(conditioning: Conditioning, function) -> Conditioning:
    """`conditioning` with `function` applied to its context and, where it has one, its pooled embedding."""
    return Conditioning(*(function(tensor) for tensor in tensors(conditioning)))


def tensors(conditioning: Conditioning) -> list[torch.Tensor]:
    return [tensor for tensor in (conditioning.context, conditioning.pooled) if tensor is not None]


@torch.no_grad()
def prompt_conditioning(pipeline, prompt: str) -> Conditioning:
    """The prompt's conditioning, batch of one, fp32 (SDXL's pooled embedding too)."""
    conditioning = pipeline_family(pipeline).pipeline_conditioning(pipeline, [prompt], pipeline.device)
    return each_tensor(conditioning, lambda tensor: tensor.float())


def plain_null_conditioning(pipeline) -> Conditioning:
    """The unconditional input the pipeline itself samples with for an empty negative prompt: zeros when the model
    sets `force_zeros_for_empty_prompt` (SDXL 1.0), else the empty prompt's conditioning."""
    empty = prompt_conditioning(pipeline, "")
    if not getattr(pipeline.config, "force_zeros_for_empty_prompt", False):
        return empty
    return each_tensor(empty, torch.zeros_like)


def unet_epsilon(pipeline, steps: DdimSteps, latent, index: int, conditioning: Conditioning, time_ids) -> torch.Tensor:
    unet = pipeline.unet
    time_ids = None if time_ids is None else time_ids.reshape(1, -1).to(latent.device)
    output = pipeline_family(pipeline).predict(
        unet, latent.to(unet.dtype), steps.timesteps[index], each_tensor(conditioning, lambda tensor: tensor.to(unet.dtype)), time_ids
    )
    return steps.epsilon(output.float(), latent, index)


@torch.no_grad()
def ddim_inversion(pipeline, steps: DdimSteps, latent: torch.Tensor, cond: Conditioning, time_ids) -> list[torch.Tensor]:
    """The inversion trajectory, noisiest first: [z_T, …, z_0], with z_0 the clean `latent` [1, C, h, w]."""
    trajectory = [latent]
    for index in reversed(range(len(steps.timesteps))):
        # the noise is predicted at the target timestep from the less noisy latent: DDIM inversion's approximation
        epsilon = unet_epsilon(pipeline, steps, latent, index, cond, time_ids)
        latent = steps.move(latent, epsilon, steps.alphas[index + 1], steps.alphas[index])
        trajectory.append(latent)
    return trajectory[::-1]


def guided_step(pipeline, steps, latent, index, cond_epsilon, null: Conditioning, guidance_scale, time_ids) -> torch.Tensor:
    null_epsilon = unet_epsilon(pipeline, steps, latent, index, null, time_ids)
    epsilon = null_epsilon + guidance_scale * (cond_epsilon - null_epsilon)
    return steps.move(latent, epsilon, steps.alphas[index], steps.alphas[index + 1])


def invert(
    pipeline, latent: torch.Tensor, prompt: str, settings, image_id: str = "", time_ids: torch.Tensor | None = None
) -> InvertedImage:
    """Null-text inversion of one cached latent [C, h, w] with its caption `prompt` (and, for SDXL, its cached
    `time_ids`)."""
    device = pipeline.device
    if pipeline_family(pipeline).size_conditioning and time_ids is None:
        raise SdpipeError(f"{KEY}: {image_id or 'the image'} has no time ids (size and crop); run `encode` again")
    steps = DdimSteps(pipeline.scheduler.config, settings.num_inference_steps, device)
    cond = prompt_conditioning(pipeline, prompt)
    null = plain_null_conditioning(pipeline)
    trajectory = ddim_inversion(pipeline, steps, latent.unsqueeze(0).to(device, torch.float32), cond, time_ids)

    def guided(latent, index, cond_epsilon, null):
        return guided_step(pipeline, steps, latent, index, cond_epsilon, null, settings.guidance_scale, time_ids)

    current, nulls = trajectory[0], []
    for index in range(len(steps.timesteps)):
        target = trajectory[index + 1]
        with torch.no_grad():
            cond_epsilon = unet_epsilon(pipeline, steps, current, index, cond, time_ids)
        # new tensors: Adam updates them in place
        null = each_tensor(null, lambda tensor: tensor.detach().clone().requires_grad_(True))
        optimizer = torch.optim.Adam(tensors(null), lr=settings.learning_rate * (1 - index / LR_DECAY))
        tolerance = settings.early_stop_epsilon + index * EARLY_STOP_SLOPE if settings.early_stop_epsilon else 0.0
        best_loss, best_null = float("inf"), each_tensor(null, detached)
        with torch.enable_grad():
            for _ in range(settings.inner_steps):
                loss = torch.nn.functional.mse_loss(guided(current, index, cond_epsilon, null), target)
                if loss.item() < best_loss:  # Adam can overshoot: keep the best embedding seen, not the last
                    best_loss, best_null = loss.item(), each_tensor(null, detached)
                if best_loss < tolerance:
                    break
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        null = best_null
        nulls.append(null)
        with torch.no_grad():
            current = guided(current, index, cond_epsilon, null)
    nulls = each_tensor(Conditioning.cat(nulls), lambda tensor: tensor.cpu())
    return InvertedImage(
        image_id=image_id,
        prompt=prompt,
        latent=trajectory[0][0].cpu(),
        null_embeddings=nulls.context,
        guidance_scale=settings.guidance_scale,
        null_pooled=nulls.pooled,
        time_ids=None if time_ids is None else time_ids.cpu(),
    )


def detached(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().clone()


def reconstruct(pipeline, record: InvertedImage, prompt: str | None = None, use_null_embeddings: bool = True) -> Image.Image:
    """Samples from the record's inverted noise with its per-timestep null embeddings: the original image with
    `prompt=None` (its caption), an edit of it with another prompt (change a word: `a blue …` for `a red …`).
    `use_null_embeddings=False` uses the ordinary empty-prompt embedding instead: plain DDIM inversion."""
    return decode(pipeline, reconstruct_latent(pipeline, record, prompt, use_null_embeddings))[0]


@torch.no_grad()
def reconstruct_latent(pipeline, record: InvertedImage, prompt: str | None = None, use_null_embeddings: bool = True):
    """`reconstruct` before decoding: the sampled latent [1, C, h, w] (fp32)."""
    device = pipeline.device
    steps = DdimSteps(pipeline.scheduler.config, record.num_inference_steps, device)
    cond = prompt_conditioning(pipeline, record.prompt if prompt is None else prompt)
    plain_null = plain_null_conditioning(pipeline)
    latent = record.latent.unsqueeze(0).to(device, torch.float32)
    for index in range(len(steps.timesteps)):
        null = (
            each_tensor(record.null_conditioning(index), lambda tensor: tensor.to(device, torch.float32))
            if use_null_embeddings
            else plain_null
        )
        cond_epsilon = unet_epsilon(pipeline, steps, latent, index, cond, record.time_ids)
        latent = guided_step(pipeline, steps, latent, index, cond_epsilon, null, record.guidance_scale, record.time_ids)
    return latent


@torch.no_grad()
def decode(pipeline, latents: torch.Tensor) -> list[Image.Image]:
    return pipeline.image_processor.postprocess(decode_latents(pipeline.vae, latents), output_type="pil")


def psnr(image: Image.Image, reference: Image.Image) -> float:
    """Peak signal-to-noise ratio in dB of an 8-bit RGB image against a reference of the same size."""
    if image.size != reference.size:
        image = image.resize(reference.size, Image.Resampling.BICUBIC)
    a = np.asarray(image.convert("RGB"), dtype=np.float64) / 255
    b = np.asarray(reference.convert("RGB"), dtype=np.float64) / 255
    mse = float(((a - b) ** 2).mean())
    return round(float(10 * np.log10(1 / max(mse, 1e-10))), 3)


# ---------------------------------------------------------------------------------------------------------
# Files


def save_record(record: InvertedImage, path: Path, base_model: str) -> None:
    metadata = {
        "image_id": record.image_id,
        "prompt": record.prompt,
        "num_inference_steps": str(record.num_inference_steps),
        "guidance_scale": str(record.guidance_scale),
        "base_model": str(base_model),
    }
    tensors = {"latent": record.latent, "null_embeddings": record.null_embeddings}
    optional = {"null_pooled": record.null_pooled, "time_ids": record.time_ids}
    tensors.update({name: tensor for name, tensor in optional.items() if tensor is not None})
    save_safetensors({name: tensor.contiguous() for name, tensor in tensors.items()}, path, metadata)


def load_record(path: Path) -> InvertedImage:
    """A record written by the stage (`model/<image id>.safetensors`)."""
    path = Path(path)
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
        if not {"latent", "null_embeddings"} <= set(f.keys()) or "prompt" not in metadata:
            raise SdpipeError(f"{path}: not a null-text inversion record (needs latent, null_embeddings, prompt)")
        latent, null_embeddings = f.get_tensor("latent"), f.get_tensor("null_embeddings")
        null_pooled, time_ids = (f.get_tensor(name) if name in f.keys() else None for name in ("null_pooled", "time_ids"))  # noqa: SIM118
    if int(metadata["num_inference_steps"]) != len(null_embeddings):
        raise SdpipeError(f"{path}: {len(null_embeddings)} null embeddings for {metadata['num_inference_steps']} steps")
    return InvertedImage(
        image_id=metadata.get("image_id", path.stem),
        prompt=metadata["prompt"],
        latent=latent,
        null_embeddings=null_embeddings,
        guidance_scale=float(metadata["guidance_scale"]),
        base_model=metadata.get("base_model"),
        null_pooled=null_pooled,
        time_ids=time_ids,
    )
