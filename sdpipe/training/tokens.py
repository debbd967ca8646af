"""Training new tokens: rows added to the text encoder's token-embedding matrix, and captions that name them.

Textual inversion and DreamArtist train placeholder tokens (`PlaceholderTokenTraining`); Custom Diffusion trains
modifier tokens beside its attention weights (`TokenRowsTraining`, `add_tokens`, `replace_trigger`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from sdpipe.config.train import TextualInversionParams
from sdpipe.errors import SdpipeError
from sdpipe.formats.a1111 import checkpoint_hash
from sdpipe.training.method import Models, TrainingMethod


@dataclass
class TokenRows:
    """The trained rows of one text encoder's token embeddings."""

    embeddings: torch.nn.Parameter
    """The whole matrix (a trained parameter: rows cannot be one)."""
    token_ids: list[int]
    """The rows that train."""
    original: torch.Tensor
    """The matrix before training, whose other rows are put back after each step."""
    frozen: torch.Tensor
    """True for every row but `token_ids`."""


class TokenRowsTraining:
    """For methods that train new rows of the text encoders' token embeddings: only those rows change. The whole
    matrix is a trained parameter, so after each optimizer step the other rows are put back (AdamW's weight decay
    would otherwise move them). `embeddings`, `token_ids` and `original_embeddings` are the first text encoder's; a
    family with two (SDXL) has rows in each (`token_rows`)."""

    def train_token_rows(self, text_encoder: torch.nn.Module, token_ids: list[int]) -> None:
        """Trains the rows `token_ids` of `text_encoder`'s token embeddings (called once per text encoder)."""
        embeddings = text_encoder.get_input_embeddings().weight
        embeddings.requires_grad_(True)
        frozen = torch.ones(len(embeddings), dtype=torch.bool)
        frozen[token_ids] = False
        rows = TokenRows(embeddings, token_ids, embeddings.detach().clone(), frozen)
        self.token_rows: list[TokenRows] = [*getattr(self, "token_rows", []), rows]

    @property
    def embeddings(self) -> torch.nn.Parameter:
        return self.token_rows[0].embeddings

    @property
    def token_ids(self) -> list[int]:
        return self.token_rows[0].token_ids

    @property
    def original_embeddings(self) -> torch.Tensor:
        return self.token_rows[0].original

    def after_optimizer_step(self, models: Models) -> None:
        with torch.no_grad():
            for rows in self.token_rows:
                if rows.original.device != rows.embeddings.device:
                    rows.original = rows.original.to(rows.embeddings.device)
                    rows.frozen = rows.frozen.to(rows.embeddings.device)
                rows.embeddings[rows.frozen] = rows.original[rows.frozen]


class PlaceholderTokenTraining(TokenRowsTraining, TrainingMethod):
    """Trains the rows of new placeholder tokens (`<sks>`, and `<sks>_1`, … for several vectors: diffusers'
    multi-vector convention), started from the initializer word; captions name them in place of the trigger word.
    Everything else stays as it was. A method adds its `name` and `save`."""

    trained_models = ("text_encoder",)

    def __init__(self, params: TextualInversionParams, base_model: str):
        super().__init__(params)
        self.base_model = base_model
        first = params.placeholder_token
        self.tokens = [first] + [f"{first}_{i}" for i in range(1, params.num_vectors)]
        self.placeholder_text = " ".join(self.tokens)

    def setup(self, models: Models) -> None:
        """Adds the placeholder tokens and their embedding rows, started from the initializer word, to every text
        encoder of the model's family (SDXL: both)."""
        self.trained_models = models.family.text_encoders
        for tokenizer, text_encoder in zip(models.tokenizers, models.text_encoders):
            token_ids = add_tokens(
                tokenizer,
                text_encoder,
                self.tokens,
                self.params.initializer_word,
                token_key=f"{self.params_key}.placeholder_token",
                word_key=f"{self.params_key}.initializer_word",
            )
            self.train_token_rows(text_encoder, token_ids)

    def embedding_fields(self, step: int) -> dict[str, str]:
        """What A1111 records of an embedding's training (`step`, `sd_checkpoint`, `sd_checkpoint_name`), as the
        metadata of the files the method writes (`sdpipe convert` carries it into an A1111 `.pt`)."""
        return {
            "step": str(step),
            "sd_checkpoint": checkpoint_hash(self.base_model),
            "sd_checkpoint_name": Path(self.base_model).stem,
        }

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [rows.embeddings for rows in self.token_rows]

    def caption(self, caption: str) -> str:
        """`a small sks shape` → `a small <sks> shape` (`<sks> <sks>_1` with 2 vectors); `a star` → `<sks> a star`."""
        if not caption.strip():
            return caption  # a dropped caption trains the unconditional prediction
        replaced, found = replace_trigger(
            caption, self.params.placeholder_token, self.params.replace_word, self.placeholder_text
        )
        return replaced if found else f"{self.placeholder_text} {caption}"

    def learned_vectors(self, encoder: int = 0) -> torch.Tensor:
        """The learned embeddings of text encoder `encoder`, [number of tokens, hidden], fp32 on the CPU."""
        rows = self.token_rows[encoder]
        return rows.embeddings.detach()[rows.token_ids].float().cpu().contiguous()


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
