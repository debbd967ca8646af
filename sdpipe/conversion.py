"""`sdpipe convert`: one model file format to another, for the formats `sdpipe inspect` recognizes.

| source (`sdpipe inspect`)                     | `--to` (default first)   | writes                                   |
| --------------------------------------------- | ------------------------ | ---------------------------------------- |
| kohya-lora                                    | peft                     | diffusers/PEFT LoRA `.safetensors`       |
| diffusers-lora                                | kohya                    | kohya LoRA `.safetensors`                |
| embedding-a1111-pt                            | safetensors, a1111-pt    | `emb_params` `.safetensors` / A1111 `.pt` |
| embedding-safetensors, embedding-diffusers    | a1111-pt, safetensors    | A1111 `.pt` / `emb_params` `.safetensors` |
| diffusers-pipeline                            | single-file              | original-layout `.safetensors`           |
| sd-checkpoint (`.safetensors`)                | diffusers                | diffusers folder (needs `--config`)      |
| any state dict in a `.pt`/`.ckpt`/`.bin`      | safetensors              | the same tensors as `.safetensors`       |

LoRAs of SDXL convert both ways too: kohya's SDXL names (`lora_unet_input_blocks_4_1_…`, `lora_te1_…`, `lora_te2_…`)
↔ diffusers' (`unet.down_blocks.1.attentions.0.…`, `text_encoder.…`, `text_encoder_2.…`). Which original block a
diffusers layer is in depends on the UNet's layout, so `--config` (the SDXL folder the LoRA was trained on) names it;
without it SDXL base 1.0's layout is used, right for LoRAs of SDXL 1.0 and its fine-tunes.

Pickled inputs are read with `torch.load(weights_only=True)` only. Every output is written atomically.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdpipe.errors import SdpipeError
from sdpipe.formats import diffusers_lora, embeddings, kohya
from sdpipe.formats.pickled import PICKLE_SUFFIXES, find_state_dict, load_pickled
from sdpipe.inspection import inspect_model
from sdpipe.io import atomic_path, save_safetensors

TARGETS = ("kohya", "peft", "a1111-pt", "safetensors", "single-file", "diffusers")
EMBEDDING_FORMATS = ("embedding-a1111-pt", "embedding-safetensors", "embedding-diffusers")
SUFFIXES = {
    "kohya": ".safetensors",
    "peft": ".safetensors",
    "safetensors": ".safetensors",
    "single-file": ".safetensors",
    "a1111-pt": ".pt",
    "diffusers": "",
}


def allowed_targets(source_format: str, pickled: bool, dst: Path) -> tuple[str, ...]:
    """The `--to` targets for a source format, the default first (for embeddings, the one `dst`'s suffix names)."""
    if source_format == "kohya-lora":
        targets = ("peft", "safetensors") if pickled else ("peft",)
    elif source_format == "diffusers-lora":
        targets = ("kohya", "safetensors") if pickled else ("kohya",)
    elif source_format in EMBEDDING_FORMATS:
        targets = ("a1111-pt", "safetensors") if dst.suffix == ".pt" else ("safetensors", "a1111-pt")
    elif source_format == "diffusers-pipeline":
        targets = ("single-file",)
    elif source_format == "sd-checkpoint":
        targets = ("safetensors",) if pickled else ("diffusers",)
    elif pickled and source_format != "hypernetwork-a1111":  # A1111 reads hypernetworks from .pt only
        targets = ("safetensors",)
    else:
        targets = ()
    return targets


def convert_model(
    src: str | Path,
    dst: str | Path,
    to: str | None = None,
    config: str | Path | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
) -> str:
    """Converts `src` into `dst` in the format `to` (default: the usual one for `src`'s format); returns a one-line
    summary. `config` is a diffusers folder: the architecture of a single file (`--to diffusers`, required) or
    exact layer names for kohya ↔ peft (an SDXL LoRA's original block names). `dtype` (fp32/fp16/bf16) casts a
    `--to single-file` checkpoint.

    Raises `SdpipeError` when the conversion is not possible; `dst` is then left as it was.
    """
    src, dst = Path(src), Path(dst)
    if to is not None and to not in TARGETS:
        raise SdpipeError(f"--to {to!r}: expected one of {', '.join(TARGETS)}")
    if dst.exists() and not overwrite:
        raise SdpipeError(f"{dst} exists; pass --overwrite to replace it")
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise SdpipeError(f"{dst}: the output must not be the input")
    source_format = inspect_model(src, hashes=False)["format"]
    pickled = src.suffix in PICKLE_SUFFIXES
    targets = allowed_targets(source_format, pickled, dst)
    if not targets:
        raise SdpipeError(f"{src} ({source_format}): sdpipe does not convert this format")
    target = to or targets[0]
    if target not in targets:
        raise SdpipeError(f"{src} ({source_format}) converts to {' or '.join(targets)}, not --to {target}")
    suffix = SUFFIXES[target]
    if suffix and dst.suffix != suffix:
        raise SdpipeError(f"{dst}: --to {target} writes a {suffix} file; name the output …{suffix}")
    if not suffix and dst.suffix:
        raise SdpipeError(f"{dst}: --to {target} writes a folder; name the output without a file suffix")
    if dtype is not None and target != "single-file":
        raise SdpipeError("--dtype applies to --to single-file only")
    if config is not None and target not in ("diffusers", "peft", "kohya"):
        raise SdpipeError("--config applies to --to diffusers (the architecture) and --to peft/kohya (layer names) only")

    if target == "safetensors" and source_format not in EMBEDDING_FORMATS:
        tensors = find_state_dict(load_pickled(src))
        if tensors is None:
            raise SdpipeError(f"{src}: holds no state dict (a dict of named tensors) to write as .safetensors")
        write_safetensors(tensors, {}, dst)
        return f"{src} → {dst}: {len(tensors)} tensors as .safetensors"
    if source_format in EMBEDDING_FORMATS:
        embedding = embeddings.read_embedding(src)
        if target == "a1111-pt":
            embeddings.save_a1111_pt(embedding, dst)
        else:
            embeddings.save_safetensors_embedding(embedding, dst)
        vectors, dim = embedding.vectors.shape
        return f"{src} → {dst}: embedding {embedding.name!r}, {vectors} vector(s) × {dim}, as {target}"
    if target == "peft":
        tensors, metadata = read_state_dict(src)
        module_paths = diffusers_lora.model_module_paths(config) if config is not None else None
        tensors, metadata = diffusers_lora.kohya_to_diffusers(tensors, metadata, module_paths)
        write_safetensors(tensors, metadata, dst)
        return f"{src} → {dst}: {len(tensors) // 2} LoRA layers in the diffusers/PEFT layout"
    if target == "kohya":
        tensors, metadata = read_state_dict(src)
        tensors, metadata = diffusers_lora.diffusers_to_kohya(tensors, metadata, config)
        kohya.save_kohya_lora(tensors, dst, metadata)
        return f"{src} → {dst}: {len(tensors) // 3} LoRA layers in the kohya layout"
    if target == "single-file":
        from sdpipe.models.single_file import save_single_file

        save_single_file(src, dst, dtype=dtype)
        return f"{src} → {dst}: original-layout single file{f' ({dtype})' if dtype else ''}"
    return single_file_to_diffusers(src, dst, config)


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a `.safetensors` file, or the tensors of a pickled state dict."""
    if path.suffix == ".safetensors":
        return kohya.load_kohya_lora(path)
    return find_state_dict(load_pickled(path)) or {}, {}


def write_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    """Writes `tensors` atomically, one at a time; tensors that share memory (tied weights in a pickle) and
    non-contiguous views are each written as their own copy (`save_safetensors`)."""
    with atomic_path(path) as tmp:
        save_safetensors(tensors, tmp, metadata or None)


def single_file_to_diffusers(src: Path, dst: Path, config: str | Path | None) -> str:
    """An original-layout single file as a diffusers folder, its architecture from `config` (a diffusers folder)."""
    from sdpipe.models.saving import save_pipeline
    from sdpipe.models.single_file import load_single_file_pipeline, stored_dtype

    if config is None:
        raise SdpipeError(
            f"{src}: a single file does not say its architecture (SD 1.5 and a fine-tune of another size have the "
            "same keys); pass --config <a local diffusers folder of the same architecture>, e.g. the base model folder"
        )
    # in the file's own dtype: diffusers would load an fp16 file as fp32, twice the memory and an fp32 folder
    pipeline = load_single_file_pipeline(src, config, torch_dtype=stored_dtype([src]) or torch.float32)
    with atomic_path(dst) as tmp:
        save_pipeline(pipeline, tmp)
    return f"{src} → {dst}: diffusers folder (architecture from {config})"

