"""The training loop every method shares, in the spirit of diffusers' training examples (one linear function).

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
"""

from __future__ import annotations

import csv
import gc
import math
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from sdpipe.data.captions import apply_caption_ops
from sdpipe.errors import SdpipeError
from sdpipe.io import atomic_path, write_json
from sdpipe.models.loading import (
    classify_model_source,
    load_noise_scheduler,
    load_pipeline,
    load_text_encoder,
    load_tokenizer,
    load_unet,
    load_vae,
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
from sdpipe.training.data import Batch, LatentBatches, load_examples
from sdpipe.training.diffusion import diffusion_loss, prediction_target, sample_noise, sample_timesteps
from sdpipe.training.ema import Ema
from sdpipe.training.method import Models, TrainingMethod
from sdpipe.training.optim import make_lr_scheduler, make_optimizer
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
    """Trains `method` under `params` (the whole `Params`), writes its outputs under `out_dir`; returns the metrics."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    out_dir = Path(out_dir)
    common, method_params, key = params.train.common, method.params, method.params_key
    seed, max_steps = params.base.seed, method_params.max_steps
    started = time.monotonic()

    # 1. The accelerator: device, mixed precision, gradient accumulation (and processes under `accelerate launch`).
    device = resolve_device(params.base.device)
    weight_dtype = resolve_dtype(params.base.precision, device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # `cuda:N`: the accelerator uses the current CUDA device
    accelerator = Accelerator(
        mixed_precision=MIXED_PRECISION[weight_dtype],
        gradient_accumulation_steps=common.gradient_accumulation_steps,
        cpu=device.type == "cpu",
    )
    device = accelerator.device
    set_seed(seed)  # the global RNGs: only dropout-like layers draw from them

    # 2. The data: cached latents and captions of the method's datasets.
    datasets = method_datasets(params.base.datasets, method_params.datasets, key)
    latents_dir, captions_dir = Path(params.paths.latents), Path(params.paths.captions)
    examples = load_examples(latents_dir, captions_dir, datasets, params.base.base_model)
    batches = LatentBatches(examples, common.batch_size, seed, common.flip)
    input_files = [latents_dir / f"{name}.safetensors" for name in datasets]
    input_files += [captions_dir / f"{name}.jsonl" for name in datasets]
    prior = method.prior_preservation()  # class images beside the method's own (DreamBooth)
    class_batches = None
    if prior is not None:
        class_seed = derived_seed(seed, "class images")
        class_batches = LatentBatches(prior.examples, common.batch_size, class_seed, common.flip)
        input_files += prior.files

    # 3. The models: all frozen, then the method changes them and unfreezes what it trains.
    models = load_models(params.base, device)
    check_latents_fit(examples[0], models.unet, latents_dir)
    if prior is not None:
        check_latents_fit(prior.examples[0], models.unet, prior.files[0].parent)
    timestep_range(common, models.noise_scheduler)  # checked before any work
    method.setup(models)
    for name in ("unet", "text_encoder"):
        model = getattr(models, name)
        if name in method.trained_models:
            model.train()
        elif weight_dtype != torch.float32:
            model.to(device, dtype=weight_dtype)  # frozen weights in the compute precision (less memory)
        else:
            model.to(device)
    if common.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        if method.text_encoder_trains:
            models.text_encoder.gradient_checkpointing_enable()
    if common.channels_last:
        models.unet.to(memory_format=torch.channels_last)
    if common.compile:
        models.unet.compile()  # in place: the module, its state dict and its saved files stay as they were

    # 4. Optimizer and schedule; accelerate wraps the trained models (mixed precision, DDP) and the optimizer.
    parameter_groups = method.parameter_groups()
    parameters = [parameter for group in parameter_groups for parameter in group["params"]]
    if not parameters:
        raise SdpipeError(f"{key}: the method has no trainable parameters")
    optimizer = make_optimizer(parameter_groups, method_params.learning_rate, common, device)
    lr_scheduler = make_lr_scheduler(optimizer, common, max_steps)
    prepared = accelerator.prepare(*[getattr(models, name) for name in method.trained_models], optimizer)
    for name, module in zip(method.trained_models, prepared[:-1]):
        setattr(models, name, module)
    optimizer = prepared[-1]
    accelerator.register_for_checkpointing(lr_scheduler)
    trained_modules = [getattr(models, name) for name in method.trained_models]
    ema = Ema(parameters, method.ema_decay) if method.ema_decay is not None else None
    if ema is not None:
        checkpoint_ema(accelerator, ema)

    # 5. Resume from the latest checkpoint made with the same params and data.
    checkpoints_dir = out_dir / CHECKPOINTS_DIR
    if params.paths.checkpoints:
        checkpoints_dir = Path(params.paths.checkpoints) / method.name
    fingerprint = run_fingerprint(method.name, method_params, params, input_files)
    start_step, losses = 0, []
    history = {LIVE_DIR: out_dir / LIVE_DIR, SAMPLES_DIR: out_dir / SAMPLES_DIR}  # what a checkpoint carries
    if accelerator.is_main_process:
        remove_stale_checkpoints(checkpoints_dir, fingerprint if common.resume else None)
    accelerator.wait_for_everyone()
    resumable = latest_checkpoint(checkpoints_dir, fingerprint)
    if resumable is not None:
        checkpoint, run_info = resumable
        accelerator.load_state(str(checkpoint))
        start_step, losses = run_info["step"], list(run_info["losses"])
        if accelerator.is_main_process:
            restore_history(checkpoint, history)
        log(f"train {method.name}: resuming from {checkpoint} (step {start_step} of {max_steps})")
    live = start_live(out_dir, start_step) if accelerator.is_main_process else None

    # 6. Train.
    caption_ops = method.caption_ops(common.caption_ops)
    text_cache = TextCache(method, models) if can_cache_text(method, common, caption_ops) else None
    accumulation = common.gradient_accumulation_steps
    step_losses = StepLosses(accelerator, live, losses)
    vae = None
    try:
        for step in track(range(start_step, max_steps), f"train {method.name}", total=max_steps - start_step):
            step_loss, step_class_loss = 0.0, 0.0
            for micro in range(accumulation):
                index = step * accumulation + micro  # the global micro-batch index
                batch_index = index * accelerator.num_processes + accelerator.process_index
                batch = batches.batch(batch_index)
                class_batch = class_batches.batch(batch_index) if class_batches is not None else None
                rng_parts = (index, accelerator.process_index)
                caption_rng = python_rng(seed, "captions", *rng_parts)
                captions = [
                    method.caption(apply_caption_ops(caption, caption_ops, caption_rng))
                    for caption in batch.captions
                ]
                noise_generator = torch_generator(seed, "noise", *rng_parts)
                with accelerator.accumulate(*trained_modules):
                    loss, class_loss = batch_loss(
                        method, models, batch, captions, text_cache, noise_generator, common, accelerator, class_batch,
                        prior.loss_weight if prior is not None else 0.0,
                    )
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and common.max_grad_norm is not None:
                        accelerator.clip_grad_norm_(parameters, common.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                step_loss += loss.detach() / accumulation
                if class_loss is not None:
                    step_class_loss += class_loss.detach() / accumulation
            lr_scheduler.step()
            method.after_optimizer_step(models)
            if ema is not None:
                ema.step(parameters)
            done = step + 1
            class_loss_of_step = step_class_loss if prior is not None else None
            step_losses.add(done, step_loss, class_loss_of_step, lr_scheduler.get_last_lr()[0])
            sample_now = common.sample_every and (done % common.sample_every == 0 or done == max_steps)
            checkpoint_now = common.checkpoint_every and done % common.checkpoint_every == 0 and done < max_steps
            # every loss so far is read (and a non-finite one stops the run) before a sample, a checkpoint or the end
            diverged_at = step_losses.read(keep=0 if sample_now or checkpoint_now or done == max_steps else 1)
            if diverged_at is not None:
                raise diverged(*diverged_at, max_steps, key, method_params.learning_rate, out_dir)
            if sample_now and accelerator.is_main_process:
                if vae is None:  # loaded only when sampling
                    vae = load_vae(
                        params.base.base_model, params.base.base_model_config, dtype=weight_dtype, device=device
                    )
                sample_path = out_dir / SAMPLES_DIR / f"step-{done:06d}.png"
                with ema.applied(parameters) if ema is not None else nullcontext():
                    save_samples(method, models, vae, accelerator, common, seed, sample_path)
            if checkpoint_now:
                run_info = {"fingerprint": fingerprint, "losses": losses}
                save_checkpoint(accelerator, checkpoints_dir, done, run_info, common.keep_checkpoints, history)
    finally:
        if live is not None:
            live.end()

    # 7. The method's final files (with the averaged weights, when there is an average) and the metrics, written
    # only now and atomically.
    if ema is not None:
        ema.copy_to(parameters)
    release_training_state(optimizer, ema)
    accelerator.wait_for_everyone()
    metrics = {
        "loss": sum(losses[-LOSS_WINDOW:]) / len(losses[-LOSS_WINDOW:]),
        "steps": max_steps,
        "images": len(examples),
    }
    if prior is not None:
        metrics["class_images"] = len(prior.examples)
    if accelerator.is_main_process:
        (out_dir / SAMPLES_DIR).mkdir(parents=True, exist_ok=True)  # a DVC out, even when nothing was sampled
        with atomic_path(out_dir / MODEL_DIR) as tmp:
            tmp.mkdir()
            method.save(unwrapped(models, accelerator), tmp, max_steps)
        write_json(out_dir / METRICS_FILE, metrics)
        seconds = time.monotonic() - started
        log(f"train {method.name}: {max_steps} steps, loss {metrics['loss']:.4f}, {seconds:.0f}s -> {out_dir}")
    accelerator.end_training()
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


def method_datasets(base_datasets: list[str], chosen: list[str] | None, key: str) -> list[str]:
    """The datasets a method trains on: its own choice, which must be prepared (in `base.datasets`), or all of them."""
    if chosen is None:
        return list(base_datasets)
    missing = [name for name in chosen if name not in base_datasets]
    if missing:
        raise SdpipeError(
            f"{key}.datasets lists {', '.join(missing)}, which base.datasets ({', '.join(base_datasets)}) does not; "
            "only datasets in base.datasets are prepared, captioned and encoded"
        )
    if not chosen:
        raise SdpipeError(f"{key}.datasets is empty; list at least one dataset of base.datasets, or null for all")
    return list(chosen)


def load_models(base, device: torch.device) -> Models:
    """The tokenizer, text encoder, UNet and training noise scheduler of `base.base_model`, in fp32 on the CPU."""
    source = classify_model_source(base.base_model)
    if source == "single_file":  # one file holds every model: build the pipeline once and take its parts
        pipe = load_pipeline(base.base_model, base.base_model_config)
        tokenizer, text_encoder, unet = pipe.tokenizer, pipe.text_encoder, pipe.unet
    else:
        tokenizer = load_tokenizer(base.base_model, base.base_model_config)
        text_encoder = load_text_encoder(base.base_model, base.base_model_config)
        unet = load_unet(base.base_model, base.base_model_config)
    for model in (text_encoder, unet):
        model.requires_grad_(False)
        model.eval()
    noise_scheduler = load_noise_scheduler(base.base_model, base.base_model_config)
    return Models(
        tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, noise_scheduler=noise_scheduler, device=device
    )


def check_latents_fit(example, unet, latents_dir: Path) -> None:
    channels = example.latents.shape[0]
    if channels != unet.config.in_channels:
        raise SdpipeError(
            f"{latents_dir}: the latents have {channels} channels but the UNet of base.base_model takes "
            f"{unet.config.in_channels}; run the `encode` stage again with this base model"
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
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        for caption in captions:
            if caption not in self.cache:
                with torch.no_grad():
                    self.cache[caption] = self.method.encode_text(self.models, [caption])[0]
        return torch.stack([self.cache[caption] for caption in captions])


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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The loss of one micro-batch, and the class images' loss (None without a `class_batch`).

    With a `class_batch` (prior preservation), the loss is the images' loss + `class_loss_weight` × the class
    images' loss, as in diffusers' `train_dreambooth.py`, and the class captions are used as they are. The images
    and the class images share one text encoder and UNet pass when their latents have one size (fewer, larger
    operations: faster than two passes, most of all on the CPU); with aspect buckets they may not, and each takes
    its own.
    """
    parts = [(batch.latents, captions)]
    if class_batch is not None:
        parts.append((class_batch.latents, class_batch.captions))
    one_size = len({latents.shape[1:] for latents, _ in parts}) == 1
    passes = [parts] if one_size else [[part] for part in parts]
    losses = []
    for parts_of_pass in passes:
        losses += diffusion_losses(method, models, parts_of_pass, text_cache, generator, common, accelerator)
    if class_batch is None:
        return losses[0], None
    return losses[0] + class_loss_weight * losses[1], losses[1]


def diffusion_losses(
    method: TrainingMethod,
    models: Models,
    parts: list[tuple[torch.Tensor, list[str]]],
    text_cache: TextCache | None,
    generator: torch.Generator,
    common,
    accelerator,
) -> list[torch.Tensor]:
    """The diffusion loss of each part, a batch of latents (of one size) and their captions, all in one UNet pass:
    noise them at random timesteps, predict, compare.

    The random draws are made part by part (noise, then timesteps), so a part draws the same whether it shares its
    pass or takes one of its own.
    """
    device = accelerator.device
    low, high = timestep_range(common, models.noise_scheduler)
    latents, noise, timesteps, captions = [], [], [], []
    for part_latents, part_captions in parts:
        latents.append(to_device(part_latents, device))
        noise.append(to_device(sample_noise(part_latents.shape, generator, common.noise_offset), device))
        timesteps.append(to_device(sample_timesteps(len(part_latents), low, high, generator), device))
        captions += part_captions
    sizes = [len(part_latents) for part_latents in latents]
    latents, noise, timesteps = torch.cat(latents), torch.cat(noise), torch.cat(timesteps)
    noisy_latents = models.noise_scheduler.add_noise(latents, noise, timesteps)
    if common.channels_last:
        noisy_latents = noisy_latents.contiguous(memory_format=torch.channels_last)
    target = prediction_target(models.noise_scheduler, latents, noise, timesteps)
    with accelerator.autocast():
        encoder_hidden_states = text_cache(captions) if text_cache is not None else method.encode_text(models, captions)
        prediction = method.predict(models, noisy_latents, timesteps, encoder_hidden_states)
    return [
        diffusion_loss(part_prediction, part_target, part_timesteps, models.noise_scheduler, common.snr_gamma)
        for part_prediction, part_target, part_timesteps in zip(
            prediction.split(sizes), target.split(sizes), timesteps.split(sizes)
        )
    ]


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
    return Models(
        tokenizer=models.tokenizer,
        text_encoder=accelerator.unwrap_model(models.text_encoder),
        unet=accelerator.unwrap_model(models.unet),
        noise_scheduler=models.noise_scheduler,
        device=models.device,
    )


def save_samples(method: TrainingMethod, models: Models, vae, accelerator, common, seed: int, path: Path) -> None:
    plain = unwrapped(models, accelerator)
    prompts = [method.caption(prompt) for prompt in common.sample_prompts]
    with accelerator.autocast():
        embeddings = method.sample_embeddings(plain, prompts)
        images = sample_images(
            vae,
            plain.text_encoder,
            plain.tokenizer,
            plain.unet,
            plain.noise_scheduler,
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
