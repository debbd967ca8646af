"""The training loop every method shares, in the spirit of diffusers' training examples: `run_training` calls its
phases in order (accelerator, data, models, optimization, resume, train, save), each a function below it.

`run_training(params, method, out_dir)` trains `method` (a `TrainingMethod`) on the cached latents and captions
of its datasets and writes, under `out_dir`:

- `model/`: the method's final files (`method.save`, with the EMA weights when the method keeps an average),
  written atomically at the very end;
- `metrics.json`: final loss, steps, images (deterministic: no timings);
- `samples/step-NNNNNN.png`: fixed-seed sample images every `train.common.sample_every` steps;
- `live/`: DVCLive metrics (loss and learning rate per step);
- `checkpoints/step-NNNNNN/`: the full training state every `train.common.checkpoint_every` steps (before the
  last); the one folder that persists across runs, resumed from when its params and data are unchanged.

On the CPU the same params and seed give bitwise-identical files, and a resumed run ends with exactly the
weights of an uninterrupted one: every random draw is a function of the seed and the step
(`sdpipe.training.rng`), and the checkpoint holds the rest of the state.

Under `accelerate launch` (`train.common.processes`), the processes split each micro-batch
(`sdpipe.training.processes`): N processes draw what one process with an N times larger batch draws.
"""

from __future__ import annotations

import csv
import gc
import math
import shutil
import time
from contextlib import nullcontext
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from sdpipe.data.captions import apply_caption_ops
from sdpipe.errors import SdpipeError
from sdpipe.families import Conditioning
from sdpipe.io import atomic_path, write_json
from sdpipe.models.loading import (
    classify_model_source,
    load_noise_scheduler,
    load_pipeline,
    load_text_encoder,
    load_tokenizer,
    load_unet,
    load_vae,
    model_family,
    resolve_device,
    resolve_dtype,
)
from sdpipe.progress import log, track
from sdpipe.training.checkpoints import (
    latest_checkpoint,
    remove_stale_checkpoints,
    restore_history,
    run_fingerprint,
    save_checkpoint,
)
from sdpipe.training.data import Batch, Example, LatentBatches, PriorPreservation, load_examples
from sdpipe.training.datasets import method_datasets
from sdpipe.training.diffusion import diffusion_loss, prediction_target, sample_noise, sample_timesteps
from sdpipe.training.ema import Ema
from sdpipe.training.method import Models, PredictedBatch, TrainingMethod
from sdpipe.training.optim import make_lr_scheduler, make_optimizer
from sdpipe.training.processes import ONE_PROCESS, ProcessShare
from sdpipe.training.rng import derived_seed, python_rng, torch_generator
from sdpipe.training.samples import sample_images, save_grid

MODEL_DIR = "model"
SAMPLES_DIR = "samples"
LIVE_DIR = "live"
CHECKPOINTS_DIR = "checkpoints"
METRICS_FILE = "metrics.json"
LOSS_WINDOW = 50  # metrics.json's `loss` is the mean over the last this many steps
MIXED_PRECISION = {torch.float32: "no", torch.float16: "fp16", torch.bfloat16: "bf16"}


def run_training(params, method: TrainingMethod, out_dir: Path) -> dict:
    """Trains `method` under `params` (the whole `Params`), writes its outputs under `out_dir`; returns the metrics.

    The run's phases follow in this file in the order they run.
    """
    started = time.monotonic()
    out_dir = Path(out_dir)
    accelerator, weight_dtype = make_accelerator(params)
    data = load_data(params, method, accelerator.num_processes)
    models = prepare_models(params, method, data, accelerator.device, weight_dtype)
    optimization = prepare_optimization(params, method, models, accelerator)
    progress = resume(params, method, data, accelerator, out_dir)
    run = TrainingRun(params, method, out_dir, accelerator, weight_dtype, data, models, optimization, progress)
    train(run)
    metrics = save_outputs(run, started)
    accelerator.end_training()
    return metrics


@dataclass
class TrainingData:
    """What a run trains on: the method's examples (and class images) as seeded streams of micro-batches."""

    examples: list[Example]
    batches: LatentBatches
    """The micro-batches of all processes together (`batch_size` × processes images), split by `ProcessShare`."""
    prior: PriorPreservation | None
    """Class images trained beside the method's own (DreamBooth's prior preservation), if any."""
    class_batches: LatentBatches | None
    latents_dir: Path
    input_files: list[Path]
    """The files the examples were read from (a change to them makes checkpoints stale)."""


@dataclass
class Optimization:
    """What changes the trained weights: their parameters, the optimizer, the schedule and the moving average."""

    parameters: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    trained_modules: list[torch.nn.Module]
    """The trained models, as accelerate wrapped them."""
    ema: Ema | None


@dataclass
class Progress:
    """Where a run starts (0, or the step of the checkpoint it resumed) and where it saves its checkpoints."""

    start_step: int
    losses: list[float]
    """The loss of every optimizer step so far; the training appends to it."""
    checkpoints_dir: Path
    fingerprint: str
    """The hash of what determines the result (`run_fingerprint`): only checkpoints with it are resumed."""
    history: dict[str, Path]
    """The output folders a checkpoint carries (DVCLive metrics, samples)."""


@dataclass
class TrainingRun:
    """Everything the training and saving phases share, as the phases before them set it up."""

    params: object
    method: TrainingMethod
    out_dir: Path
    accelerator: object
    weight_dtype: torch.dtype
    data: TrainingData
    models: Models
    optimization: Optimization
    progress: Progress


def make_accelerator(params) -> tuple[object, torch.dtype]:
    """The accelerator (device, mixed precision, gradient accumulation, and the processes under `accelerate launch`)
    and the dtype of the frozen weights; seeds the global RNGs."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    common = params.train.common
    device = resolve_device(params.base.device)
    weight_dtype = resolve_dtype(params.base.precision, device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # `cuda:N`: the accelerator uses the current CUDA device
    accelerator = Accelerator(
        mixed_precision=MIXED_PRECISION[weight_dtype],
        gradient_accumulation_steps=common.gradient_accumulation_steps,
        cpu=device.type == "cpu",
    )
    if accelerator.num_processes != common.processes:
        raise SdpipeError(
            f"train.common.processes is {common.processes}, but this run has {accelerator.num_processes} "
            "process(es): set train.common.processes to the number of processes and run the stage without "
            "`accelerate launch` (it launches itself, and dvc.lock then records how it ran)"
        )
    set_seed(params.base.seed)  # the global RNGs: only dropout-like layers draw from them
    return accelerator, weight_dtype


def load_data(params, method: TrainingMethod, processes: int) -> TrainingData:
    """The cached latents and captions of the method's datasets (and its class images), as micro-batch streams."""
    common, key = params.train.common, method.params_key
    datasets = method_datasets(params.base.datasets, method.params.datasets, key)
    latents_dir, captions_dir = Path(params.paths.latents), Path(params.paths.captions)
    examples = load_examples(latents_dir, captions_dir, datasets, params.base.base_model)
    micro_batch_size = common.batch_size * processes
    batches = LatentBatches(examples, micro_batch_size, params.base.seed, common.flip)
    input_files = [latents_dir / f"{name}.safetensors" for name in datasets]
    input_files += [captions_dir / f"{name}.jsonl" for name in datasets]
    prior = method.prior_preservation()
    class_batches = None
    if prior is not None:
        class_seed = derived_seed(params.base.seed, "class images")
        class_batches = LatentBatches(prior.examples, micro_batch_size, class_seed, common.flip)
        input_files += prior.files
    return TrainingData(examples, batches, prior, class_batches, latents_dir, input_files)


def prepare_models(
    params, method: TrainingMethod, data: TrainingData, device: torch.device, weight_dtype: torch.dtype
) -> Models:
    """The base model's parts, all frozen; then the method changes them and unfreezes what it trains. The frozen
    ones go to the device in the compute precision."""
    common = params.train.common
    models = load_models(params.base, device)
    check_latents_fit(data.examples[0], models, data.latents_dir)
    if data.prior is not None:
        check_latents_fit(data.prior.examples[0], models, data.prior.files[0].parent)
    timestep_range(common, models.noise_scheduler)  # checked before any work
    method.setup(models)
    for name in ("unet", *models.family.text_encoders):
        model = getattr(models, name)
        if name in method.trained_models:
            model.train()
        elif weight_dtype != torch.float32:
            model.to(device, dtype=weight_dtype)  # frozen weights in the compute precision (less memory)
        else:
            model.to(device)
    if common.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        for name in models.family.text_encoders:
            if name in method.trained_models:
                getattr(models, name).gradient_checkpointing_enable()
    if common.channels_last:
        models.unet.to(memory_format=torch.channels_last)
    if common.compile:
        models.unet.compile()  # in place: the module, its state dict and its saved files stay as they were
    return models


def prepare_optimization(params, method: TrainingMethod, models: Models, accelerator) -> Optimization:
    """The optimizer and schedule of the method's parameters, and their moving average; accelerate wraps the trained
    models (mixed precision, DDP) and the optimizer, and checkpoints the schedule and the average with them."""
    common, method_params = params.train.common, method.params
    parameter_groups = method.parameter_groups()
    parameters = [parameter for group in parameter_groups for parameter in group["params"]]
    if not parameters:
        raise SdpipeError(f"{method.params_key}: the method has no trainable parameters")
    optimizer = make_optimizer(parameter_groups, method_params.learning_rate, common, accelerator.device)
    lr_scheduler = make_lr_scheduler(optimizer, common, method_params.max_steps)
    prepared = accelerator.prepare(*[getattr(models, name) for name in method.trained_models], optimizer)
    for name, module in zip(method.trained_models, prepared[:-1]):
        setattr(models, name, module)
    optimizer = prepared[-1]
    accelerator.register_for_checkpointing(lr_scheduler)
    trained_modules = [getattr(models, name) for name in method.trained_models]
    ema = Ema(parameters, method.ema_decay) if method.ema_decay is not None else None
    if ema is not None:
        checkpoint_ema(accelerator, ema)
    return Optimization(parameters, optimizer, lr_scheduler, trained_modules, ema)


def resume(params, method: TrainingMethod, data: TrainingData, accelerator, out_dir: Path) -> Progress:
    """Loads the latest checkpoint made with the same params, data and code, if there is one, and deletes the others
    (all of them when `train.common.resume` is off)."""
    checkpoints_dir = out_dir / CHECKPOINTS_DIR
    if params.paths.checkpoints:
        checkpoints_dir = Path(params.paths.checkpoints) / method.name
    fingerprint = run_fingerprint(method.name, method.params, params, data.input_files)
    history = {LIVE_DIR: out_dir / LIVE_DIR, SAMPLES_DIR: out_dir / SAMPLES_DIR}  # what a checkpoint carries
    progress = Progress(0, [], checkpoints_dir, fingerprint, history)
    if accelerator.is_main_process:
        remove_stale_checkpoints(checkpoints_dir, fingerprint if params.train.common.resume else None)
    accelerator.wait_for_everyone()
    resumable = latest_checkpoint(checkpoints_dir, fingerprint)
    if resumable is not None:
        checkpoint, run_info = resumable
        accelerator.load_state(str(checkpoint))
        progress.start_step, progress.losses = run_info["step"], list(run_info["losses"])
        if accelerator.is_main_process:
            restore_history(checkpoint, history)
        max_steps = method.params.max_steps
        log(f"train {method.name}: resuming from {checkpoint} (step {progress.start_step} of {max_steps})")
    return progress


def train(run: TrainingRun) -> None:
    """The optimizer steps from `progress.start_step` to `max_steps`; after each, the loss is logged, and samples
    and checkpoints are saved when due. A non-finite loss stops the run."""
    params, method, accelerator, out_dir = run.params, run.method, run.accelerator, run.out_dir
    common, max_steps, key = params.train.common, method.params.max_steps, method.params_key
    optimization, progress = run.optimization, run.progress
    live = start_live(out_dir, progress.start_step) if accelerator.is_main_process else None
    caption_ops = method.caption_ops(common.caption_ops)
    text_cache = TextCache(method, run.models) if can_cache_text(method, common, caption_ops) else None
    step_losses = StepLosses(accelerator, live, progress.losses)
    vae = None
    try:
        start = progress.start_step
        for step in track(range(start, max_steps), f"train {method.name}", total=max_steps - start):
            step_loss, step_class_loss = optimizer_step(run, step, caption_ops, text_cache)
            done = step + 1
            step_losses.add(done, step_loss, step_class_loss, optimization.lr_scheduler.get_last_lr()[0])
            sample_now = common.sample_every and (done % common.sample_every == 0 or done == max_steps)
            checkpoint_now = common.checkpoint_every and done % common.checkpoint_every == 0 and done < max_steps
            # every loss so far is read (and a non-finite one stops the run) before a sample, a checkpoint or the end
            diverged_at = step_losses.read(keep=0 if sample_now or checkpoint_now or done == max_steps else 1)
            if diverged_at is not None:
                raise diverged(*diverged_at, max_steps, key, method.params.learning_rate, out_dir)
            if sample_now and accelerator.is_main_process:
                if vae is None:  # loaded only when sampling
                    vae = load_vae(
                        params.base.base_model, params.base.base_model_config, dtype=run.weight_dtype,
                        device=accelerator.device,
                    )
                sample_path = out_dir / SAMPLES_DIR / f"step-{done:06d}.png"
                ema = optimization.ema
                with ema.applied(optimization.parameters) if ema is not None else nullcontext():
                    save_samples(method, run.models, vae, accelerator, common, params.base.seed, sample_path)
            if checkpoint_now:
                run_info = {"fingerprint": progress.fingerprint, "losses": progress.losses}
                save_checkpoint(
                    accelerator, progress.checkpoints_dir, done, run_info, common.keep_checkpoints, progress.history
                )
    finally:
        if live is not None:
            live.end()


def optimizer_step(
    run: TrainingRun, step: int, caption_ops, text_cache: TextCache | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step (0-based `step`) over `gradient_accumulation_steps` micro-batches; returns its loss and its
    class images' loss (None without class images), still on the device."""
    params, method, models, accelerator = run.params, run.method, run.models, run.accelerator
    common, optimization, prior = params.train.common, run.optimization, run.data.prior
    share = ProcessShare(accelerator.process_index, accelerator.num_processes)
    accumulation = common.gradient_accumulation_steps
    step_loss, step_class_loss = 0.0, 0.0
    for micro in range(accumulation):
        index = step * accumulation + micro  # the run's micro-batch index
        micro_batch = draw_micro_batch(method, run.data, caption_ops, params.base.seed, index, share)
        with accelerator.accumulate(*optimization.trained_modules):
            loss, class_loss = batch_loss(
                method, models, micro_batch.batch, micro_batch.captions, text_cache, micro_batch.noise_generator,
                common, accelerator, micro_batch.class_batch, prior.loss_weight if prior is not None else 0.0, share,
            )
            accelerator.backward(loss)
            if accelerator.sync_gradients and common.max_grad_norm is not None:
                accelerator.clip_grad_norm_(optimization.parameters, common.max_grad_norm)
            optimization.optimizer.step()
            optimization.optimizer.zero_grad(set_to_none=True)
        step_loss += loss.detach() / accumulation
        if class_loss is not None:
            step_class_loss += class_loss.detach() / accumulation
    optimization.lr_scheduler.step()
    method.after_optimizer_step(models)
    if optimization.ema is not None:
        optimization.ema.step(optimization.parameters)
    return step_loss, step_class_loss if prior is not None else None


@dataclass
class MicroBatch:
    """One process's share of a micro-batch, with the captions as trained and the generator of its noise."""

    batch: Batch
    captions: list[str]
    """The batch's captions after the caption ops and the method's mapping (`method.caption`)."""
    class_batch: Batch | None
    noise_generator: torch.Generator
    """Draws the noise and the timesteps of the whole micro-batch (each process keeps its rows)."""


def draw_micro_batch(
    method: TrainingMethod, data: TrainingData, caption_ops, seed: int, index: int, share: ProcessShare
) -> MicroBatch:
    """`share`'s rows of the run's `index`-th micro-batch. Every draw is made for the whole micro-batch, as one
    process would, and each process keeps its rows: N processes train on what one process with an N times larger
    batch trains on."""
    batch = data.batches.batch(index)
    # (index, 0): the position of the draws; the 0 stands where a process index stood when each process drew its own
    caption_rng = python_rng(seed, "captions", index, 0)
    captions = [method.caption(apply_caption_ops(caption, caption_ops, caption_rng)) for caption in batch.captions]
    class_batch = share.take(data.class_batches.batch(index)) if data.class_batches is not None else None
    return MicroBatch(
        batch=share.take(batch),
        captions=captions[share.rows(len(captions) // share.count)],
        class_batch=class_batch,
        noise_generator=torch_generator(seed, "noise", index, 0),
    )


def save_outputs(run: TrainingRun, started: float) -> dict:
    """The method's final files (with the averaged weights, when there is an average) and the metrics, written only
    now and atomically by the main process; returns the metrics."""
    method, accelerator, out_dir, optimization = run.method, run.accelerator, run.out_dir, run.optimization
    max_steps = method.params.max_steps
    if optimization.ema is not None:
        optimization.ema.copy_to(optimization.parameters)
    release_training_state(optimization.optimizer, optimization.ema)
    accelerator.wait_for_everyone()
    metrics = final_metrics(run.progress.losses, max_steps, run.data)
    if accelerator.is_main_process:
        (out_dir / SAMPLES_DIR).mkdir(parents=True, exist_ok=True)  # a DVC out, even when nothing was sampled
        with atomic_path(out_dir / MODEL_DIR) as tmp:
            tmp.mkdir()
            method.save(unwrapped(run.models, accelerator), tmp, max_steps)
        write_json(out_dir / METRICS_FILE, metrics)
        seconds = time.monotonic() - started
        log(f"train {method.name}: {max_steps} steps, loss {metrics['loss']:.4f}, {seconds:.0f}s -> {out_dir}")
    return metrics


def final_metrics(losses: list[float], max_steps: int, data: TrainingData) -> dict:
    """`metrics.json`: the mean loss of the last `LOSS_WINDOW` steps, the steps, the images (and class images)."""
    metrics = {
        "loss": sum(losses[-LOSS_WINDOW:]) / len(losses[-LOSS_WINDOW:]),
        "steps": max_steps,
        "images": len(data.examples),
    }
    if data.prior is not None:
        metrics["class_images"] = len(data.prior.examples)
    return metrics


def release_training_state(optimizer, ema: Ema | None) -> None:
    """Frees what training needed and saving does not: the gradients, the optimizer's moments and the moving average.
    At SD 1.5 size they are two to three times the trained weights (7.9 GB of Adam moments for the UNet and text
    encoder), and `method.save` needs room for one more copy of the model while it writes."""
    optimizer.zero_grad(set_to_none=True)
    optimizer.state.clear()
    if ema is not None:
        ema.release()
    gc.collect()


def load_models(base, device: torch.device) -> Models:
    """The tokenizers, text encoders (the model family's), UNet and training noise scheduler of `base.base_model`,
    frozen, in fp32 on the CPU."""
    family = model_family(base.base_model, base.base_model_config)
    if classify_model_source(base.base_model) == "single_file":  # one file holds every model: build the pipeline once
        pipe = load_pipeline(base.base_model, base.base_model_config)
        parts = {name: getattr(pipe, name) for name in ("unet", *family.tokenizers, *family.text_encoders)}
    else:
        parts = {"unet": load_unet(base.base_model, base.base_model_config)}
        for name in family.tokenizers:
            parts[name] = load_tokenizer(base.base_model, base.base_model_config, subfolder=name)
        for name in family.text_encoders:
            parts[name] = load_text_encoder(base.base_model, base.base_model_config, subfolder=name)
    for name in ("unet", *family.text_encoders):
        parts[name].requires_grad_(False)
        parts[name].eval()
    noise_scheduler = load_noise_scheduler(base.base_model, base.base_model_config)
    return Models(**parts, noise_scheduler=noise_scheduler, device=device, family=family)


def check_latents_fit(example, models: Models, latents_dir: Path) -> None:
    """Refuses latents encoded for another model: another channel count, or no SDXL size and crop (time ids)."""
    channels, unet = example.latents.shape[0], models.unet
    if channels != unet.config.in_channels:
        raise SdpipeError(
            f"{latents_dir}: the latents have {channels} channels but the UNet of base.base_model takes "
            f"{unet.config.in_channels}; run the `encode` stage again with this base model"
        )
    if models.family.size_conditioning and example.time_ids is None:
        raise SdpipeError(
            f"{latents_dir}: the latents have no size and crop (time ids), which a {models.family.title} UNet takes; "
            "run the `encode` stage again with this base model"
        )


def timestep_range(common, noise_scheduler) -> tuple[int, int]:
    """[low, high) of the sampled timesteps, checked against the scheduler's number of timesteps."""
    total = noise_scheduler.config.num_train_timesteps
    high = common.max_timestep if common.max_timestep is not None else total
    if high > total:
        raise SdpipeError(
            f"train.common.max_timestep ({high}) is larger than the base model's num_train_timesteps ({total})"
        )
    if common.min_timestep >= high:
        raise SdpipeError(f"train.common.min_timestep ({common.min_timestep}) must be smaller than {high}")
    return common.min_timestep, high


def can_cache_text(method: TrainingMethod, common, ops) -> bool:
    """Text encoder outputs can be cached when it is frozen and each caption has few variants."""
    return common.cache_text_embeddings and not method.text_encoder_trains and not (ops.shuffle_tags or ops.tag_dropout)


class TextCache:
    """The frozen text encoder's output per caption, computed once (one caption at a time, so that an entry does
    not depend on which batch first needed it)."""

    def __init__(self, method: TrainingMethod, models: Models):
        self.method, self.models = method, models
        self.cache: dict[str, Conditioning] = {}

    def __call__(self, captions: list[str]) -> Conditioning:
        for caption in captions:
            if caption not in self.cache:
                with torch.no_grad():
                    self.cache[caption] = self.method.encode_text(self.models, [caption])
        return Conditioning.cat([self.cache[caption] for caption in captions])


class StepLosses:
    """The loss of every optimizer step (and the class images' loss), appended to `losses` and logged to DVCLive
    with the learning rate.

    Reading a loss makes the host wait for the device to finish its step, so a step's loss is read one step late,
    while the device runs the next step: the host queues work without ever leaving the device idle.
    """

    def __init__(self, accelerator, live, losses: list[float]):
        self.accelerator, self.live, self.losses = accelerator, live, losses
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor | None, float]] = []

    def add(self, step: int, loss: torch.Tensor, class_loss: torch.Tensor | None, lr: float) -> None:
        """Step `step`'s losses (still on the device) and the learning rate after it."""
        self.pending.append((step, loss, class_loss, lr))

    def read(self, keep: int) -> tuple[float, int] | None:
        """Reads and logs all but the last `keep` pending steps; returns (loss, 0-based step) of the first
        non-finite loss, if any (on every process alike: the losses are reduced over the processes)."""
        while len(self.pending) > keep:
            step, loss, class_loss, lr = self.pending.pop(0)
            loss_value = self.accelerator.reduce(loss, reduction="mean").item()
            if not math.isfinite(loss_value):
                return loss_value, step - 1
            self.losses.append(loss_value)
            if class_loss is not None:
                class_loss_value = self.accelerator.reduce(class_loss, reduction="mean").item()
            if self.live is not None:
                self.live.step = step
                self.live.log_metric("loss", loss_value)
                if class_loss is not None:
                    self.live.log_metric("class_loss", class_loss_value)
                self.live.log_metric("lr", lr)
        return None


def checkpoint_ema(accelerator, ema: Ema) -> None:
    """Makes every checkpoint hold the moving average (`ema.safetensors`) and every resume read it back."""

    def save(_models, _weights, folder: str) -> None:
        if accelerator.is_main_process:
            ema.save(Path(folder))

    def load(_models, folder: str) -> None:
        ema.load(Path(folder))

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def batch_loss(
    method: TrainingMethod,
    models: Models,
    batch: Batch,
    captions: list[str],
    text_cache: TextCache | None,
    generator: torch.Generator,
    common,
    accelerator,
    class_batch: Batch | None = None,
    class_loss_weight: float = 0.0,
    share: ProcessShare = ONE_PROCESS,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The loss of one micro-batch, and the class images' loss (None without a `class_batch`).

    With a `class_batch` (prior preservation), the loss is the images' loss + `class_loss_weight` × the class
    images' loss, as in diffusers' `train_dreambooth.py`, and the class captions are used as they are. The images
    and the class images share one text encoder and UNet pass when their latents have one size (fewer, larger
    operations: faster than two passes, most of all on the CPU); with aspect buckets they may not, and each takes
    its own. `batch` and `class_batch` are `share`'s rows of the micro-batch: the noise and timesteps are drawn for
    the whole micro-batch and the process keeps its rows.
    """
    parts = [dataclasses.replace(batch, captions=captions)]
    if class_batch is not None:
        parts.append(class_batch)
    one_size = len({part.latents.shape[1:] for part in parts}) == 1
    passes = [parts] if one_size else [[part] for part in parts]
    losses = []
    for parts_of_pass in passes:
        losses += diffusion_losses(method, models, parts_of_pass, text_cache, generator, common, accelerator, share)
    if class_batch is None:
        return losses[0], None
    return losses[0] + class_loss_weight * losses[1], losses[1]


def diffusion_losses(
    method: TrainingMethod,
    models: Models,
    parts: list[Batch],
    text_cache: TextCache | None,
    generator: torch.Generator,
    common,
    accelerator,
    share: ProcessShare = ONE_PROCESS,
) -> list[torch.Tensor]:
    """The diffusion loss of each part, a batch of latents (of one size) with their captions (as trained) and SDXL
    time ids, all in one UNet pass: noise them at random timesteps, predict, compare.

    The random draws are made part by part (noise, then timesteps), so a part draws the same whether it shares its
    pass or takes one of its own. A part is `share`'s rows of a part of the micro-batch: each part's draws are made
    for all of its rows, of all processes, and this process keeps its own.
    """
    device = accelerator.device
    low, high = timestep_range(common, models.noise_scheduler)
    latents, noise, timesteps, captions, time_ids = [], [], [], [], []
    for part in parts:
        part_latents = part.latents
        rows = share.rows(len(part_latents))
        whole_shape = (len(part_latents) * share.count, *part_latents.shape[1:])
        latents.append(to_device(part_latents, device))
        noise.append(to_device(sample_noise(whole_shape, generator, common.noise_offset)[rows], device))
        timesteps.append(to_device(sample_timesteps(whole_shape[0], low, high, generator)[rows], device))
        captions += part.captions
        time_ids.append(part.time_ids)
    time_ids = None if any(ids is None for ids in time_ids) else to_device(torch.cat(time_ids), device)
    sizes = [len(part_latents) for part_latents in latents]
    latents, noise, timesteps = torch.cat(latents), torch.cat(noise), torch.cat(timesteps)
    noisy_latents = models.noise_scheduler.add_noise(latents, noise, timesteps)
    if common.channels_last:
        noisy_latents = noisy_latents.contiguous(memory_format=torch.channels_last)
    target = prediction_target(models.noise_scheduler, latents, noise, timesteps)
    with accelerator.autocast():
        conditioning = text_cache(captions) if text_cache is not None else method.encode_text(models, captions)
        prediction = method.predict(models, noisy_latents, timesteps, conditioning, time_ids)
    losses = []
    for part in zip(latents.split(sizes), noisy_latents.split(sizes), timesteps.split(sizes), prediction.split(sizes),
                    target.split(sizes)):
        part_latents, part_noisy, part_timesteps, part_prediction, part_target = part
        loss = diffusion_loss(part_prediction, part_target, part_timesteps, models.noise_scheduler, common.snr_gamma)
        extra = method.extra_loss(models, PredictedBatch(part_latents, part_noisy, part_timesteps, part_prediction))
        losses.append(loss if extra is None else loss + extra)
    return losses


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`; a CPU tensor goes to CUDA from pinned memory without waiting (a copy from pageable
    memory would make the host wait for the GPU to finish the previous step)."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def diverged(loss: float, step: int, max_steps: int, key: str, learning_rate: float, out_dir: Path) -> SdpipeError:
    return SdpipeError(
        f"{key}: the training loss became {loss} at step {step + 1} of {max_steps}: the training diverged. "
        f"Lower {key}.learning_rate (now {learning_rate:g}), or clip gradients with train.common.max_grad_norm. "
        f"No model was written to {out_dir / MODEL_DIR}"
    )


def unwrapped(models: Models, accelerator) -> Models:
    """`models` with accelerate's wrappers removed (what a method saves and what samples use)."""
    text_encoder_2 = models.text_encoder_2
    return dataclasses.replace(
        models,
        text_encoder=accelerator.unwrap_model(models.text_encoder),
        text_encoder_2=None if text_encoder_2 is None else accelerator.unwrap_model(text_encoder_2),
        unet=accelerator.unwrap_model(models.unet),
    )


def save_samples(method: TrainingMethod, models: Models, vae, accelerator, common, seed: int, path: Path) -> None:
    plain = unwrapped(models, accelerator)
    prompts = [method.caption(prompt) for prompt in common.sample_prompts]
    with accelerator.autocast():
        embeddings = method.sample_embeddings(plain, prompts)
        images = sample_images(
            vae,
            plain,
            prompts,
            seed,
            common.sample_steps,
            common.sample_guidance_scale,
            accelerator.device,
            embeddings,
        )
    save_grid(images, path)


def start_live(out_dir: Path, start_step: int):
    """DVCLive logging into `<out>/live` (no dvc.yaml, no experiment); a resumed run continues the history."""
    from dvclive import Live
    from scmrepo.exceptions import SCMError

    live_dir = out_dir / LIVE_DIR
    if start_step == 0:
        shutil.rmtree(out_dir / SAMPLES_DIR, ignore_errors=True)  # samples of an earlier run
    else:
        trim_live_history(live_dir, start_step)
    try:
        return Live(dir=str(live_dir), dvcyaml=False, save_dvc_exp=False, resume=start_step > 0, report=None)
    except SCMError as error:  # DVCLive reads the Git HEAD, which a repository without commits lacks
        raise SdpipeError(
            f"DVCLive cannot log the training metrics here ({error}): make a first commit (git commit) and run again"
        ) from None


def trim_live_history(live_dir: Path, last_step: int) -> None:
    """Drops the rows after `last_step` that an interrupted run logged, so that the resumed run does not repeat them."""
    for tsv in (live_dir / "plots" / "metrics").rglob("*.tsv"):
        with tsv.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
            fields = list(rows[0].keys()) if rows else None
        if fields is None or "step" not in fields:
            continue
        kept = [row for row in rows if int(row["step"]) <= last_step]
        with tsv.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=fields, delimiter="\t", lineterminator="\n")  # as DVCLive writes
            writer.writeheader()
            writer.writerows(kept)
