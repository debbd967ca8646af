"""Textual inversion (Gal et al. 2022): learn the embedding of a new token that names a concept.

Nothing of the model changes but one new row (or several) of the text encoder's token-embedding matrix. Steps 1-3
are the training core's `PlaceholderTokenTraining` (`sdpipe.training.tokens`), which DreamArtist shares:

1. `setup` adds the placeholder token `<sks>` to the tokenizer (and `<sks>_1`, `<sks>_2`, … for several
   vectors, diffusers' multi-vector convention), grows the embedding matrix and starts the new rows from the
   embeddings of the initializer word.
2. `caption` rewrites each caption: the trigger word (`sks`) becomes the placeholder tokens, or they are
   prepended when the caption lacks it. Sample prompts go through the same rewrite.
3. The training core (`sdpipe.training`) runs the diffusion loss through the frozen UNet; gradients reach the
   embedding matrix only, and `after_optimizer_step` puts every row but the new ones back (AdamW's weight decay
   would otherwise move them).
4. `save` writes the learned rows as `<name>.safetensors`, `<name>` being the placeholder token without `<`, `>`
   (`<sks>` → `sks.safetensors`): the A1111/kohya layout, one key `emb_params`, [num_vectors, hidden], which
   A1111 and ComfyUI load from their `embeddings/` folder as the prompt word `<name>` (`sks`; ComfyUI:
   `embedding:sks`) and diffusers with `pipe.load_textual_inversion(path, token="<sks>")`. Only that one file:
   an A1111 `.pt` beside it would have the same name, and A1111 would load the word twice
   (`sdpipe convert sks.safetensors sks.pt` writes one for A1111 versions that predate safetensors).
   On an SDXL base the token is added to both text encoders, and the file holds `clip_l` and `clip_g`, each
   encoder's rows, as A1111 and ComfyUI load SDXL embeddings (diffusers: `load_textual_inversion` of each tensor with
   its `text_encoder` and `tokenizer`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdpipe.errors import SdpipeError
from sdpipe.formats.embeddings import (
    Embedding,
    file_stem,
    load_into_pipeline,
    save_embedding,
)
from sdpipe.models.loading import load_pipeline
from sdpipe.training import Models, run_training
from sdpipe.training.tokens import PlaceholderTokenTraining


def embedding_file(token: str, key: str = "train.textual_inversion.placeholder_token") -> str:
    """The name of the embedding file of `token`: `<sks>` → `sks.safetensors` (A1111 and ComfyUI take the prompt
    word from the file name). `key` names the params key of the token, for errors."""
    return f"{file_stem(token, key)}.safetensors"


def train(params, out_dir: Path) -> dict:
    """The `train@textual_inversion` stage: trains the embedding and writes `<out_dir>/model/<name>.safetensors`."""
    method = TextualInversion(params.train.textual_inversion, base_model=params.base.base_model)
    return run_training(params, method, out_dir)


def sampling_pipeline(params, model_dir: Path, device: torch.device):
    """The base pipeline with the trained embedding loaded as a user would (`load_textual_inversion`), and the
    word that names the concept in its prompts (the placeholder token)."""
    token = params.train.textual_inversion.placeholder_token
    path = Path(model_dir) / embedding_file(token)
    if not path.is_file():
        raise SdpipeError(f"{path}: no embedding of {token!r}; run `dvc repro train@textual_inversion` first")
    pipeline = load_pipeline(params.base.base_model, params.base.base_model_config, device=device)
    load_into_pipeline(pipeline, path, token)
    return pipeline, token


class TextualInversion(PlaceholderTokenTraining):
    """Trains the new rows of the text encoder's token embeddings (`sdpipe.training.tokens`); everything else stays
    as it was."""

    name = "textual_inversion"

    def save(self, models: Models, folder: Path, step: int) -> None:
        """`<name>.safetensors`: `emb_params` (SDXL: `clip_l` and `clip_g`) and, as metadata, the token, the vector count and A1111's `step`,
        `sd_checkpoint` and `sd_checkpoint_name` (which `sdpipe convert` carries into an A1111 `.pt`)."""
        token = self.params.placeholder_token
        fields = self.embedding_fields(step)
        embeddings = [Embedding(self.learned_vectors(encoder), token, fields) for encoder in range(len(self.token_rows))]
        save_embedding(embeddings, folder / embedding_file(token, f"{self.params_key}.placeholder_token"))

