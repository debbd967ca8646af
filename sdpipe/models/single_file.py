"""Diffusers folder <-> single-file Stable Diffusion checkpoint in the original (CompVis / LDM) layout.

Writing follows the logic of diffusers' `scripts/convert_diffusers_to_original_stable_diffusion.py`, but the
UNet block index maps are computed from the UNet config (number of levels, `layers_per_block`, which blocks
have attention) instead of SD 1.5's hard-coded 4 levels x 2 layers, so the same code writes the tiny world
and SD 1.x/2.x-shaped UNets. The file holds three prefixed parts:

    model.diffusion_model.*          the UNet
    first_stage_model.*              the VAE (its attention linears stored as 1x1 convs, as the original does)
    cond_stage_model.transformer.*   SD 1.x's CLIP text encoder (transformers' keys, `text_model.…`)
    cond_stage_model.model.*         or SD 2.x's OpenCLIP text encoder (fused q/k/v `resblocks`, as OpenCLIP)

Reading back is diffusers' own `StableDiffusionPipeline.from_single_file`. The keys alone do not tell the
architecture (diffusers would guess SD 1.5 and fetch its configs from the Hub), so the caller must pass
`config=<a local diffusers folder>`: `load_single_file_pipeline` does exactly that, see its docstring.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from sdpipe.errors import SdpipeError
from sdpipe.families import SDXL, ModelFamily, folder_family, pipeline_family, single_file_family
from sdpipe.io import SafetensorsWriter, atomic_path

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x files (OpenCLIP text encoder)
SDXL_PREFIX = "conditioner.embedders."  # SDXL files' two text encoders (families.SINGLE_FILE_MARKERS)
SDXL_CLIP_L_PREFIX = SDXL_PREFIX + "0.transformer."  # CLIP ViT-L, transformers' keys
SDXL_OPEN_CLIP_PREFIX = SDXL_PREFIX + "1.model."  # OpenCLIP ViT-bigG, OpenCLIP's layout with its text projection

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

# Inside a block, diffusers and the original name some modules differently: {diffusers: original}.
UNET_RESNET_RENAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
VAE_RESNET_RENAMES = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION_RENAMES = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    # names used by diffusers before 0.15
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}
NO_RENAMES: dict[str, str] = {}

# {diffusers prefix: (original prefix, renames of the module inside)}
PrefixMap = dict[str, tuple[str, dict[str, str]]]


# --- key maps ------------------------------------------------------------------------------------------


def unet_prefix_map(unet_config: Mapping) -> PrefixMap:
    """The UNet's diffusers block prefixes and their original `input_blocks`/`output_blocks` names.

    The original UNet is a flat list of blocks: `input_blocks.0` is `conv_in`, then each down level has
    `layers_per_block` entries (resnet `.0`, attention `.1`) and, except the last level, one downsampler
    entry; each up level has `layers_per_block + 1` entries and its upsampler sits in the level's last entry
    (after the attention when the level has one).
    """
    layers = unet_config["layers_per_block"]
    if not isinstance(layers, int):
        raise SdpipeError(
            f"UNet config layers_per_block={layers!r}: the original single-file layout needs one integer"
        )
    down_types, up_types = list(unet_config["down_block_types"]), list(unet_config["up_block_types"])
    num_levels = len(down_types)
    prefixes: PrefixMap = {
        "time_embedding.linear_1.": ("time_embed.0.", NO_RENAMES),
        "time_embedding.linear_2.": ("time_embed.2.", NO_RENAMES),
        "add_embedding.linear_1.": ("label_emb.0.0.", NO_RENAMES),  # SDXL's added (pooled text + size) conditioning
        "add_embedding.linear_2.": ("label_emb.0.2.", NO_RENAMES),
        "conv_in.": ("input_blocks.0.0.", NO_RENAMES),
        "conv_norm_out.": ("out.0.", NO_RENAMES),
        "conv_out.": ("out.2.", NO_RENAMES),
        "mid_block.resnets.0.": ("middle_block.0.", UNET_RESNET_RENAMES),
        "mid_block.attentions.0.": ("middle_block.1.", NO_RENAMES),
        "mid_block.resnets.1.": ("middle_block.2.", UNET_RESNET_RENAMES),
    }
    for level, block_type in enumerate(down_types):
        for layer in range(layers):
            index = 1 + level * (layers + 1) + layer
            prefixes[f"down_blocks.{level}.resnets.{layer}."] = (f"input_blocks.{index}.0.", UNET_RESNET_RENAMES)
            if has_attention(block_type):
                prefixes[f"down_blocks.{level}.attentions.{layer}."] = (f"input_blocks.{index}.1.", NO_RENAMES)
        if level < num_levels - 1:
            index = (level + 1) * (layers + 1)
            prefixes[f"down_blocks.{level}.downsamplers.0.conv."] = (f"input_blocks.{index}.0.op.", NO_RENAMES)
    for level, block_type in enumerate(up_types):
        for layer in range(layers + 1):
            index = level * (layers + 1) + layer
            prefixes[f"up_blocks.{level}.resnets.{layer}."] = (f"output_blocks.{index}.0.", UNET_RESNET_RENAMES)
            if has_attention(block_type):
                prefixes[f"up_blocks.{level}.attentions.{layer}."] = (f"output_blocks.{index}.1.", NO_RENAMES)
        if level < num_levels - 1:
            index = level * (layers + 1) + layers
            position = 2 if has_attention(block_type) else 1
            prefixes[f"up_blocks.{level}.upsamplers.0."] = (f"output_blocks.{index}.{position}.", NO_RENAMES)
    return prefixes


def has_attention(block_type: str) -> bool:
    return "CrossAttn" in block_type


def vae_prefix_map(num_levels: int, max_resnets: int) -> PrefixMap:
    """The VAE's diffusers block prefixes and their original names.

    The original decoder numbers its `up` levels from the lowest resolution, the reverse of diffusers.
    """
    prefixes: PrefixMap = {
        "quant_conv.": ("quant_conv.", NO_RENAMES),
        "post_quant_conv.": ("post_quant_conv.", NO_RENAMES),
    }
    for part in ("encoder", "decoder"):
        prefixes[f"{part}.conv_in."] = (f"{part}.conv_in.", NO_RENAMES)
        prefixes[f"{part}.conv_out."] = (f"{part}.conv_out.", NO_RENAMES)
        prefixes[f"{part}.conv_norm_out."] = (f"{part}.norm_out.", NO_RENAMES)
        prefixes[f"{part}.mid_block.resnets.0."] = (f"{part}.mid.block_1.", VAE_RESNET_RENAMES)
        prefixes[f"{part}.mid_block.resnets.1."] = (f"{part}.mid.block_2.", VAE_RESNET_RENAMES)
        prefixes[f"{part}.mid_block.attentions.0."] = (f"{part}.mid.attn_1.", VAE_ATTENTION_RENAMES)
    for level in range(num_levels):
        up_level = num_levels - 1 - level
        for layer in range(max_resnets):
            prefixes[f"encoder.down_blocks.{level}.resnets.{layer}."] = (
                f"encoder.down.{level}.block.{layer}.",
                VAE_RESNET_RENAMES,
            )
            prefixes[f"decoder.up_blocks.{level}.resnets.{layer}."] = (
                f"decoder.up.{up_level}.block.{layer}.",
                VAE_RESNET_RENAMES,
            )
        prefixes[f"encoder.down_blocks.{level}.downsamplers.0."] = (
            f"encoder.down.{level}.downsample.",
            NO_RENAMES,
        )
        prefixes[f"decoder.up_blocks.{level}.upsamplers.0."] = (f"decoder.up.{up_level}.upsample.", NO_RENAMES)
    return prefixes


def rename_keys(
    state_dict: Mapping[str, torch.Tensor], prefixes: PrefixMap, model: str
) -> dict[str, torch.Tensor]:
    """Applies a prefix map to every key; a key that no prefix covers is an error, never silently kept."""
    renamed = {}
    for key, tensor in state_dict.items():
        for diffusers_prefix, (original_prefix, renames) in prefixes.items():
            if key.startswith(diffusers_prefix):
                module, _, param = key[len(diffusers_prefix) :].rpartition(".")
                module = renames.get(module, module)
                renamed[original_prefix + (f"{module}." if module else "") + param] = tensor
                break
        else:
            raise SdpipeError(
                f"{model} weight {key!r} has no place in the original Stable Diffusion single-file layout "
                "(only SD 1.x/2.x-style UNet2DConditionModel, AutoencoderKL and CLIPTextModel are supported)"
            )
    if len(renamed) != len(state_dict):
        raise SdpipeError(f"{model}: two weights were mapped to the same original key; the config does not fit")
    return renamed


# --- diffusers -> original -----------------------------------------------------------------------------


def unet_to_original(state_dict: Mapping[str, torch.Tensor], unet_config: Mapping) -> dict[str, torch.Tensor]:
    """A diffusers `UNet2DConditionModel` state dict in original keys (without `model.diffusion_model.`)."""
    return rename_keys(state_dict, unet_prefix_map(unet_config), "UNet")


def original_module_path(path: str, unet_config: Mapping) -> str:
    """The original (SGM) module path of the UNet layer at diffusers' `path`:
    `down_blocks.1.attentions.0.proj_in` → `input_blocks.4.1.proj_in`, `down_blocks.0.resnets.0.conv1` →
    `input_blocks.1.0.in_layers.2` (kohya names SDXL LoRA layers by these paths)."""
    [key] = rename_keys({f"{path}.weight": None}, unet_prefix_map(unet_config), "UNet")
    return key.removesuffix(".weight")


def vae_to_original(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers `AutoencoderKL` state dict in original keys (without `first_stage_model.`).

    The mid-block attention's q/k/v/out linear weights become [C, C, 1, 1] conv weights, as in the original.
    """
    levels = {int(m[1]) for key in state_dict if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", key))}
    resnets = {int(m[1]) for key in state_dict if (m := re.match(r"\w+\.\w+_blocks\.\d+\.resnets\.(\d+)\.", key))}
    prefixes = vae_prefix_map(num_levels=max(levels, default=-1) + 1, max_resnets=max(resnets, default=-1) + 1)
    converted = rename_keys(state_dict, prefixes, "VAE")
    for key, tensor in converted.items():
        if re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", key) and tensor.ndim == 2:
            converted[key] = tensor.reshape(*tensor.shape, 1, 1)
    return converted


def text_encoder_to_original(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers `CLIPTextModel` state dict in SD 1.x keys (without `cond_stage_model.transformer.`).

    SD 1.x stores the HF CLIP keys as they are, under `text_model.` (transformers >= 5.6 dropped that
    wrapper from `CLIPTextModel`, so it is added back).
    """
    return {
        key if key.startswith("text_model.") else f"text_model.{key}": tensor for key, tensor in state_dict.items()
    }


def is_open_clip(text_encoder_config) -> bool:
    """SD 2.x's text encoder: OpenCLIP ViT-H/14's text tower, which uses GELU where OpenAI's CLIP (SD 1.x) uses
    quick GELU; its single-file layout is OpenCLIP's, under `cond_stage_model.model.`."""
    return text_encoder_config.hidden_act == "gelu"


OPEN_CLIP_LAYER_PARTS = {  # diffusers (HF CLIP) name in a layer -> OpenCLIP resblock name
    "layer_norm1": "ln_1",
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


OPEN_CLIP_TRANSPOSED = ("text_projection",)
"""OpenCLIP keys stored as the transpose of the transformers weight (OpenCLIP applies them as `x @ weight`)."""


def open_clip_key_map(names: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """{OpenCLIP key (without prefix): the transformers keys it is made of} for the keys `names` of a `CLIPTextModel`
    or `CLIPTextModelWithProjection` state dict (with or without `text_model.`). Each OpenCLIP key is one transformers
    key, except the fused `attn.in_proj_weight` / `_bias`: q, k and v concatenated (`open_clip_tensor` joins them).
    Raises for a key with no OpenCLIP equivalent."""
    weights = {name.removeprefix("text_model."): name for name in names}
    weights.pop("embeddings.position_ids", None)  # a buffer in older transformers, not a weight
    key_map = {
        "token_embedding.weight": (weights.pop("embeddings.token_embedding.weight"),),
        "positional_embedding": (weights.pop("embeddings.position_embedding.weight"),),
        "ln_final.weight": (weights.pop("final_layer_norm.weight"),),
        "ln_final.bias": (weights.pop("final_layer_norm.bias"),),
    }
    if "text_projection.weight" in weights:  # SDXL's second text encoder
        key_map["text_projection"] = (weights.pop("text_projection.weight"),)
    layers = sorted({int(key.split(".")[2]) for key in weights if key.startswith("encoder.layers.")})
    for index in layers:
        layer, block = f"encoder.layers.{index}.", f"transformer.resblocks.{index}."
        for kind in ("weight", "bias"):
            projections = (weights.pop(f"{layer}self_attn.{name}_proj.{kind}") for name in "qkv")
            key_map[f"{block}attn.in_proj_{kind}"] = tuple(projections)
            for part, open_clip_name in OPEN_CLIP_LAYER_PARTS.items():
                key_map[f"{block}{open_clip_name}.{kind}"] = (weights.pop(f"{layer}{part}.{kind}"),)
    if weights:
        raise SdpipeError(f"text encoder weights with no OpenCLIP equivalent: {', '.join(sorted(weights)[:3])}")
    return key_map


def open_clip_tensor(key: str, parts: list[torch.Tensor]) -> torch.Tensor:
    """The OpenCLIP tensor `key` from the transformers tensors that `open_clip_key_map` names for it, in order."""
    tensor = torch.cat(parts) if len(parts) > 1 else parts[0]
    return tensor.T if key in OPEN_CLIP_TRANSPOSED else tensor


def open_clip_part(key: str, tensor: torch.Tensor, index: int, count: int) -> torch.Tensor:
    """The reverse of `open_clip_tensor`: the `index`-th of the `count` transformers tensors OpenCLIP's `key` holds."""
    tensor = tensor.T if key in OPEN_CLIP_TRANSPOSED else tensor
    return tensor.chunk(count)[index] if count > 1 else tensor


def open_clip_text_encoder_to_original(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A text encoder (a transformers `CLIPTextModel` state dict: SD 2.x's; or SDXL's second,
    `CLIPTextModelWithProjection`) in the OpenCLIP layout of the original checkpoints, without the prefix
    (`cond_stage_model.model.`, `conditioner.embedders.1.model.`): fused q/k/v `attn.in_proj_weight`,
    `transformer.resblocks.N`, `ln_final`, `token_embedding`, `positional_embedding`, as diffusers' and ComfyUI's
    loaders read them; SDXL's `text_projection` as OpenCLIP keeps it ([width, projection], applied as
    `x @ text_projection`: the transpose of the linear layer's weight).

    SD 2.x's originals also hold the last of OpenCLIP's 24 layers, `text_projection` and `logit_scale`, which SD 2.x
    never uses (it conditions on the penultimate layer's output) and which a diffusers model does not have: they are
    left out, and loaders that build 24 layers leave the unused one as it is.
    """
    return {
        key: open_clip_tensor(key, [state_dict[name] for name in names])
        for key, names in open_clip_key_map(state_dict).items()
    }


def open_clip_projection_to_original(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SDXL's second text encoder (a transformers `CLIPTextModelWithProjection` state dict) in the OpenCLIP layout,
    without `conditioner.embedders.1.model.` (`open_clip_text_encoder_to_original`, `text_projection` included)."""
    if "text_projection.weight" not in state_dict:
        raise SdpipeError("SDXL's second text encoder has no text_projection.weight")
    return open_clip_text_encoder_to_original(state_dict)


def text_encoders_to_original(family: ModelFamily, text_encoders: list) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """The family's text encoders in original keys, each with its single-file prefix."""
    if family is SDXL:
        clip_l, open_clip_g = text_encoders
        return [
            (SDXL_CLIP_L_PREFIX, text_encoder_to_original(clip_l.state_dict())),
            (SDXL_OPEN_CLIP_PREFIX, open_clip_projection_to_original(open_clip_g.state_dict())),
        ]
    [text_encoder] = text_encoders
    if is_open_clip(text_encoder.config):
        return [(OPEN_CLIP_PREFIX, open_clip_text_encoder_to_original(text_encoder.state_dict()))]
    return [(TEXT_ENCODER_PREFIX, text_encoder_to_original(text_encoder.state_dict()))]


def pipeline_to_original(family: ModelFamily, unet, vae, text_encoders: list) -> dict[str, torch.Tensor]:
    """The whole single-file state dict of a UNet, VAE and the family's text encoders, with the original prefixes."""
    parts = [
        (UNET_PREFIX, unet_to_original(unet.state_dict(), unet.config)),
        (VAE_PREFIX, vae_to_original(vae.state_dict())),
        *text_encoders_to_original(family, text_encoders),
    ]
    return {prefix + key: tensor for prefix, converted in parts for key, tensor in converted.items()}


# --- files ---------------------------------------------------------------------------------------------


def save_single_file(
    pipeline_or_folder,
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Writes the UNet, VAE and text encoders as one original-layout `.safetensors` file, atomically (SD 1.x/2.x's
    layout, or SDXL's: `conditioner.embedders.0` and `.1` for its two text encoders).

    `pipeline_or_folder` is a pipeline object of a family's class (`StableDiffusionPipeline`,
    `StableDiffusionXLPipeline`) or a diffusers folder. `dtype` (a torch dtype or "fp32"/"fp16"/"bf16") casts the floating-point weights;
    `metadata` is stored in the safetensors header. Returns `path`.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise SdpipeError(f"single-file checkpoint {path}: expected a path ending in .safetensors")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise SdpipeError(f"single-file checkpoint {path}: metadata must map strings to strings, got {metadata!r}")
    cast_to = resolve_dtype(dtype)
    if isinstance(pipeline_or_folder, (str, Path)):
        models = load_folder_models(Path(pipeline_or_folder))
    else:
        pipeline = pipeline_or_folder
        family = pipeline_family(pipeline)
        models = family, pipeline.unet, pipeline.vae, [getattr(pipeline, name) for name in family.text_encoders]
    # The models' own tensors under original keys (no copies); each is cast and written one at a time, so the
    # write needs one tensor's memory beyond the models.
    state_dict = pipeline_to_original(*models)
    layout = {
        key: (tuple(tensor.shape), cast_to if cast_to is not None and tensor.is_floating_point() else tensor.dtype)
        for key, tensor in state_dict.items()
    }
    with atomic_path(path) as tmp:
        with SafetensorsWriter(tmp, layout, metadata) as writer:
            for key in writer.order:
                writer.write(key, state_dict[key].detach().to(device="cpu", dtype=layout[key][1]))
    return path


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise SdpipeError(f"single-file dtype {dtype!r}: expected one of {sorted(DTYPES)} or a torch dtype")
    return DTYPES[dtype]


def load_folder_models(folder: Path) -> tuple[ModelFamily, object, object, list]:
    """The family, UNet, VAE and text encoders of a diffusers Stable Diffusion (1.x/2.x or XL) folder."""
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    family = folder_family(folder, key=f"diffusers folder {folder}")
    needed = ("unet", "vae", *family.text_encoders)
    missing = [name for name in needed if not (folder / name / "config.json").is_file()]
    if missing:
        raise SdpipeError(f"diffusers folder {folder}: missing {', '.join(f'{m}/config.json' for m in missing)}")
    # each in the dtype its weights are stored in: diffusers would load fp16 weights as fp32 (twice the memory, and a
    # single file in fp32 that no one asked for)
    options = {"local_files_only": True, "use_safetensors": True}
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=component_dtype(folder / "unet"), **options)
    vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=component_dtype(folder / "vae"), **options)
    text_encoders = [
        getattr(transformers, class_name).from_pretrained(folder / name, dtype=component_dtype(folder / name), **options)
        for name, class_name in zip(family.text_encoders, family.text_encoder_classes)
    ]
    return family, unet, vae, text_encoders


def stored_dtype(paths: list[Path]) -> torch.dtype | None:
    """The dtype most floating-point tensors of the `.safetensors` files at `paths` are stored in (None: none).
    Read from the files' headers only."""
    dtypes = Counter()
    for path in paths:
        with safe_open(path, "pt") as weights:
            dtypes.update(SAFETENSORS_DTYPES.get(weights.get_slice(key).get_dtype()) for key in weights.keys())
    dtypes.pop(None, None)
    return dtypes.most_common(1)[0][0] if dtypes else None


def component_dtype(component_folder: Path) -> torch.dtype:
    """The dtype a diffusers component folder's weights are stored in."""
    dtype = stored_dtype(sorted(component_folder.glob("*.safetensors")))
    if dtype is None:
        raise SdpipeError(f"{component_folder}: no floating-point weights in a .safetensors file")
    return dtype


def load_single_file_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a `.safetensors` checkpoint (safetensors only: legacy pickled `.ckpt` is never read)."""
    path = Path(path)
    check_safetensors_file(path)
    return load_file(path)


def check_safetensors_file(path: Path) -> list[str]:
    """Reads and validates the safetensors header (a truncated or garbled file fails here); returns the keys."""
    if not path.is_file():
        raise SdpipeError(f"single-file checkpoint {path}: no such file")
    try:
        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    except SafetensorError as error:
        raise SdpipeError(
            f"single-file checkpoint {path}: not a valid .safetensors file ({error}); it may be truncated or "
            "corrupt, or a legacy pickled .ckpt (which sdpipe does not read)"
        ) from None


def load_single_file_pipeline(
    path: str | Path, config: str | Path, torch_dtype: torch.dtype | None = None, **components
):
    """The pipeline of an original-layout single file, in its family's class (`StableDiffusionPipeline`,
    `StableDiffusionXLPipeline`), without touching the network.

    What the user must pass to diffusers, and what this function passes:

        StableDiffusionPipeline.from_single_file(
            str(path), config=str(config), local_files_only=True, safety_checker=None,
            image_encoder=<None, or the folder's image encoder>, torch_dtype=torch_dtype)

    `config` is a local diffusers folder of the same architecture (the tiny world's, or a real SD 1.x
    folder): `model_index.json` and the `unet/`, `vae/`, `text_encoder/` configs give the architecture,
    `tokenizer/`, `scheduler/` and `feature_extractor/` are loaded from it, the UNet, VAE and text encoder
    weights come from the file. Without `config` diffusers guesses SD 1.5 from the keys and fetches its
    configs from the Hub (even with `local_files_only=True`). `original_config` (the LDM yaml) is not
    needed, and diffusers refuses it together with `config`.

    Components the file does not hold are taken from the folder only when their weights have diffusers'
    file names, so a transformers `image_encoder` (`model.safetensors`) fails with "Weights for this
    component appear to be missing" unless passed in: here it is loaded from `config/image_encoder` when
    that folder has weights, else None; `components` overrides any component. The loaded weights keep the
    model's default dtype (an fp16 file loads as fp32) unless `torch_dtype` is given.
    """
    import diffusers

    path, config = Path(path), Path(config)
    if not (config / "model_index.json").is_file():
        raise SdpipeError(
            f"base_model_config {config}: expected a local diffusers folder with model_index.json describing "
            f"the architecture of {path}"
        )
    keys = check_safetensors_file(path)
    family = single_file_family(keys)
    has_text_encoder = any(key.startswith(family.single_file_text_prefixes) for key in keys)
    for prefix, what in ((UNET_PREFIX, "UNet"), (VAE_PREFIX, "VAE")):
        if not any(key.startswith(prefix) for key in keys):
            raise SdpipeError(f"single-file checkpoint {path}: no {what} weights (keys starting with {prefix!r})")
    if not has_text_encoder and not set(family.text_encoders) <= set(components):
        # diffusers would fail later with a message about the config folder, not the file
        raise SdpipeError(
            f"single-file checkpoint {path}: no text encoder weights (keys {' or '.join(family.single_file_text_prefixes)})"
        )
    components = {**family.pipeline_kwargs, **components}
    if "image_encoder" not in components:
        components["image_encoder"] = load_image_encoder(config / "image_encoder", torch_dtype)
    pipeline_class = getattr(diffusers, family.pipeline_class)
    try:
        pipeline = pipeline_class.from_single_file(
            str(path), config=str(config), local_files_only=True, torch_dtype=torch_dtype, **components
        )
    except (ValueError, RuntimeError, KeyError) as error:
        mismatch = architecture_mismatch(error)
        if mismatch is None:
            raise
    else:
        missing = [
            f"{name}.{weight}"
            for name in ("unet", "vae", *family.text_encoders)
            for weight, tensor in getattr(pipeline, name).state_dict().items()
            if tensor.device.type == "meta"  # what the file did not provide stays on the meta device
        ]
        mismatch = f"weights missing from the file: {', '.join(missing[:3])}" if missing else None
    if mismatch:
        raise SdpipeError(
            f"single-file checkpoint {path} does not fit the architecture of base.base_model_config {config} "
            f"({mismatch}); it is another architecture or Stable Diffusion version than the config folder describes"
        )
    return pipeline


def architecture_mismatch(error: BaseException) -> str | None:
    """What a `from_single_file` error says about the file not fitting the config, or None."""
    from sdpipe.models.loading import shape_mismatch

    message = str(error)
    if "meta tensor" in message:
        return "weights the config needs are missing from the file"
    if isinstance(error, KeyError):
        return f"weight {message} is missing from the file"
    return shape_mismatch(message)


def load_image_encoder(folder: Path, torch_dtype: torch.dtype | None):
    """The CLIP image encoder saved in `folder` (IP-Adapter's), or None when there is none."""
    from transformers import CLIPVisionModelWithProjection

    if not ((folder / "config.json").is_file() and any(folder.glob("*.safetensors"))):
        return None  # pickled .bin weights are never read
    image_encoder = CLIPVisionModelWithProjection.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    return image_encoder.to(torch_dtype) if torch_dtype is not None else image_encoder
