"""The diffusers/PEFT LoRA file layout, and conversion between it and kohya's (`sdpipe.formats.kohya`).

What diffusers' `StableDiffusionPipeline.save_lora_weights(..., unet_lora_adapter_metadata=...)` writes:

    unet.<module path>.lora_A.weight            [r, in(, kh, kw)]    kohya: lora_down.weight
    unet.<module path>.lora_B.weight            [out, r(, 1, 1)]     kohya: lora_up.weight
    text_encoder.text_model.<module path>.lora_A.weight    ...      (CLIP's module paths before transformers 5)

and, in the safetensors metadata `lora_adapter_metadata`, each component's peft `LoraConfig` as JSON with
prefixed keys (`unet.r`, `unet.lora_alpha`, `unet.rank_pattern`, `unet.alpha_pattern`, `unet.target_modules`,
...). A layer's scale is lora_alpha / r (lora_alpha / sqrt(r) with `use_rslora`), the patterns overriding
r and lora_alpha for the layers they name. Without that metadata diffusers takes lora_alpha = r: scale 1.
Older diffusers files name the parts `lora.down.weight` / `lora.up.weight`; both are read.

Text encoder keys: transformers 5's `CLIPTextModel` has no `text_model` module, so diffusers' `save_lora_weights`
now writes `text_encoder.encoder.layers.0…`. ComfyUI's key map and diffusers with transformers < 5 know only
`text_encoder.text_model.encoder.layers.0…` and drop the others, while current diffusers strips `text_model.` when
its model lacks it: sdpipe writes the prefix (`with_text_model`) and reads both forms. The peft config keeps the
paths without it (`encoder.layers.0.self_attn.q_proj`): peft matches target modules and patterns on the end of a
module path, so those fit the model with and without `text_model`.

The kohya → diffusers direction keeps the tensors as they are and moves each layer's `alpha` into the
metadata (the most common alpha as `lora_alpha`, the others in `alpha_pattern`), so ΔW = up · down × alpha / r
is unchanged and a round trip gives back the same tensors. Only plain LoRA (LoCon included: LoRA on
convolutions) has this layout; LoHa, LoKr, DoRA and Tucker (`lora_mid`) layers are refused.

A kohya name (`lora_unet_down_blocks_0_attentions_0_proj_in`) does not say which underscores were dots. The
module path is looked up among the layers of a model when one is given (`model_module_paths`), else rebuilt
from the names of the modules of diffusers' UNet and transformers' CLIP text encoder (`guess_module_path`).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch

from sdpipe.errors import SdpipeError
from sdpipe.formats import kohya

METADATA_KEY = "lora_adapter_metadata"
COMPONENT_PREFIXES = {
    "lora_unet": "unet",
    "lora_te": "text_encoder",
    "lora_te1": "text_encoder",
    "lora_te2": "text_encoder_2",
}
"""Kohya name prefix → diffusers component (SDXL files call the first text encoder `lora_te1`)."""
DOWN_SUFFIXES = (".lora_A.weight", ".lora.down.weight")
UP_SUFFIXES = (".lora_B.weight", ".lora.up.weight")
PLAIN_LORA_PARTS = {"lora_down.weight", "lora_up.weight", "alpha"}

# Module names of diffusers' UNet and transformers' CLIP text encoder that hold an underscore (longest first).
COMPOUND_NAMES = {
    "conv_norm_out",
    "time_emb_proj",
    "final_layer_norm",
    "add_k_proj",
    "add_q_proj",
    "add_v_proj",
    "to_add_out",
    "down_blocks",
    "up_blocks",
    "mid_block",
    "transformer_blocks",
    "to_q",
    "to_k",
    "to_v",
    "to_out",
    "proj_in",
    "proj_out",
    "conv_in",
    "conv_out",
    "conv_shortcut",
    "time_embedding",
    "linear_1",
    "linear_2",
    "add_embedding",
    "class_embedding",
    "encoder_hid_proj",
    "text_model",
    "self_attn",
    "q_proj",
    "k_proj",
    "v_proj",
    "out_proj",
    "layer_norm1",
    "layer_norm2",
    "token_embedding",
    "position_embedding",
    "text_projection",
}


# ---------------------------------------------------------------------------------------------------------
# Names


def split_kohya_name(name: str) -> tuple[str, str]:
    """`lora_unet_conv_in` → (`unet`, `conv_in`): the component and the name without its prefix."""
    for prefix in sorted(COMPONENT_PREFIXES, key=len, reverse=True):
        if name.startswith(prefix + "_"):
            return COMPONENT_PREFIXES[prefix], name[len(prefix) + 1 :]
    raise SdpipeError(f"{name!r} is not a kohya LoRA layer name (expected lora_unet_…, lora_te_…, lora_te2_…)")


def guess_module_path(component: str, name: str) -> str:
    """The module path of a kohya name without its prefix: `down_blocks_0_attentions_0_proj_in` →
    `down_blocks.0.attentions.0.proj_in`; text encoder paths lose `text_model.` (transformers 5 layout)."""
    parts = name.split("_")
    path, index = [], 0
    while index < len(parts):
        for size in (3, 2, 1):
            candidate = "_".join(parts[index : index + size])
            if size == 1 or candidate in COMPOUND_NAMES:
                path.append(candidate)
                index += size
                break
    module_path = ".".join(path)
    return module_path if component == "unet" else module_path.removeprefix(kohya.TEXT_MODEL + ".")


def with_text_model(component: str, path: str) -> str:
    """The module path a diffusers LoRA key spells: text encoder paths with CLIP's `text_model.` in front
    (`encoder.layers.0.mlp.fc1` → `text_model.encoder.layers.0.mlp.fc1`), UNet paths as they are."""
    if component == "unet":
        return path
    return f"{kohya.TEXT_MODEL}.{path.removeprefix(kohya.TEXT_MODEL + '.')}"


def with_text_model_keys(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers LoRA state dict with `text_model.` in every text encoder key (`with_text_model`)."""
    renamed = {}
    for key, tensor in tensors.items():
        component, _, rest = key.partition(".")
        if component != "unet" and rest:
            key = f"{component}.{with_text_model(component, rest)}"
        renamed[key] = tensor
    return renamed


def model_module_paths(folder: str | Path | None, sdxl: bool = False) -> dict[str, dict[str, str]]:
    """{component: {kohya name: module path}} of the UNet and text encoder(s) of a diffusers folder, or with no
    folder of SDXL base 1.0's architecture (`sdxl`).

    The models are built from their configs on the meta device: no weights are read.
    """
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if folder is None:
        from sdpipe.models.sdxl_configs import SDXL_TEXT, SDXL_TEXT_2, SDXL_UNET

        unet_config, text_configs = SDXL_UNET, {"text_encoder": SDXL_TEXT, "text_encoder_2": SDXL_TEXT_2}
        text_configs = {name: CLIPTextConfig(**config) for name, config in text_configs.items()}
    else:
        folder = Path(folder)
        missing = [name for name in ("unet", "text_encoder") if not (folder / name / "config.json").is_file()]
        if missing:
            raise SdpipeError(
                f"--config {folder}: not a diffusers folder (no {', '.join(f'{m}/config.json' for m in missing)})"
            )
        unet_config = UNet2DConditionModel.load_config(folder / "unet")
        text_configs = {
            name: CLIPTextConfig.from_pretrained(folder / name)
            for name in ("text_encoder", "text_encoder_2")
            if (folder / name / "config.json").is_file()
        }
    text_classes = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
    with init_empty_weights():
        models = {"unet": UNet2DConditionModel.from_config(unet_config)}
        models.update({name: text_classes[name](config) for name, config in text_configs.items()})
    paths = {name: kohya.model_kohya_names(model, name) for name, model in models.items()}
    if sdxl or "text_encoder_2" in models:
        # kohya's SDXL files name the UNet's layers by their original module paths (`kohya.sdxl_unet_names`)
        sdxl_names = kohya.sdxl_unet_names(paths["unet"].values(), models["unet"].config)
        paths["unet"] = {sdxl_names[name]: path for name, path in paths["unet"].items()}
        first = kohya.PREFIXES["text_encoder"]
        paths["text_encoder"] = {
            kohya.SDXL_TEXT_ENCODER_PREFIX + name.removeprefix(first): path for name, path in paths["text_encoder"].items()
        }
    return paths


def is_sdxl_kohya(tensors: Mapping[str, torch.Tensor]) -> bool:
    """Whether a kohya LoRA's names are SDXL's: `lora_te1_`/`lora_te2_`, or the UNet's original module paths."""
    return any(re.match(r"lora_(te1|te2|unet_(input_blocks|middle_block|output_blocks))_", key) for key in tensors)


def is_sdxl_diffusers(tensors: Mapping[str, torch.Tensor]) -> bool:
    """Whether a diffusers LoRA is for SDXL: a second text encoder, the UNet's added (text-time) embedding, or a
    transformer block deeper than the first (SD 1.x/2.x have one per attention)."""
    return any(
        key.startswith(("text_encoder_2.", "unet.add_embedding.")) or ".transformer_blocks.1." in key for key in tensors
    )


# ---------------------------------------------------------------------------------------------------------
# kohya → diffusers


def kohya_to_diffusers(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    module_paths: Mapping[str, Mapping[str, str]] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The diffusers/PEFT tensors and metadata of a kohya LoRA file's tensors and metadata.

    `module_paths` ({component: {kohya name: module path}}, from `model_module_paths`) maps names exactly and
    refuses names that the model lacks; without it the paths are rebuilt from the names. Text encoder keys get
    `text_model.` (`with_text_model`). The kohya metadata (`ss_*`, `modelspec.*`) is kept. Raises `SdpipeError`
    for layers that are not plain LoRA.
    """
    converted: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, tuple[int, float]]] = {}  # component → {module path: (rank, alpha)}
    unknown = []
    if module_paths is None and is_sdxl_kohya(tensors):
        module_paths = model_module_paths(None, sdxl=True)  # SDXL's UNet names cannot be guessed
    for name, parts in sorted(kohya.group_by_layer(tensors).items()):
        check_plain_lora(name, parts)
        component, short_name = split_kohya_name(name)
        if module_paths is None:
            path = guess_module_path(component, short_name)
        elif name in module_paths.get(component, {}):
            path = module_paths[component][name]
        else:
            unknown.append(name)
            continue
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        rank = down.shape[0]
        alpha = parts["alpha"].item() if "alpha" in parts else float(rank)
        key_path = with_text_model(component, path)
        converted[f"{component}.{key_path}.lora_A.weight"] = down
        converted[f"{component}.{key_path}.lora_B.weight"] = up
        # the config's paths without `text_model.`: they match the model's end with or without it
        layers.setdefault(component, {})[path.removeprefix(kohya.TEXT_MODEL + ".")] = (rank, alpha)
    if unknown:
        raise SdpipeError(
            f"{len(unknown)} LoRA layer(s) match no layer of the --config model (SDXL base 1.0's without --config): "
            f"{', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''} (a LoRA for another architecture?)"
        )
    config = {}
    for component, component_layers in layers.items():
        config.update({f"{component}.{key}": value for key, value in lora_config(component_layers).items()})
    new_metadata = {**metadata, "format": "pt", METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}
    return converted, new_metadata


def check_plain_lora(name: str, parts: Mapping[str, torch.Tensor]) -> None:
    extra = set(parts) - PLAIN_LORA_PARTS
    if not extra and {"lora_down.weight", "lora_up.weight"} <= set(parts):
        return
    if "dora_scale" in extra:
        kind = "DoRA"
    elif any(part.startswith("hada_") for part in extra):
        kind = "LoHa"
    elif any(part.startswith("lokr_") for part in extra):
        kind = "LoKr"
    elif "lora_mid.weight" in extra:
        kind = "LoCon with a Tucker core (lora_mid)"
    else:
        kind = f"parts {', '.join(sorted(parts))}"
    raise SdpipeError(
        f"{name}: {kind} has no diffusers/PEFT LoRA layout; only plain LoRA (lora_down, lora_up, alpha) converts"
    )


def lora_config(layers: Mapping[str, tuple[int, float]]) -> dict:
    """peft `LoraConfig` fields for {module path: (rank, alpha)}: the most common rank and alpha, and patterns
    (escaped full paths, as sdpipe's LoRA method writes them) for the layers that differ."""
    rank = Counter(rank for rank, _ in layers.values()).most_common(1)[0][0]
    alpha = Counter(alpha for _, alpha in layers.values()).most_common(1)[0][0]
    return {
        "r": rank,
        "lora_alpha": alpha,
        "rank_pattern": {re.escape(path): r for path, (r, _) in layers.items() if r != rank},
        "alpha_pattern": {re.escape(path): a for path, (_, a) in layers.items() if a != alpha},
        "target_modules": sorted(layers),
        "use_dora": False,
        "use_rslora": False,
    }


# ---------------------------------------------------------------------------------------------------------
# diffusers → kohya


def split_diffusers_key(key: str) -> tuple[str, str, str]:
    """`unet.conv_in.lora_A.weight` → (`unet`, `conv_in`, `lora_down.weight`)."""
    component, dot, rest = key.partition(".")
    if not dot or component not in kohya.PREFIXES:
        raise SdpipeError(
            f"{key!r}: a diffusers LoRA key must start with {', '.join(p + '.' for p in kohya.PREFIXES)} "
            "(LoRAs of other model families are not converted)"
        )
    for suffixes, part in (
        (DOWN_SUFFIXES, "lora_down.weight"),
        (UP_SUFFIXES, "lora_up.weight"),
        ((".alpha",), "alpha"),
    ):
        for suffix in suffixes:
            if rest.endswith(suffix):
                path = rest[: -len(suffix)]
                for prefix in kohya.PEFT_WRAPPER_PREFIXES:
                    path = path.removeprefix(prefix)
                return component, path, part
    raise SdpipeError(f"{key!r}: not a plain LoRA weight (lora_A/lora_B or lora.down/lora.up); it does not convert")


def diffusers_to_kohya(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], config: str | Path | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The kohya tensors and metadata of a diffusers/PEFT LoRA file's tensors and metadata.

    Each layer's alpha is its `.alpha` tensor when the file has one, else the one that gives the scale of its
    peft config in `lora_adapter_metadata` (alpha / r = lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA),
    else r (scale 1, diffusers' default). An SDXL LoRA (`is_sdxl_diffusers`) gets kohya's SDXL names, the UNet's
    original module paths looked up in the architecture of `config` (a diffusers folder; SDXL base 1.0's without).
    """
    configs = adapter_configs(metadata)
    sdxl_names = None
    if is_sdxl_diffusers(tensors) or (config is not None and (Path(config) / "text_encoder_2").is_dir()):
        sdxl_names = {path: name for name, path in model_module_paths(config, sdxl=True)["unet"].items()}
    layers: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        component, path, part = split_diffusers_key(key)
        layers.setdefault((component, path), {})[part] = tensor
    converted: dict[str, torch.Tensor] = {}
    ranks, alphas = [], []
    unknown = []
    for (component, path), parts in sorted(layers.items()):
        name = kohya.kohya_name(component, path)
        if sdxl_names is not None and component == "unet":
            if path not in sdxl_names:
                unknown.append(f"unet.{path}")
                continue
            name = sdxl_names[path]
        elif sdxl_names is not None and component == "text_encoder":
            name = kohya.SDXL_TEXT_ENCODER_PREFIX + name.removeprefix(kohya.PREFIXES["text_encoder"])
        if {"lora_down.weight", "lora_up.weight"} - set(parts):
            raise SdpipeError(
                f"{component}.{path}: has only {', '.join(sorted(parts))}; lora_A and lora_B are both needed"
            )
        down = parts["lora_down.weight"]
        rank = down.shape[0]
        if "alpha" in parts:
            alpha = parts["alpha"].to(down.dtype).reshape(())
        else:
            alpha = torch.tensor(
                # looked up with `text_model.`: patterns written with it and without it both match that path
                peft_alpha(configs.get(component, {}), with_text_model(component, path), rank, f"{component}.{path}"),
                dtype=down.dtype,
            )
        converted[f"{name}.lora_down.weight"] = down
        converted[f"{name}.lora_up.weight"] = parts["lora_up.weight"]
        converted[f"{name}.alpha"] = alpha
        ranks.append(rank)
        alphas.append(alpha.item())
    if unknown:
        raise SdpipeError(
            f"{len(unknown)} SDXL LoRA layer(s) match no layer of the --config model (SDXL base 1.0's without "
            f"--config): {', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''}"
        )
    new_metadata = {key: value for key, value in metadata.items() if key not in (METADATA_KEY, "format")}
    if sdxl_names is not None:
        new_metadata.setdefault("ss_base_model_version", kohya.SDXL_BASE_MODEL_VERSION)
    if ranks:
        new_metadata.setdefault("ss_network_module", "networks.lora")
        new_metadata.setdefault("ss_network_dim", str(Counter(ranks).most_common(1)[0][0]))
        new_metadata.setdefault("ss_network_alpha", str(Counter(alphas).most_common(1)[0][0]))
    return converted, new_metadata


def adapter_configs(metadata: Mapping[str, str]) -> dict[str, dict]:
    """{component: peft config fields} from the `lora_adapter_metadata` JSON (empty when there is none)."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as error:
        raise SdpipeError(f"metadata {METADATA_KEY!r} is not valid JSON ({error})") from None
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, field = key.partition(".")
        configs.setdefault(component, {})[field] = value
    return configs


def peft_alpha(config: Mapping, path: str, rank: int, where: str) -> float:
    """The kohya alpha that gives a layer peft's scale: alpha / rank == lora_alpha / r (/ sqrt(r) with rsLoRA)."""
    if not config:
        return float(rank)  # diffusers' default without metadata: lora_alpha = r
    config_rank = pattern_value(config.get("rank_pattern") or {}, path, config.get("r", rank))
    if config_rank != rank:
        raise SdpipeError(f"{where}: lora_A has rank {rank} but the file's {METADATA_KEY} says r={config_rank}")
    lora_alpha = pattern_value(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", rank))
    if config.get("use_rslora"):
        return float(lora_alpha) * math.sqrt(rank)
    return float(lora_alpha)


def pattern_value(patterns: Mapping[str, object], path: str, default):
    """The value of the first pattern that matches the end of `path` on a module boundary (peft's rule)."""
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?({pattern})", path):
            return value
    return default
