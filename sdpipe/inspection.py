"""`sdpipe inspect`: what a model file or folder is, read from its keys and shapes, plus A1111-style hashes.

Formats told apart (`FORMATS`):

- `sd-checkpoint`: an original-layout Stable Diffusion single file (`model.diffusion_model.*`); SD 1.x has a
  CLIP text encoder under `cond_stage_model.transformer.`, SD 2.x an OpenCLIP one under `cond_stage_model.model.`,
  SDXL `conditioner.embedders.`; the UNet's context dim is the input width of its cross-attention `attn2.to_k`;
- `diffusers-pipeline`: a diffusers folder (`model_index.json`);
- `kohya-lora`: kohya/A1111/LyCORIS keys `lora_unet_…` / `lora_te_…`, the algorithm named by the parts
  (`sdpipe.formats.kohya`): LoRA, LoCon (LoRA on ResNet/sampler convolutions), LoHa, LoKr, DoRA;
- `diffusers-lora`: `unet.` / `text_encoder.` keys with `lora_A`/`lora_B` (peft) or `lora.down`/`lora.up`;
- `embedding-a1111-pt`, `embedding-safetensors` (`emb_params`), `embedding-diffusers` (one token tensor),
  `embedding-sdxl` (`clip_l` + `clip_g`): textual inversion embeddings;
- `hypernetwork-a1111`: an A1111 hypernetwork `.pt` (integer context-dim keys, `layer_structure`, ...).

`.safetensors` files are read from their header (and a few scalar tensors); `.pt`/`.ckpt`/`.pth`/`.bin` only with
`torch.load(weights_only=True)` (`sdpipe.formats.pickled`): a file that needs code to load is refused.

Hashes (files only): `sha256`; `autov2` (A1111's and Civitai's short hash: the first 10 hex digits of the file's
sha256); `autov1` (A1111's legacy model hash: sha256 of the 64 KiB at offset 1 MiB, 8 hex digits); and for
`.safetensors`, `addnet` (sd-scripts' `sshs_model_hash`: the sha256 of the data after the header, which metadata
edits do not change).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdpipe.errors import SdpipeError
from sdpipe.formats import kohya
from sdpipe.formats.diffusers_lora import DOWN_SUFFIXES, METADATA_KEY, adapter_configs
from sdpipe.formats.pickled import PICKLE_SUFFIXES, find_state_dict, load_pickled

FORMATS = {
    "sd-checkpoint": "Stable Diffusion checkpoint (original single-file layout)",
    "diffusers-pipeline": "diffusers pipeline folder",
    "kohya-lora": "kohya / A1111 / LyCORIS LoRA",
    "diffusers-lora": "diffusers / PEFT LoRA",
    "embedding-a1111-pt": "textual inversion embedding (A1111 .pt)",
    "embedding-safetensors": "textual inversion embedding (A1111/kohya .safetensors, emb_params)",
    "embedding-diffusers": "textual inversion embedding (diffusers learned_embeds)",
    "embedding-sdxl": "textual inversion embedding (SDXL: clip_l + clip_g)",
    "clip-inversion-embedding": "CLIP inversion concept vector (sdpipe; the context of an image-variations model)",
    "hypernetwork-a1111": "A1111 hypernetwork",
    "unknown": "unknown",
}
SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
SHOWN_SHAPES = 8
HASH_CHUNK = 1 << 20
LOCON_MARKERS = ("_resnets_", "_downsamplers_", "_upsamplers_", "_conv_in", "_conv_out", "_conv_shortcut")


@dataclass
class Tensors:
    """The tensors of a file as {key: (dtype, shape)}, and a reader for the values of the few that are needed."""

    shapes: dict[str, tuple[str, list[int]]]
    read: Callable[[list[str]], dict[str, torch.Tensor]]
    metadata: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------
# Reading


def inspect_model(path: str | Path, hashes: bool = True) -> dict:
    """A JSON-ready report on a model file or diffusers folder: `format`, `description`, `details`, `metadata`,
    `tensor_count`, `parameters`, `dtypes`, `shapes` (the first few), `size_bytes` and `hashes`.

    Raises `SdpipeError` naming the path when it is missing, unreadable, or a pickle that needs code to load.
    """
    path = Path(path)
    if path.is_dir():
        report = inspect_folder(path)
    elif not path.is_file():
        raise SdpipeError(f"{path}: no such file or folder")
    elif path.suffix == ".safetensors":
        tensors = read_safetensors(path)
        report = {"container": "safetensors", **classify_tensors(tensors), **tensor_summary(tensors.shapes)}
        report["metadata"] = tensors.metadata
    elif path.suffix in PICKLE_SUFFIXES:
        report = {"container": "pickle (read with torch.load(weights_only=True))", **inspect_pickled(path)}
    else:
        raise SdpipeError(
            f"{path}: unknown kind of file (expected .safetensors, {', '.join(PICKLE_SUFFIXES)} or a diffusers folder)"
        )
    report = {"path": str(path), **report}
    report["description"] = FORMATS[report["format"]]
    report.setdefault("metadata", {})
    if path.is_file():
        report["size_bytes"] = path.stat().st_size
        if hashes:
            report["hashes"] = file_hashes(path)
    return report


def read_safetensors(path: Path) -> Tensors:
    """Shapes, dtypes and metadata from a `.safetensors` header (the tensors themselves are not read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            shapes = {}
            for key in f.keys():
                tensor_slice = f.get_slice(key)
                dtype = tensor_slice.get_dtype()
                shapes[key] = (SAFETENSORS_DTYPES.get(dtype, dtype.lower()), list(tensor_slice.get_shape()))
    except SafetensorError as error:
        raise SdpipeError(f"{path}: not a valid .safetensors file ({error}); it may be truncated or corrupt") from None

    def read(keys: list[str]) -> dict[str, torch.Tensor]:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in keys}

    return Tensors(shapes, read, metadata)


def in_memory(tensors: dict[str, torch.Tensor]) -> Tensors:
    shapes = {key: (str(t.dtype).removeprefix("torch."), list(t.shape)) for key, t in tensors.items()}
    return Tensors(shapes, lambda keys: {key: tensors[key] for key in keys})


def inspect_pickled(path: Path) -> dict:
    content = load_pickled(path)
    every_tensor = flatten_tensors(content)
    if isinstance(content, dict) and isinstance(content.get("string_to_param"), dict):
        details = embedding_details(next(iter(content["string_to_param"].values()), None))
        details.update(name=content.get("name"), step=content.get("step"), sd_checkpoint=content.get("sd_checkpoint"))
        report = {"format": "embedding-a1111-pt", "details": drop_none(details)}
    elif isinstance(content, dict) and ("layer_structure" in content or any(isinstance(k, int) for k in content)):
        report = {"format": "hypernetwork-a1111", "details": hypernetwork_details(content)}
    else:
        state_dict = find_state_dict(content)
        if state_dict is None:
            report = {"format": "unknown", "details": {"content": type(content).__name__}}
        else:
            report = classify_tensors(in_memory(state_dict))
    return {**report, **tensor_summary(every_tensor)}


def flatten_tensors(content: object, prefix: str = "") -> dict[str, tuple[str, list[int]]]:
    """{dotted key: (dtype, shape)} of every tensor in nested dicts and lists."""
    if torch.is_tensor(content):
        return {prefix.rstrip("."): (str(content.dtype).removeprefix("torch."), list(content.shape))}
    found = {}
    if isinstance(content, dict):
        items = content.items()
    elif isinstance(content, (list, tuple)):
        items = enumerate(content)
    else:
        return found
    for key, value in items:
        found.update(flatten_tensors(value, f"{prefix}{key}."))
    return found


def inspect_folder(path: Path) -> dict:
    if not (path / "model_index.json").is_file():
        raise SdpipeError(f"{path}: a folder, but not a diffusers pipeline folder (no model_index.json)")
    index = read_json(path / "model_index.json")
    components = {name: value for name, value in index.items() if not name.startswith("_") and isinstance(value, list)}
    shapes: dict[str, tuple[str, list[int]]] = {}
    weights = {}
    for name in components:
        files = sorted(p.name for p in (path / name).glob("*") if p.suffix in (".safetensors", *PICKLE_SUFFIXES))
        if files:
            weights[name] = files
        for file in sorted((path / name).glob("*.safetensors")):
            shapes.update({f"{name}/{key}": value for key, value in read_safetensors(file).shapes.items()})
    unet = read_json(path / "unet" / "config.json")
    text_encoder = read_json(path / "text_encoder" / "config.json")
    scheduler = read_json(path / "scheduler" / "scheduler_config.json")
    details = {
        "pipeline_class": index.get("_class_name"),
        "components": {name: "/".join(str(v) for v in value if v) or "none" for name, value in components.items()},
        "weight_files": weights,
        "unet_context_dim": unet.get("cross_attention_dim"),
        "unet_sample_size": unet.get("sample_size"),
        "text_encoder_hidden_size": text_encoder.get("hidden_size"),
        "text_encoder_layers": text_encoder.get("num_hidden_layers"),
        "prediction_type": scheduler.get("prediction_type"),
    }
    pickled = [
        f"{name}/{file}" for name, files in weights.items() for file in files if not file.endswith(".safetensors")
    ]
    if pickled:
        details["pickled_weights_not_read"] = pickled
    return {
        "container": "folder",
        "format": "diffusers-pipeline",
        "details": drop_none(details),
        **tensor_summary(shapes),
    }


def read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SdpipeError(f"{path}: not valid JSON ({error})") from None


# ---------------------------------------------------------------------------------------------------------
# Formats


def classify_tensors(tensors: Tensors) -> dict:
    """{`format`, `details`} of a flat state dict, told from its keys and shapes."""
    keys = list(tensors.shapes)
    if any(key.startswith("model.diffusion_model.") for key in keys):
        return {"format": "sd-checkpoint", "details": checkpoint_details(tensors.shapes)}
    if keys and all(re.match(r"lora_(unet|te\d?)_", key) for key in keys):
        return {"format": "kohya-lora", "details": kohya_details(tensors)}
    if any(".lora_A." in key or ".lora.down." in key for key in keys):
        return {"format": "diffusers-lora", "details": diffusers_lora_details(tensors)}
    if keys == ["emb_params"]:
        details = embedding_details(tensors.shapes["emb_params"][1])
        details["name"] = tensors.metadata.get("placeholder_token") or tensors.metadata.get("name")
        return {"format": "embedding-safetensors", "details": drop_none(details)}
    if set(keys) == {"clip_image_embedding", "clip_image_embedding_init"}:  # sdpipe's CLIP inversion
        details = embedding_details(tensors.shapes["clip_image_embedding"][1])
        details["variations_model"] = tensors.metadata.get("variations_model")
        return {"format": "clip-inversion-embedding", "details": drop_none(details)}
    if set(keys) == {"clip_l", "clip_g"}:
        details = {name: embedding_details(tensors.shapes[name][1]) for name in ("clip_l", "clip_g")}
        return {"format": "embedding-sdxl", "details": details}
    if len(keys) == 1 and len(tensors.shapes[keys[0]][1]) in (1, 2):
        return {
            "format": "embedding-diffusers",
            "details": {"name": keys[0], **embedding_details(tensors.shapes[keys[0]][1])},
        }
    return {"format": "unknown", "details": {}}


def checkpoint_details(shapes: dict[str, tuple[str, list[int]]]) -> dict:
    keys = list(shapes)
    if any(key.startswith("conditioner.embedders.") for key in keys):
        architecture, text_encoder = "SDXL", "conditioner.embedders (CLIP ViT-L + OpenCLIP ViT-bigG)"
    elif any(key.startswith("cond_stage_model.model.") for key in keys):
        architecture, text_encoder = "SD 2.x", "OpenCLIP (cond_stage_model.model)"
    elif any(key.startswith("cond_stage_model.transformer.") for key in keys):
        architecture, text_encoder = "SD 1.x", "CLIP (cond_stage_model.transformer)"
    else:
        architecture, text_encoder = "unknown (no text encoder in the file)", None
    width = first_shape(
        shapes, r"cond_stage_model\.(model\.|transformer\.(text_model\.)?embeddings\.)token_embedding\.weight"
    )
    layers = {m[1] for key in keys if (m := re.search(r"cond_stage_model\.\S*?(?:layers|resblocks)\.(\d+)\.", key))}
    context = first_shape(shapes, r"model\.diffusion_model\..*attn2\.to_k\.weight")
    in_channels = first_shape(shapes, r"model\.diffusion_model\.input_blocks\.0\.0\.weight")
    return drop_none(
        {
            "architecture": architecture,
            "text_encoder": text_encoder,
            "text_encoder_width": width[1] if width else None,
            "text_encoder_layers": len(layers) or None,
            "unet_context_dim": context[1] if context else None,
            "unet_in_channels": in_channels[1] if in_channels else None,
            "vae": any(key.startswith("first_stage_model.") for key in keys),
            "ema_weights": any(key.startswith("model_ema.") for key in keys),
        }
    )


def first_shape(shapes: dict[str, tuple[str, list[int]]], pattern: str) -> list[int] | None:
    return next((shape for key, (_, shape) in shapes.items() if re.fullmatch(pattern, key)), None)


def kohya_details(tensors: Tensors) -> dict:
    layers: dict[str, dict[str, list[int]]] = {}
    for key, (_, shape) in tensors.shapes.items():
        name, part = kohya.split_key(key)
        layers.setdefault(name, {})[part] = shape
    algorithms, ranks, components = set(), {}, Counter()
    for name, parts in layers.items():
        component = (
            "text_encoder_2"
            if name.startswith("lora_te2_")
            else "text_encoder"
            if name.startswith("lora_te")
            else "unet"
        )
        components[component] += 1
        if "lora_down.weight" in parts:
            algorithms.add("LoCon" if any(marker in name for marker in LOCON_MARKERS) else "LoRA")
            ranks[name] = parts["lora_down.weight"][0]
        elif "hada_w1_b" in parts:
            algorithms.add("LoHa")
            ranks[name] = parts["hada_w1_b"][0]
        elif any(part.startswith("lokr_") for part in parts):
            algorithms.add("LoKr")
            inner = parts.get("lokr_w2_b") or parts.get("lokr_w1_b")
            ranks[name] = inner[0] if inner else "full"
        if "dora_scale" in parts:
            algorithms.add("DoRA")
    alpha_keys = [key for key in tensors.shapes if key.endswith(".alpha")]
    alphas = Counter(round(alpha.item(), 6) for alpha in tensors.read(alpha_keys).values())
    metadata = tensors.metadata
    return drop_none(
        {
            "algorithms": sorted(algorithms),
            "components": dict(components),
            "layers": len(layers),
            "ranks": count_values(ranks.values()),
            "alphas": {str(alpha): count for alpha, count in sorted(alphas.items())} or None,
            "rank_per_layer": ranks,
            "base_model": metadata.get("ss_base_model_version") or metadata.get("modelspec.architecture"),
        }
    )


def diffusers_lora_details(tensors: Tensors) -> dict:
    ranks, components = {}, Counter()
    for key, (_, shape) in tensors.shapes.items():
        for suffix in DOWN_SUFFIXES:
            if key.endswith(suffix):
                layer = key[: -len(suffix)]
                ranks[layer] = shape[0]
                components[layer.split(".", 1)[0]] += 1
    configs = adapter_configs(tensors.metadata)
    alphas = {
        component: {
            "r": config.get("r"),
            "lora_alpha": config.get("lora_alpha"),
            "use_rslora": config.get("use_rslora"),
        }
        for component, config in configs.items()
    }
    return drop_none(
        {
            "layout": "peft (lora_A / lora_B)"
            if any(".lora_A." in key for key in tensors.shapes)
            else "lora.down / lora.up",
            "components": dict(components),
            "layers": len(ranks),
            "ranks": count_values(ranks.values()),
            "dora": any("lora_magnitude_vector" in key for key in tensors.shapes) or None,
            "adapter_config": alphas or f"none ({METADATA_KEY} absent: diffusers uses alpha = rank)",
            "rank_per_layer": ranks,
        }
    )


def embedding_details(shape_or_tensor) -> dict:
    shape = list(shape_or_tensor.shape) if torch.is_tensor(shape_or_tensor) else list(shape_or_tensor or [])
    if not shape:
        return {}
    return {"vectors": shape[0] if len(shape) == 2 else 1, "dim": shape[-1]}


def hypernetwork_details(content: dict) -> dict:
    context_dims = sorted(key for key in content if isinstance(key, int))
    fields = (
        "name",
        "layer_structure",
        "activation_func",
        "is_layer_norm",
        "weight_initialization",
        "use_dropout",
        "activate_output",
        "last_layer_dropout",
        "step",
        "sd_checkpoint_name",
    )
    details = {"context_dims": context_dims}
    details.update({name: content.get(name) for name in fields})
    return drop_none(details)


def count_values(values) -> dict[str, int]:
    return {str(value): count for value, count in sorted(Counter(values).items(), key=lambda item: str(item[0]))}


def drop_none(details: dict) -> dict:
    return {key: value for key, value in details.items() if value is not None}


# ---------------------------------------------------------------------------------------------------------
# Summary and hashes


def tensor_summary(shapes: dict[str, tuple[str, list[int]]]) -> dict:
    parameters = 0
    for _, shape in shapes.values():
        count = 1
        for size in shape:
            count *= size
        parameters += count
    return {
        "tensor_count": len(shapes),
        "parameters": parameters,
        "dtypes": dict(sorted(Counter(dtype for dtype, _ in shapes.values()).items())),
        "shapes": {key: shape for key, (_, shape) in list(shapes.items())[:SHOWN_SHAPES]},
    }


def file_hashes(path: Path) -> dict[str, str]:
    """sha256, AutoV1, AutoV2 and (for .safetensors) the addnet hash of a file, in one read."""
    data_start = None
    if path.suffix == ".safetensors":
        with path.open("rb") as f:
            data_start = 8 + int.from_bytes(f.read(8), "little")
    whole, data = hashlib.sha256(), hashlib.sha256()
    position = 0
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            whole.update(chunk)
            if data_start is not None and position + len(chunk) > data_start:
                data.update(chunk[max(0, data_start - position) :])
            position += len(chunk)
        f.seek(0x100000)
        legacy_block = f.read(0x10000)
    sha256 = whole.hexdigest()
    hashes = {"sha256": sha256, "autov2": sha256[:10]}
    if legacy_block:  # files under 1 MiB have none (A1111 would hash nothing)
        hashes["autov1"] = hashlib.sha256(legacy_block).hexdigest()[:8]
    if data_start is not None:
        hashes["addnet"] = data.hexdigest()
    return hashes


# ---------------------------------------------------------------------------------------------------------
# Printing


def print_report(report: dict, console) -> None:
    """The report as rich tables on `console`."""
    from rich.markup import escape
    from rich.table import Table

    def value_text(value) -> str:
        if isinstance(value, dict):
            text = ", ".join(
                f"{key}: {item if isinstance(item, str) else json.dumps(item)}" for key, item in value.items()
            )
        else:
            text = " ".join(value.split()) if isinstance(value, str) else json.dumps(value)
        return escape(text if len(text) <= 300 else text[:300] + " …")

    console.print(f"[bold]{escape(report['path'])}[/]: [green]{escape(report['description'])}[/] ({report['format']})")
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="cyan", overflow="fold")
    table.add_column(overflow="fold")
    for key, value in report["details"].items():
        if key == "rank_per_layer":
            continue  # long; in --json
        table.add_row(key, value_text(value))
    table.add_row("container", escape(report.get("container", "")))
    table.add_row("tensors", f"{report['tensor_count']} ({report['parameters']:,} parameters)")
    table.add_row("dtypes", value_text(report["dtypes"]))
    for key, shape in report["shapes"].items():
        table.add_row(f"  {escape(key)}", str(shape))
    if report["tensor_count"] > len(report["shapes"]):
        table.add_row("", f"… and {report['tensor_count'] - len(report['shapes'])} more (--json for details)")
    if "size_bytes" in report:
        table.add_row("size", f"{report['size_bytes']:,} bytes")
    for name, value in report.get("hashes", {}).items():
        table.add_row(name, value)
    console.print(table)
    if report["metadata"]:
        metadata = Table(title="__metadata__", show_header=False, box=None, title_justify="left", pad_edge=False)
        metadata.add_column(style="cyan", overflow="fold")
        metadata.add_column(overflow="fold")
        for key, value in sorted(report["metadata"].items()):
            metadata.add_row(escape(key), value_text(value))
        console.print(metadata)
