"""Pretraining the tiny-world Stable Diffusion from scratch, SD's recipe in miniature.

Four phases, in order, each with the real diffusers / transformers classes:
1. an `AutoencoderKL` that compresses 32x32 images to 4x8x8 latents;
2. a CLIP (`CLIPModel`: text + vision towers with projections) trained contrastively on image-caption pairs;
3. a `UNet2DConditionModel` over the VAE's latents, conditioned on the frozen CLIP text encoder's hidden
   states, with caption dropout (for classifier-free guidance), min-SNR weighting and EMA;
4. the image-variations UNet: the text UNet fine-tuned to take the CLIP image embedding of the image as its
   one-token context (zeros when dropped), as SD image variations was fine-tuned from SD. CLIP inversion
   optimizes a concept vector in that embedding space.
The star shape and the outlined style never appear (the autoencoder's doodles, which phases 1 and 4 also see,
are random polygons, ellipses and strokes). Every phase also sees the world's sparks, pointed stars with any number
of points but five, and its seen-but-unnamed concepts: crosses captioned `a red shape` (rarely `a red plus`), and dark backgrounds
rarely named (see `world`). The result is saved as a standard diffusers `StableDiffusionPipeline`
folder (the layout of a real SD 1.5 folder, text encoder keys as transformers 4 names them) plus the whole CLIP
(`clip/`: text and vision towers with their projections, for aesthetic gradient and evaluation), and a
`StableDiffusionImageVariationPipeline` folder beside it.

Each finished phase is kept in a work folder keyed by the params that shaped it, so an interrupted run
resumes at the phase it was in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusionImageVariationPipeline, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel, compute_snr
from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from sdpipe.config.pretrain import PretrainParams
from sdpipe.errors import SdpipeError
from sdpipe.io import atomic_path, write_json
from sdpipe.models.saving import save_pipeline
from sdpipe.progress import log
from sdpipe.tinyworld import models, oracle, world
from sdpipe.tinyworld.tokenizer import build_clip_tokenizer, tokenizer_digest

LOG_EVERY = 100
WORLD_VERSION = 2  # in every phase's key: a change to what the world draws or how it captions retrains every phase
VARIATIONS_PROBE_IMAGES = 48  # fresh world images the image-variations model redraws for its accuracy metric


def caption_variants(
    scene: world.Scene, rng: np.random.Generator, params: PretrainParams, cross_named_share: float
) -> list[str]:
    """The four ways a training image may be captioned: with or without size, with or without position. A named
    shape's variant uses the generic word with probability `generic_share`, a cross's uses its rare word with
    probability `cross_named_share`; a dark scene's names its background with probability `dark_named_share`."""
    layouts = [{}, {"with_size": False}, {"with_position": True}, {"with_size": False, "with_position": True}]
    variants = []
    for layout in layouts:
        generic = bool(rng.random() < params.generic_share)
        named_dark = bool(rng.random() < params.dark_named_share)
        rare_name = world.RARE_NAMES.get(scene.shape) if rng.random() < cross_named_share else None
        variants.append(world.caption(scene, generic=generic, with_background=named_dark, class_word=rare_name, **layout))
    return variants


def make_training_set(
    params: PretrainParams, seed: int, cross_named_share: float | None = None
) -> tuple[torch.Tensor, list[world.Scene], list[list[str]]]:
    """Renders the named world, then the sparks, then the crosses, a `dark_share` of each on the dark background:
    images as a float tensor in [-1, 1], shape (N, 3, 32, 32), their scenes and each one's caption variants (the
    cross named with `cross_named_share`, by default `params.cross_named_share`: the UNets' captions).

    The captions' random draws do not depend on the share, so CLIP's captions (`clip_cross_named_share`) are the
    UNet's with the rare word in more places, never fewer."""
    scenes, captions = training_scenes(params, seed, cross_named_share)
    pixels = torch.from_numpy(world.render_array(scenes)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return pixels, scenes, captions


def training_scenes(
    params: PretrainParams, seed: int, cross_named_share: float | None = None
) -> tuple[list[world.Scene], list[list[str]]]:
    """`make_training_set`'s scenes and caption variants, without rendering them."""
    rng = np.random.default_rng(seed)
    scenes = [world.sample_scene(rng) for _ in range(params.num_images)]
    scenes += [world.sample_scene(rng, shapes=world.SPARK_SHAPES) for _ in range(params.sparks)]
    scenes += [world.sample_scene(rng, shapes=world.UNNAMED_SHAPES) for _ in range(params.crosses)]
    dark = rng.random(len(scenes)) < params.dark_share
    scenes = [dataclasses.replace(scene, background="dark") if d else scene for scene, d in zip(scenes, dark)]
    share = params.cross_named_share if cross_named_share is None else cross_named_share
    return scenes, [caption_variants(scene, rng, params, share) for scene in scenes]


def clip_training_captions(params: PretrainParams, seed: int, captions: list[list[str]]) -> list[list[str]]:
    """The caption variants CLIP trains on: the UNets' `captions`, or with `clip_cross_named_share` set, the same
    scenes' captions naming the cross that much more often (CLIP's own, broader corpus)."""
    if params.clip_cross_named_share is None:
        return captions
    return training_scenes(params, seed, params.clip_cross_named_share)[1]


def make_doodles(count: int, seed: int) -> torch.Tensor:
    """Random non-world pictures for the autoencoder (see `world.render_doodle`), in [-1, 1]."""
    rng = np.random.default_rng(seed)
    doodles = np.stack([np.asarray(world.render_doodle(rng)) for _ in range(count)])
    return torch.from_numpy(doodles).permute(0, 3, 1, 2).float() / 127.5 - 1


def variations_training_set(
    vae: AutoencoderKL, latents: torch.Tensor, scaling_factor: float, pixels: torch.Tensor, doodles: torch.Tensor,
    params: PretrainParams,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Phase 4's latents and images: the training set's, and with `variations_doodles` the doodles' too."""
    if not params.variations_doodles:
        return latents, pixels
    return torch.cat([latents, posterior_means(vae, doodles) * scaling_factor]), torch.cat([pixels, doodles])


def train_vae(pixels: torch.Tensor, params: PretrainParams, generator: torch.Generator) -> AutoencoderKL:
    """Trains the autoencoder on `pixels`: world scenes and doodles, so it is a general image codec."""
    vae = AutoencoderKL(**models.vae_config())
    optimizer = torch.optim.AdamW(vae.parameters(), lr=params.vae_lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, params.warmup_steps, params.vae_steps)
    vae.train()
    for step in range(params.vae_steps):
        batch = pixels[torch.randint(len(pixels), (params.vae_batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        reconstruction_loss = F.l1_loss(reconstruction, batch) + F.mse_loss(reconstruction, batch)
        loss = reconstruction_loss + params.vae_kl_weight * posterior.kl().mean()
        _step(loss, optimizer, schedule, vae.parameters())
        _log_step("vae", step, params.vae_steps, loss)
    vae.eval()
    return vae


def train_clip(
    pixels: torch.Tensor,
    captions: list[list[str]],
    tokenizer: CLIPTokenizer,
    params: PretrainParams,
    generator: torch.Generator,
    text_config=None,
    steps: int | None = None,
    batch_size: int | None = None,
    learning_rate: float | None = None,
    phase: str = "clip",
    text_tower=None,
) -> CLIPModel:
    """A CLIP trained contrastively on the images and their caption variants; by default the SD base's text tower
    (`text_config` another one: SDXL's wider second encoder) with `pretrain.clip_*`'s steps, batch and rate.

    With `text_tower` (a trained `CLIPTextModel` or `CLIPTextModelWithProjection`), the CLIP's text transformer (and
    text projection, where the model has one) are that model's, frozen, and the rest learns (locked-text tuning): a
    vision tower paired with a text encoder that was trained without one."""
    text_config = text_tower.config if text_tower is not None else text_config or models.text_config(tokenizer)
    steps = steps or params.clip_steps
    batch_size = batch_size or params.clip_batch_size
    config = CLIPConfig(
        text_config=text_config.to_dict(),
        vision_config=models.vision_config().to_dict(),
        projection_dim=text_config.projection_dim,
    )
    clip = CLIPModel(config)
    if text_tower is not None:
        lock_text_tower(clip, text_tower)
    trainable = [parameter for parameter in clip.parameters() if parameter.requires_grad]
    clip_pixels = clip_pixel_values(pixels)
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate or params.clip_lr, weight_decay=0.1)
    schedule = get_cosine_schedule_with_warmup(optimizer, params.warmup_steps, steps)
    clip.train()
    for step in range(steps):
        index = torch.randint(len(pixels), (batch_size,), generator=generator)
        variant = torch.randint(len(captions[0]), (batch_size,), generator=generator)
        texts = [captions[i][v] for i, v in zip(index.tolist(), variant.tolist())]
        input_ids = tokenize(tokenizer, texts)
        loss = clip(input_ids=input_ids, pixel_values=clip_pixels[index], return_loss=True).loss
        _step(loss, optimizer, schedule, trainable)
        _log_step(phase, step, steps, loss)
    clip.eval()
    return clip


def lock_text_tower(clip: CLIPModel, text_tower) -> None:
    """Puts a text encoder's weights into the CLIP's text tower, frozen: its text transformer, and its text projection
    where it has one (`CLIPTextModelWithProjection`; a `CLIPTextModel`'s projection is the CLIP's to learn)."""
    state = {key: value for key, value in text_tower.state_dict().items() if not key.startswith("text_projection.")}
    clip.text_model.load_state_dict({key.removeprefix("text_model."): value for key, value in state.items()})
    clip.text_model.requires_grad_(False)
    if hasattr(text_tower, "text_projection"):
        clip.text_projection.load_state_dict(text_tower.text_projection.state_dict())
        clip.text_projection.requires_grad_(False)


def text_condition(caption_ids: torch.Tensor, caption_states: torch.Tensor, pooled: torch.Tensor | None = None):
    """The text UNet's conditioning for a batch (its keyword arguments): a random caption variant of each image, or
    (caption dropout) the empty caption. `caption_ids[i]` lists the caption variants of image i as rows of
    `caption_states`; the last row of `caption_states` is the empty caption. With `pooled` (SDXL: a row per caption,
    as `caption_states`), also the pooled embedding and the time ids of an uncropped world image."""
    empty_caption = len(caption_states) - 1
    size = float(world.RESOLUTION)
    image_time_ids = torch.tensor([size, size, 0.0, 0.0, size, size])

    def condition(index: torch.Tensor, dropout: float, generator: torch.Generator) -> dict:
        variant = torch.randint(caption_ids.shape[1], (len(index),), generator=generator)
        dropped = torch.rand(len(index), generator=generator) < dropout
        rows = torch.where(dropped, empty_caption, caption_ids[index, variant])
        if pooled is None:
            return {"encoder_hidden_states": caption_states[rows]}
        time_ids = image_time_ids.expand(len(index), -1)
        return {
            "encoder_hidden_states": caption_states[rows],
            "added_cond_kwargs": {"text_embeds": pooled[rows], "time_ids": time_ids},
        }

    return condition


def image_condition(image_encoder: CLIPVisionModelWithProjection, pixel_values: torch.Tensor):
    """The image-variations UNet's context for a batch: each image's CLIP image embedding (`image_embeds`) as one
    token, or zeros (what diffusers' `StableDiffusionImageVariationPipeline` feeds as the unconditional input)."""

    def condition(index: torch.Tensor, dropout: float, generator: torch.Generator) -> dict:
        dropped = torch.rand(len(index), generator=generator) < dropout
        with torch.set_grad_enabled(image_encoder.training):
            embeds = image_encoder(pixel_values[index]).image_embeds
        return {"encoder_hidden_states": torch.where(dropped[:, None], torch.zeros_like(embeds), embeds)[:, None, :]}

    return condition


def train_unet(
    unet: UNet2DConditionModel,
    latents: torch.Tensor,
    condition,
    steps: int,
    batch_size: int,
    learning_rate: float,
    dropout: float,
    params: PretrainParams,
    generator: torch.Generator,
    phase: str = "unet",
    trained_with: torch.nn.Module | None = None,
) -> UNet2DConditionModel:
    """Trains `unet` on cached latents and the conditioning `condition` draws for them (its keyword arguments; and
    `trained_with`, a module the contexts come through, beside it); leaves the EMA weights in both."""
    scheduler = models.train_scheduler()
    parameters = list(unet.parameters()) + (list(trained_with.parameters()) if trained_with is not None else [])
    ema = EMAModel(parameters, decay=params.unet_ema_decay, use_ema_warmup=True)
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=1e-2)
    schedule = get_cosine_schedule_with_warmup(optimizer, params.warmup_steps, steps)
    unet.train()
    if trained_with is not None:
        trained_with.train()
    for step in range(steps):
        index = torch.randint(len(latents), (batch_size,), generator=generator)
        conditioning = condition(index, dropout, generator)
        clean = latents[index]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        prediction = unet(noisy, timesteps, **conditioning).sample
        loss = diffusion_loss(prediction, noise, timesteps, scheduler, params.snr_gamma)
        _step(loss, optimizer, schedule, parameters)
        ema.step(parameters)
        _log_step(phase, step, steps, loss)
    ema.copy_to(parameters)
    unet.eval()
    if trained_with is not None:
        trained_with.eval()
    return unet


def diffusion_loss(prediction, target, timesteps, scheduler, snr_gamma: float | None) -> torch.Tensor:
    """Epsilon-prediction MSE, optionally min-SNR-gamma weighted (Hang et al. 2023)."""
    if snr_gamma is None:
        return F.mse_loss(prediction, target)
    snr = compute_snr(scheduler, timesteps)
    weights = torch.clamp(snr, max=snr_gamma) / snr
    per_sample = F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weights).mean()


def pretrain(
    params: PretrainParams, seed: int, out_dir: Path, variations_dir: Path, work_dir: Path, metrics_path: Path
) -> dict:
    """Runs all four phases and writes the text-to-image pipeline folder to `out_dir` and the image-variations
    pipeline folder to `variations_dir`, atomically."""
    torch.manual_seed(seed)
    timings: dict[str, float] = {}
    start = time.monotonic()
    pixels, scenes, captions = make_training_set(params, seed)
    log(f"pretrain: {len(scenes)} training images rendered")
    clip_captions = clip_training_captions(params, seed, captions)

    tokenizer_dir = work_dir / "tokenizer"
    tokenizer = build_clip_tokenizer(tokenizer_dir)

    doodles = make_doodles(params.vae_doodles, seed + 3)
    vae_pixels = torch.cat([pixels, doodles])
    vae = _cached_phase(
        work_dir, "vae", _phase_key(params, seed, "vae"), AutoencoderKL,
        lambda: train_vae(vae_pixels, params, torch.Generator().manual_seed(seed)), timings,
    )
    clip = _cached_phase(
        work_dir, "clip", _phase_key(params, seed, "clip"), CLIPModel,
        lambda: train_clip(pixels, clip_captions, tokenizer, params, torch.Generator().manual_seed(seed + 1)), timings,
    )
    text_encoder = CLIPTextModel(clip.config.text_config)
    # transformers 5 made CLIPTextModel the text transformer itself; 4.x wraps it in `.text_model`
    getattr(text_encoder, "text_model", text_encoder).load_state_dict(clip.text_model.state_dict())
    text_encoder.eval()

    latents, scaling_factor = encode_latents(vae, pixels)
    vae.register_to_config(scaling_factor=scaling_factor)
    unique_captions = sorted({text for variants in captions for text in variants})
    caption_index = {text: i for i, text in enumerate(unique_captions)}
    caption_ids = torch.tensor([[caption_index[text] for text in variants] for variants in captions])
    caption_states = encode_text(text_encoder, tokenizer, unique_captions + [""])

    unet = _cached_phase(
        work_dir, "unet", _phase_key(params, seed, "unet"), UNet2DConditionModel,
        lambda: train_unet(
            UNet2DConditionModel(**models.unet_config()), latents, text_condition(caption_ids, caption_states),
            params.unet_steps, params.unet_batch_size, params.unet_lr, params.caption_dropout, params,
            torch.Generator().manual_seed(seed + 2),
        ),
        timings,
    )

    image_encoder = CLIPVisionModelWithProjection(clip.config.vision_config)
    image_encoder.vision_model.load_state_dict(clip.vision_model.state_dict())
    image_encoder.visual_projection.load_state_dict(clip.visual_projection.state_dict())
    image_encoder.eval()

    # 4. The image-variations model: the text UNet fine-tuned to take an image's CLIP embedding as its context.
    variation_latents, variation_pixels = variations_training_set(vae, latents, scaling_factor, pixels, doodles, params)
    variations = _cached_phase(
        work_dir, "variations", _phase_key(params, seed, "variations"), StableDiffusionImageVariationPipeline,
        lambda: train_variations(
            unet, image_encoder, vae, variation_latents, variation_pixels, params, torch.Generator().manual_seed(seed + 4)
        ),
        timings,
    )

    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=models.sample_scheduler(),
        safety_checker=None,
        feature_extractor=models.feature_extractor(),
        requires_safety_checker=False,
    )
    with atomic_path(out_dir) as tmp, atomic_path(variations_dir) as variations_tmp:
        save_pipeline(pipeline, tmp)
        clip.save_pretrained(tmp / "clip")
        models.feature_extractor().save_pretrained(tmp / "clip")  # a CLIP folder as the Hub's: model and processor
        variations.save_pretrained(variations_tmp)

    metrics = {
        "seed": seed,
        "num_images": params.num_images,
        "latent_scaling_factor": scaling_factor,
        "vae_reconstruction_mae": reconstruction_error(vae, pixels[:512]),
        "clip_retrieval_accuracy": clip_retrieval_accuracy(clip, tokenizer, pixels, scenes),
        "variations_accuracy": variations_accuracy(variations, seed),
        "seconds": {**timings, "this_run": round(time.monotonic() - start, 1)},
    }
    write_json(metrics_path, metrics)
    log(f"pretrain: done in {metrics['seconds']['this_run']:.0f}s: {json.dumps(metrics)}")
    return metrics


def train_variations(
    text_unet: UNet2DConditionModel,
    image_encoder: CLIPVisionModelWithProjection,
    vae: AutoencoderKL,
    latents: torch.Tensor,
    pixels: torch.Tensor,
    params: PretrainParams,
    generator: torch.Generator,
) -> StableDiffusionImageVariationPipeline:
    """Phase 4: a copy of the text UNet trained on the images' CLIP image embeddings, with a copy of CLIP's vision
    tower trained beside it (`variations_train_encoder`): then the embedding comes to hold what the UNet needs to
    redraw any picture (its shape), not only what the world's captions named. Returns the image-variations pipeline."""
    unet = UNet2DConditionModel.from_config(text_unet.config)
    unet.load_state_dict(text_unet.state_dict())
    encoder = CLIPVisionModelWithProjection(image_encoder.config)
    encoder.load_state_dict(image_encoder.state_dict())
    encoder.requires_grad_(params.variations_train_encoder).eval()
    train_unet(
        unet, latents, image_condition(encoder, clip_pixel_values(pixels)), params.variations_steps,
        params.variations_batch_size, params.variations_lr, params.variations_embedding_dropout, params, generator,
        phase="variations", trained_with=encoder if params.variations_train_encoder else None,
    )
    return models.variations_pipeline(vae, encoder, unet)


@torch.no_grad()
def variations_accuracy(variations, seed: int) -> dict[str, float]:
    """The oracle's color / shape / joint accuracy on variations of fresh world images (does the image-variations
    model draw what the embedding describes?)."""
    rng = np.random.default_rng(seed + 5)
    scenes = [world.sample_scene(rng) for _ in range(VARIATIONS_PROBE_IMAGES)]
    images = [world.render(scene) for scene in scenes]
    variations.set_progress_bar_config(disable=True)
    size = world.RESOLUTION
    drawn = variations(
        images, height=size, width=size, num_inference_steps=25, guidance_scale=3.0,
        generator=torch.Generator().manual_seed(seed),
    ).images
    expected = [{"color": s.color, "shape": s.shape} for s in scenes]
    return {k: round(v, 3) for k, v in oracle.score(drawn, expected).items()}


@torch.no_grad()
def posterior_means(vae: AutoencoderKL, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([vae.encode(pixels[i : i + batch_size]).latent_dist.mean for i in range(0, len(pixels), batch_size)])


def encode_latents(vae: AutoencoderKL, pixels: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Posterior means of every image, scaled to unit variance like SD's 0.18215; returns the scale too."""
    means = posterior_means(vae, pixels)
    scaling_factor = float(1.0 / means.std())
    return means * scaling_factor, scaling_factor


@torch.no_grad()
def encode_text(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, texts: list[str]) -> torch.Tensor:
    """Last hidden states, exactly as StableDiffusionPipeline computes its prompt embeddings."""
    return text_encoder(tokenize(tokenizer, texts))[0]


def tokenize(tokenizer: CLIPTokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def clip_pixel_values(pixels: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images to CLIP's normalized inputs (what CLIPImageProcessor gives at the native size)."""
    processor = models.feature_extractor()
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    return ((pixels + 1) / 2 - mean) / std


@torch.no_grad()
def reconstruction_error(vae: AutoencoderKL, pixels: torch.Tensor) -> float:
    """Mean absolute pixel error of a VAE round trip, in 0-255 units."""
    decoded = vae.decode(vae.encode(pixels).latent_dist.mean).sample.clamp(-1, 1)
    return round(float((decoded - pixels).abs().mean() * 127.5), 3)


@torch.no_grad()
def clip_retrieval_accuracy(clip: CLIPModel, tokenizer: CLIPTokenizer, pixels: torch.Tensor, scenes) -> float:
    """Share of 512 images whose best-matching caption among all color x shape captions is the right one."""
    labels = [(color, shape) for color in world.COLORS for shape in world.PRETRAIN_SHAPES]
    texts = [f"a {color} {shape}" for color, shape in labels]
    output = clip(input_ids=tokenize(tokenizer, texts), pixel_values=clip_pixel_values(pixels[:512]))
    best = output.logits_per_image.argmax(dim=1).tolist()
    hits = [labels[b] == (s.color, s.shape) for b, s in zip(best, scenes[:512])]
    return round(sum(hits) / len(hits), 4)


def _step(loss: torch.Tensor, optimizer, schedule, parameters) -> None:
    if not torch.isfinite(loss):
        raise SdpipeError(f"pretrain: loss became {loss.item()}; lower the pretrain.*_lr learning rates")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)


def _log_step(phase: str, step: int, total: int, loss: torch.Tensor) -> None:
    if step % LOG_EVERY == 0 or step == total - 1:
        log(f"pretrain {phase}: step {step + 1}/{total} loss {loss.item():.4f}")


def _phase_key(params: PretrainParams, seed: int, phase: str) -> str:
    """Hash of everything that shapes a phase's result: later phases depend on earlier ones."""
    order = ["vae", "clip", "unet", "variations"]
    fields = {"num_images", "warmup_steps", "sparks", "crosses", "dark_share"}
    for name in order[: order.index(phase) + 1]:
        fields |= {f for f in PretrainParams.model_fields if f.startswith(name)}
    fields |= {"generic_share", "dark_named_share", "cross_named_share"} if phase != "vae" else set()
    fields |= {"snr_gamma", "caption_dropout"} if phase in ("unet", "variations") else set()
    payload = {"seed": seed, "world": WORLD_VERSION, **params.model_dump(include=fields)}
    if phase != "vae":  # the text side trains on token ids: a new tokenizer merge renumbers them
        payload["tokenizer"] = tokenizer_digest()
    payload = json.dumps(payload, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _cached_phase(work_dir: Path, phase: str, key: str, model_class, train, timings: dict):
    """Loads a phase's finished model from the work folder, or trains and saves it there.

    The phase's training time is kept beside it, so a resumed run still reports what each phase cost.
    """
    folder = work_dir / f"{phase}-{key}"
    if folder.is_dir():
        log(f"pretrain {phase}: reusing the finished phase in {folder}")
        timings[phase] = json.loads((folder / "seconds.json").read_text())
        model = model_class.from_pretrained(folder)
        return model.eval() if isinstance(model, torch.nn.Module) else model
    for stale in work_dir.glob(f"{phase}-*"):
        shutil.rmtree(stale)
    phase_start = time.monotonic()
    model = train()
    timings[phase] = round(time.monotonic() - phase_start, 1)
    with atomic_path(folder) as tmp:
        model.save_pretrained(tmp)
        (tmp / "seconds.json").write_text(json.dumps(timings[phase]))
    return model
