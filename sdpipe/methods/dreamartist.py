"""DreamArtist (Dong et al. 2022): a positive and a negative embedding, trained together with guidance in the loss.

Textual inversion (the training core's `PlaceholderTokenTraining`, `sdpipe.training.tokens`) with a second,
negative token, as A1111's DreamArtist extension trains it:

1. `setup` adds the positive tokens `<sks>` (`<sks>_1`, … for several vectors) and the negative ones `<sks>-neg`
   (`<sks>-neg_1`, …); the negative rows start from their initializer word plus a little noise, so that the two
   embeddings start apart.
2. Captions are rewritten as in textual inversion (`sks` → `<sks>`); the negative caption is the same caption with
   the negative tokens in place of the positive ones.
3. The UNet predicts the noise for both, and the loss compares the guided prediction
   eps_neg + cfg_scale × (eps_pos − eps_neg) with the noise (min-SNR weighting and the rest from the training core):
   the positive embedding learns what the concept is, the negative one what to steer away from.
4. With `reconstruction_loss_weight` (the reference's "reconstruction"), the clean latents that the guided
   prediction implies are decoded by the VAE and compared (L1) with the decoding of the image's latents.
5. `save` writes `<name>.safetensors` and `<name>-neg.safetensors` (A1111/kohya: one key `emb_params`,
   [num_vectors, hidden]; SDXL: `clip_l` and `clip_g`, both text encoders' rows, as textual inversion writes them);
   `<name>` is the placeholder token without `<`, `>` (`sks`). A1111 and ComfyUI take the
   prompt word from the file name: `sks` in the prompt and `sks-neg` in the negative prompt (ComfyUI:
   `embedding:sks`, `embedding:sks-neg`); diffusers: `<sks>` and `<sks>-neg` after `load_textual_inversion`. Use
   them at a guidance scale near `cfg_scale`. Each embedding is one file (no A1111 `.pt` beside it, which would
   give A1111 the same word twice; `sdpipe convert` writes one where needed).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from sdpipe.config.train import DreamArtistParams
from sdpipe.encode import decode_latents
from sdpipe.errors import SdpipeError
from sdpipe.families import SDXL, Conditioning, pipeline_family
from sdpipe.formats.embeddings import (
    Embedding,
    file_stem,
    load_into_pipeline,
    save_embedding,
)
from sdpipe.models.loading import load_pipeline, load_vae
from sdpipe.training import Models, run_training
from sdpipe.training.diffusion import predicted_latents
from sdpipe.training.method import PredictedBatch
from sdpipe.training.rng import torch_generator
from sdpipe.training.tokens import PlaceholderTokenTraining, TokenRows

NEGATIVE_SUFFIX = "-neg"
NEGATIVE_INIT_NOISE = 1e-3  # the reference's: the negative vectors start at the initializer word plus this much noise


def train(params, out_dir: Path) -> dict:
    """The `train@dreamartist` stage: trains both embeddings and writes `<out_dir>/model/<name>[-neg].*`."""
    method = DreamArtist(
        params.train.dreamartist, params.base.base_model, seed=params.base.seed,
        base_model_config=params.base.base_model_config,
    )
    return run_training(params, method, out_dir)


def sampling_pipeline(params, model_dir: Path, device: torch.device):
    """The base pipeline with both embeddings loaded as a user would (`load_textual_inversion`), whose negative prompt
    defaults to the negative embedding (see `DreamArtistPipeline`), and the word that names the concept."""
    settings = params.train.dreamartist
    token, negative = settings.placeholder_token, negative_token(settings.placeholder_token)
    stem = file_stem(token, "train.dreamartist.placeholder_token")
    base = load_pipeline(params.base.base_model, params.base.base_model_config, device=device)
    pipeline_class = DreamArtistXLPipeline if pipeline_family(base) is SDXL else DreamArtistPipeline
    pipeline = pipeline_class.from_pipe(base)
    load_into_pipeline(pipeline, model_dir / f"{stem}.safetensors", token)
    load_into_pipeline(pipeline, model_dir / f"{stem}{NEGATIVE_SUFFIX}.safetensors", negative)
    pipeline.positive_token, pipeline.negative_token = token, negative
    return pipeline, token


def negative_token(token: str) -> str:
    """The negative embedding's token: `<sks>` → `<sks>-neg`."""
    return token + NEGATIVE_SUFFIX


def replace_token(text: str, token: str, replacement: str) -> str:
    """`text` with every whole `token` (not `<sks>` inside `<sks>-neg` or `<sks>_1`) replaced by `replacement`."""
    return re.sub(rf"{re.escape(token)}(?![\w-])", lambda _: replacement, text)


class DreamArtistPrompts:
    """A pipeline that, when called without a negative prompt, uses for each prompt naming `positive_token` that
    prompt with `negative_token` in its place (what the embeddings were trained with, and what the reference samples
    its previews with); prompts without the token keep the empty negative prompt."""

    positive_token = "<sks>"
    negative_token = "<sks>-neg"

    def __call__(self, prompt=None, *args, negative_prompt=None, **kwargs):
        if negative_prompt is None and kwargs.get("negative_prompt_embeds") is None and prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            negative_prompt = [self.negative_prompt(text) for text in prompts]
        return super().__call__(prompt, *args, negative_prompt=negative_prompt, **kwargs)

    def negative_prompt(self, prompt: str) -> str:
        """The negative prompt of `prompt`: `a red <sks> shape` → `a red <sks>-neg shape`; `a red circle` → ``."""
        negative = replace_token(prompt, self.positive_token, self.negative_token)
        return negative if negative != prompt else ""


class DreamArtistPipeline(DreamArtistPrompts, StableDiffusionPipeline):
    """DreamArtist's negative prompts on a `StableDiffusionPipeline`."""


class DreamArtistXLPipeline(DreamArtistPrompts, StableDiffusionXLPipeline):
    """DreamArtist's negative prompts on a `StableDiffusionXLPipeline`."""


class DreamArtist(PlaceholderTokenTraining):
    """Trains a positive and a negative embedding (new rows of the token-embedding matrix); the models stay frozen."""

    name = "dreamartist"

    def __init__(self, params: DreamArtistParams, base_model: str, seed: int = 0, base_model_config: str | None = None):
        super().__init__(params, base_model)  # the positive tokens and their caption rewriting
        self.seed = seed
        self.file_stem = file_stem(params.placeholder_token, f"{self.params_key}.placeholder_token")
        self.positive_tokens = self.tokens
        negative = negative_token(params.placeholder_token)
        self.negative_tokens = [negative] + [f"{negative}_{i}" for i in range(1, params.negative_num_vectors)]
        self.negative_text = " ".join(self.negative_tokens)
        self.tokens = self.positive_tokens + self.negative_tokens  # what `PlaceholderTokenTraining.setup` adds
        self.negative_rows_before_step: list[torch.Tensor] | None = None  # per text encoder
        self.base_model_config = base_model_config
        self.vae = None  # loaded by `setup` when the reconstruction loss is on

    def setup(self, models: Models) -> None:
        """Adds both embeddings to every text encoder of the family: the positive one from `initializer_word`, the
        negative one from `negative_initializer_word` plus noise."""
        super().setup(models)
        negative_word = self.params.negative_initializer_word or self.params.initializer_word
        generator = torch_generator(self.seed, "dreamartist negative embedding")
        with torch.no_grad():
            for tokenizer, rows in zip(models.tokenizers, self.token_rows):
                positive_ids, negative_ids = self.positive_ids(rows), self.negative_ids(rows)
                self.initialize(tokenizer, rows, positive_ids, self.params.initializer_word, "initializer_word")
                self.initialize(tokenizer, rows, negative_ids, negative_word, "negative_initializer_word")
                noise = torch.randn(len(negative_ids), rows.embeddings.shape[1], generator=generator)
                rows.embeddings[negative_ids] += NEGATIVE_INIT_NOISE * noise.to(rows.embeddings.dtype)
        if self.params.reconstruction_loss_weight > 0:
            self.vae = load_vae(self.base_model, self.base_model_config, device=models.device).requires_grad_(False).eval()

    def positive_ids(self, rows: TokenRows) -> list[int]:
        return rows.token_ids[: len(self.positive_tokens)]

    def negative_ids(self, rows: TokenRows) -> list[int]:
        return rows.token_ids[len(self.positive_tokens) :]

    def initialize(self, tokenizer, rows: TokenRows, token_ids: list[int], word: str, key: str) -> None:
        """Starts the rows `token_ids` from the embeddings of `word`'s tokens, spread over them as A1111 does."""
        init_ids = tokenizer(word, add_special_tokens=False).input_ids
        if not init_ids:
            raise SdpipeError(f"{self.params_key}.{key} {word!r} gives no tokens; use a word")
        for vector, token_id in enumerate(token_ids):
            rows.embeddings[token_id] = rows.original[init_ids[vector * len(init_ids) // len(token_ids)]]

    def negative_caption(self, caption: str) -> str:
        """The caption with the negative tokens in place of the positive ones (the reference's `uc`)."""
        return replace_token(caption, self.placeholder_text, self.negative_text)

    def encode_text(self, models: Models, captions: list[str]) -> Conditioning:
        """The positive and the negative captions' conditioning side by side (contexts [batch, 2 × tokens, hidden],
        so that a batch of them stays one row per caption)."""
        if torch.is_grad_enabled():  # a training step follows: remember the negative rows (`after_optimizer_step`)
            self.negative_rows_before_step = [
                rows.embeddings.detach()[self.negative_ids(rows)].clone() for rows in self.token_rows
            ]
        negatives = [self.negative_caption(caption) for caption in captions]
        both = super().encode_text(models, captions + negatives)
        positive, negative = both.rows(slice(0, len(captions))), both.rows(slice(len(captions), None))
        pooled = None if both.pooled is None else torch.cat([positive.pooled, negative.pooled], dim=1)
        return Conditioning(torch.cat([positive.context, negative.context], dim=1), pooled)

    def predict(
        self,
        models: Models,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: Conditioning,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The guided prediction eps_neg + cfg_scale × (eps_pos − eps_neg), both from one UNet call."""
        contexts = conditioning.context.chunk(2, dim=1)
        pooled = (None, None) if conditioning.pooled is None else conditioning.pooled.chunk(2, dim=1)
        positive, negative = (Conditioning(context, rows) for context, rows in zip(contexts, pooled))
        both = models.family.predict(
            models.unet,
            torch.cat([noisy_latents, noisy_latents]),
            torch.cat([timesteps, timesteps]),
            Conditioning.cat([positive, negative]),
            None if time_ids is None else torch.cat([time_ids, time_ids]),
        )
        positive_prediction, negative_prediction = both.chunk(2)
        return negative_prediction + self.params.cfg_scale * (positive_prediction - negative_prediction)

    def extra_loss(self, models: Models, batch: PredictedBatch) -> torch.Tensor | None:
        """The reconstruction loss: weight × L1 between the decodings of the predicted and the real clean latents."""
        if self.vae is None:
            return None
        predicted = predicted_latents(models.noise_scheduler, batch.noisy_latents, batch.prediction, batch.timesteps)
        with torch.no_grad():
            image = decode_latents(self.vae, batch.latents)
        reconstruction = decode_latents(self.vae, predicted)
        return self.params.reconstruction_loss_weight * torch.nn.functional.l1_loss(reconstruction, image)

    def after_optimizer_step(self, models: Models) -> None:
        super().after_optimizer_step(models)  # every other row back to its original value
        rate = self.params.negative_learning_rate
        if rate is None or rate == self.params.learning_rate or self.negative_rows_before_step is None:
            return
        # AdamW's update is proportional to the learning rate (its moments do not depend on it), so scaling the
        # negative rows' update is exactly training them at their own rate, in the one embedding matrix.
        with torch.no_grad():
            for rows, before in zip(self.token_rows, self.negative_rows_before_step):
                negative_ids, before = self.negative_ids(rows), before.to(rows.embeddings.device)
                update = rows.embeddings[negative_ids] - before
                rows.embeddings[negative_ids] = before + (rate / self.params.learning_rate) * update

    def save(self, models: Models, folder: Path, step: int) -> None:
        """`<name>.safetensors` and `<name>-neg.safetensors`, each with textual inversion's keys and metadata."""
        vectors = [self.learned_vectors(encoder) for encoder in range(len(self.token_rows))]  # one per text encoder
        fields = self.embedding_fields(step)
        positive = slice(0, len(self.positive_tokens))
        negative = slice(len(self.positive_tokens), None)
        files = (
            (self.file_stem, self.positive_tokens[0], positive),
            (self.file_stem + NEGATIVE_SUFFIX, self.negative_tokens[0], negative),
        )
        for stem, token, rows in files:
            embeddings = [Embedding(encoder_vectors[rows].contiguous(), token, fields) for encoder_vectors in vectors]
            save_embedding(embeddings, folder / f"{stem}.safetensors")
