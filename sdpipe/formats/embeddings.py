"""Textual inversion embedding files: A1111's `.pt`, the A1111/kohya `.safetensors`, diffusers' learned_embeds.

- A1111 `.pt` (what A1111 writes and `torch.load(weights_only=True)` reads): a dict with `string_to_param`
  `{"*": [num_vectors, dim]}`, `string_to_token` `{"*": 265}`, `name`, `step`, `sd_checkpoint`,
  `sd_checkpoint_name`;
- A1111/kohya `.safetensors`: one tensor `emb_params` [num_vectors, dim] (sdpipe adds the metadata
  `placeholder_token` and `num_vectors`);
- diffusers `learned_embeds.safetensors` / `.bin`: one tensor named after the token, [dim] or [num_vectors, dim].

`read_embedding` reads any of them; `save_a1111_pt` and `save_safetensors_embedding` write the first two.

A1111 and ComfyUI take an embedding's prompt word from its file name (`sks.safetensors` is `sks` in an A1111
prompt, `embedding:sks` in ComfyUI), and load every file of their `embeddings/` folder, subfolders included: sdpipe
names its embedding files after the placeholder token (`file_stem`) and writes each embedding once, as
`.safetensors` (both tools read it), so that no two files of a model folder give the same word.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdpipe.errors import SdpipeError
from sdpipe.formats.pickled import load_pickled
from sdpipe.io import atomic_path, save_safetensors

A1111_TOKEN_ID = 265  # A1111 always writes CLIP's id of `*` here; loaders ignore it
SAFETENSORS_KEY = "emb_params"
A1111_FIELDS = ("step", "sd_checkpoint", "sd_checkpoint_name")
"""A1111 `.pt` fields kept (as text) in a `.safetensors` embedding's metadata, so that they survive a round trip."""


@dataclass
class Embedding:
    """The learned vectors of one textual inversion token and what the file says about them."""

    vectors: torch.Tensor
    """[num_vectors, dim]."""
    name: str
    """The token (A1111 uses the file name when the file has none)."""
    fields: dict[str, str] = field(default_factory=dict)
    """A1111's `step`, `sd_checkpoint`, `sd_checkpoint_name` where known, as text."""


def file_stem(token: str, key: str) -> str:
    """The file name, without suffix, of the embedding of `token`: the token without `<`, `>` and any other
    character but letters, digits and `._-`, and without leading dots (`<sks>` → `sks`), the word A1111 and
    ComfyUI users then type. `key` names the params key of the token, for the error when nothing is left."""
    stem = "".join(c for c in token if c.isalnum() or c in "._-").lstrip(".")
    if not stem:
        raise SdpipeError(f"{key} {token!r} has no letter or digit to name the embedding file with, e.g. <sks>")
    return stem


def read_embedding(path: str | Path) -> Embedding:
    """The embedding in a `.safetensors`, `.pt` or `.bin` file of one of the layouts above.

    Raises `SdpipeError` naming the file when it holds no single-token embedding (an SDXL embedding, with its
    two tensors `clip_l` and `clip_g`, is one of those).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                tensors = {key: f.get_tensor(key) for key in f.keys()}
                metadata = dict(f.metadata() or {})
        except SafetensorError as error:
            raise SdpipeError(f"{path}: not a valid .safetensors file ({error})") from None
        name = metadata.get("placeholder_token") or metadata.get("name") or path.stem
        fields = {key: metadata[key] for key in A1111_FIELDS if key in metadata}
        if SAFETENSORS_KEY in tensors and len(tensors) == 1:
            return Embedding(as_matrix(tensors[SAFETENSORS_KEY], path), name, fields)
        if len(tensors) == 1:  # diffusers: {token: vector(s)}
            ((token, vectors),) = tensors.items()
            return Embedding(as_matrix(vectors, path), token, fields)
        raise SdpipeError(
            f"{path}: not a single-token textual inversion embedding (expected one tensor {SAFETENSORS_KEY!r}, "
            f"found {', '.join(sorted(tensors)[:4])}); SDXL embeddings (clip_l + clip_g) are not converted"
        )
    content = load_pickled(path)
    if isinstance(content, dict) and isinstance(content.get("string_to_param"), dict):
        params = content["string_to_param"]
        vectors = params.get("*", next(iter(params.values()), None))
        name = content.get("name") if isinstance(content.get("name"), str) else path.stem
        fields = {key: str(content[key]) for key in A1111_FIELDS if content.get(key) is not None}
        return Embedding(as_matrix(vectors, path), name, fields)
    if isinstance(content, dict) and len(content) == 1:  # diffusers learned_embeds.bin
        ((token, vectors),) = content.items()
        if isinstance(token, str):
            return Embedding(as_matrix(vectors, path), token)
    raise SdpipeError(
        f"{path}: not a textual inversion embedding (expected A1111's `string_to_param` or one token tensor)"
    )


def as_matrix(vectors: object, path: Path) -> torch.Tensor:
    """[num_vectors, dim] from a [dim] or [num_vectors, dim] tensor."""
    if not torch.is_tensor(vectors) or vectors.dim() not in (1, 2) or vectors.numel() == 0:
        raise SdpipeError(f"{path}: the embedding must be a [num_vectors, dim] or [dim] tensor, got {vectors!r:.80}")
    return vectors.detach().reshape(-1, vectors.shape[-1]).contiguous()


def a1111_embedding(embedding: Embedding) -> dict:
    """The dict A1111 writes to an embedding `.pt` file."""
    fields = embedding.fields
    step = fields.get("step", "0")
    return {
        "string_to_token": {"*": A1111_TOKEN_ID},
        "string_to_param": {"*": embedding.vectors.clone()},
        "name": embedding.name,
        "step": int(step) if step.isdigit() else 0,
        "sd_checkpoint": fields.get("sd_checkpoint", ""),
        "sd_checkpoint_name": fields.get("sd_checkpoint_name", ""),
    }


def save_a1111_pt(embedding: Embedding, path: str | Path) -> None:
    """Writes `embedding` as an A1111 `.pt` file (readable with `torch.load(weights_only=True)`), atomically."""
    with atomic_path(path) as tmp:
        torch.save(a1111_embedding(embedding), tmp)


def save_safetensors_embedding(embedding: Embedding, path: str | Path) -> None:
    """Writes `embedding` as an A1111/kohya `.safetensors` file (`emb_params`), atomically."""
    metadata = {"placeholder_token": embedding.name, "num_vectors": str(len(embedding.vectors)), **embedding.fields}
    with atomic_path(path) as tmp:
        save_safetensors({SAFETENSORS_KEY: embedding.vectors.contiguous()}, tmp, metadata)


SDXL_EMBEDDING_KEYS = ("clip_l", "clip_g")
"""An SDXL embedding's tensors: the vectors of its first text encoder (CLIP ViT-L) and of its second (OpenCLIP bigG)."""


def save_embedding(embeddings: list[Embedding], path: str | Path) -> None:
    """Writes a trained token's embedding, one `Embedding` per text encoder of its model, atomically: SD 1.x/2.x's
    as `emb_params` (`save_safetensors_embedding`); SDXL's first text encoder's vectors as `clip_l`, the second's as
    `clip_g`, in one `.safetensors` (the layout A1111 and ComfyUI load for SDXL), with the first one's metadata."""
    if len(embeddings) == 1:
        save_safetensors_embedding(embeddings[0], path)
        return
    first = embeddings[0]
    metadata = {"placeholder_token": first.name, "num_vectors": str(len(first.vectors)), **first.fields}
    tensors = {key: embedding.vectors.contiguous() for key, embedding in zip(SDXL_EMBEDDING_KEYS, embeddings, strict=True)}
    with atomic_path(path) as tmp:
        save_safetensors(tensors, tmp, metadata)


def load_into_pipeline(pipeline, path: str | Path, token: str) -> None:
    """Loads an embedding file into `pipeline` as a diffusers user does: `load_textual_inversion(path, token=...)`,
    or for an SDXL embedding each tensor into its text encoder and tokenizer."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    if set(SDXL_EMBEDDING_KEYS) <= set(tensors):
        pipeline.load_textual_inversion(
            tensors["clip_l"], token=token, text_encoder=pipeline.text_encoder, tokenizer=pipeline.tokenizer
        )
        pipeline.load_textual_inversion(
            tensors["clip_g"], token=token, text_encoder=pipeline.text_encoder_2, tokenizer=pipeline.tokenizer_2
        )
    else:
        pipeline.load_textual_inversion(str(path), token=token)
