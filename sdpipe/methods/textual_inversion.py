"""Textual inversion (Gal et al. 2022): learn the embedding of a new token that names a concept.

Nothing of the model changes but one new row (or several) of the text encoder's token-embedding matrix:

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
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from sdpipe.config.train import TextualInversionParams
from sdpipe.errors import SdpipeError
from sdpipe.formats.embeddings import Embedding, file_stem, save_safetensors_embedding
from sdpipe.models.loading import load_pipeline, model_fingerprint
from sdpipe.training import Models, TrainingMethod, run_training


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
    pipeline.load_textual_inversion(str(path), token=token)
    return pipeline, token


class TokenRowsTraining:
    """For methods that train new rows of the text encoder's token embeddings: only those rows change. The whole
    matrix is a trained parameter (rows cannot be one), so after each optimizer step the other rows are put back
    (AdamW's weight decay would otherwise move them)."""

    def train_token_rows(self, text_encoder: torch.nn.Module, token_ids: list[int]) -> None:
        self.token_ids = token_ids
        self.embeddings = text_encoder.get_input_embeddings().weight
        self.embeddings.requires_grad_(True)
        self.original_embeddings = self.embeddings.detach().clone()
        self.frozen_rows = torch.ones(len(self.embeddings), dtype=torch.bool)
        self.frozen_rows[token_ids] = False

    def after_optimizer_step(self, models: Models) -> None:
        if self.original_embeddings.device != self.embeddings.device:
            self.original_embeddings = self.original_embeddings.to(self.embeddings.device)
            self.frozen_rows = self.frozen_rows.to(self.embeddings.device)
        with torch.no_grad():
            self.embeddings[self.frozen_rows] = self.original_embeddings[self.frozen_rows]


class TextualInversion(TokenRowsTraining, TrainingMethod):
    """Trains the new rows of the text encoder's token embeddings; everything else stays as it was."""

    name = "textual_inversion"
    trained_models = ("text_encoder",)

    def __init__(self, params: TextualInversionParams, base_model: str):
        super().__init__(params)
        self.base_model = base_model
        first = params.placeholder_token
        self.tokens = [first] + [f"{first}_{i}" for i in range(1, params.num_vectors)]
        self.placeholder_text = " ".join(self.tokens)

    def setup(self, models: Models) -> None:
        """Adds the placeholder tokens and their embedding rows, started from the initializer word."""
        token_ids = add_tokens(
            models.tokenizer,
            models.text_encoder,
            self.tokens,
            self.params.initializer_word,
            token_key=f"{self.params_key}.placeholder_token",
            word_key=f"{self.params_key}.initializer_word",
        )
        self.train_token_rows(models.text_encoder, token_ids)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [self.embeddings]

    def caption(self, caption: str) -> str:
        """`a small sks shape` → `a small <sks> shape` (`<sks> <sks>_1` with 2 vectors); `a star` → `<sks> a star`."""
        if not caption.strip():
            return caption  # a dropped caption trains the unconditional prediction
        replaced, found = replace_trigger(
            caption, self.params.placeholder_token, self.params.replace_word, self.placeholder_text
        )
        return replaced if found else f"{self.placeholder_text} {caption}"

    def learned_vectors(self) -> torch.Tensor:
        """The learned embeddings, [num_vectors, hidden], fp32 on the CPU."""
        return self.embeddings.detach()[self.token_ids].float().cpu().contiguous()

    def save(self, models: Models, folder: Path, step: int) -> None:
        """`<name>.safetensors`: `emb_params` and, as metadata, the token, the vector count and A1111's `step`,
        `sd_checkpoint` and `sd_checkpoint_name` (which `sdpipe convert` carries into an A1111 `.pt`)."""
        token = self.params.placeholder_token
        fields = {
            "step": str(step),
            "sd_checkpoint": checkpoint_hash(self.base_model),
            "sd_checkpoint_name": Path(self.base_model).stem,
        }
        embedding = Embedding(self.learned_vectors(), token, fields)
        save_safetensors_embedding(embedding, folder / embedding_file(token, f"{self.params_key}.placeholder_token"))


def add_tokens(
    tokenizer, text_encoder, tokens: list[str], initializer_word: str, token_key: str, word_key: str
) -> list[int]:
    """Adds `tokens` to the tokenizer and a row for each to the text encoder's token embeddings, started from the
    embeddings of `initializer_word`; returns their ids. `token_key` and `word_key` name the params that chose the
    tokens and the word, for the errors."""
    taken = [token for token in tokens if token in tokenizer.get_vocab()]
    if taken:
        raise SdpipeError(
            f"{token_key}: the tokenizer of base.base_model already has the token {taken[0]!r}; choose a token it "
            "does not know, e.g. <my-concept>"
        )
    init_ids = tokenizer(initializer_word, add_special_tokens=False).input_ids
    if not init_ids:
        raise SdpipeError(f"{word_key} {initializer_word!r} gives no tokens; use a word")
    tokenizer.add_tokens(tokens)
    token_ids = tokenizer.convert_tokens_to_ids(tokens)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    embeddings = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for vector, token_id in enumerate(token_ids):
            # Several initializer tokens are spread over the vectors, as A1111 does.
            embeddings[token_id] = embeddings[init_ids[vector * len(init_ids) // len(token_ids)]]
    return token_ids


def replace_trigger(caption: str, token: str, trigger_word: str | None, replacement: str) -> tuple[str, bool]:
    """`caption` with the token (`<sks>`), or else the trigger word (`sks`: a whole word, in any case), replaced by
    `replacement`, and whether either was there."""
    escaped = re.escape(token)
    if re.search(rf"{escaped}(?![\w-])", caption):
        return re.sub(rf"{escaped}(?![\w-])", replacement, caption), True
    if trigger_word:
        whole_word = rf"(?<![\w<]){re.escape(trigger_word)}(?![\w>])"
        replaced, count = re.subn(whole_word, replacement, caption, flags=re.IGNORECASE)
        if count:
            return replaced, True
    return caption, False


def checkpoint_hash(base_model: str) -> str:
    """A short hash of the base model's files, for A1111's `sd_checkpoint` field (informative only)."""
    try:
        return model_fingerprint(base_model)[:10]
    except SdpipeError:
        return ""
