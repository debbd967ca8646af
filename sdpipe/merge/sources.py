"""Merge inputs, read one tensor at a time under the keys of the original Stable Diffusion single-file layout.

An input is an original-layout `.safetensors` file (SD 1.x/2.x: `model.diffusion_model.*`, `first_stage_model.*`,
`cond_stage_model.*`; SDXL, the SGM layout: `conditioner.embedders.0.transformer.*` for CLIP ViT-L and
`conditioner.embedders.1.model.*` for OpenCLIP ViT-bigG instead of `cond_stage_model.*`) or a diffusers folder
(`unet/`, `vae/`, `text_encoder/` and SDXL's `text_encoder_2/` weights). Both are opened with
`safetensors.safe_open`, which reads a tensor only when asked for it: merging N models holds N tensors at a
time, not N models. A diffusers folder's keys are translated with the key maps of `sdpipe.models.single_file`
(the ones that write single files), so a folder and its single file read the same keys, shapes and values: SDXL's
`text_encoder_2/` is read in OpenCLIP's layout, its q/k/v projections joined into the fused `attn.in_proj_*` and
its `text_projection` transposed (`JoinedTensor`).

Keys outside the UNet, VAE and text encoders (EMA copies `model_ema.*`, schedule buffers such as
`alphas_cumprod`), the text encoder's `position_ids` buffer (present in some files, not in others) and SDXL's
OpenCLIP `logit_scale` (a training temperature that no diffusers model has) are not merge inputs and are skipped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open

from sdpipe.errors import SdpipeError
from sdpipe.families import SDXL, ModelFamily, folder_family, single_file_family
from sdpipe.models.loading import cached_snapshot, classify_model_source
from sdpipe.models.single_file import (
    OPEN_CLIP_PREFIX,
    SDXL_CLIP_L_PREFIX,
    SDXL_OPEN_CLIP_PREFIX,
    TEXT_ENCODER_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    check_safetensors_file,
    open_clip_key_map,
    open_clip_tensor,
    rename_keys,
    text_encoder_to_original,
    unet_to_original,
    vae_prefix_map,
)
from sdpipe.progress import log

MODEL_PREFIXES = (
    UNET_PREFIX, VAE_PREFIX, TEXT_ENCODER_PREFIX, OPEN_CLIP_PREFIX, SDXL_CLIP_L_PREFIX, SDXL_OPEN_CLIP_PREFIX
)
SKIPPED_SUFFIXES = (".position_ids",)
SKIPPED_KEYS = (SDXL_OPEN_CLIP_PREFIX + "logit_scale",)
REOPEN_AFTER_BYTES = 8 * 2**20
# {diffusers subfolder: (original prefix, weights file name without .safetensors)}
COMPONENTS = {
    "unet": (UNET_PREFIX, "diffusion_pytorch_model"),
    "vae": (VAE_PREFIX, "diffusion_pytorch_model"),
    "text_encoder": (TEXT_ENCODER_PREFIX, "model"),
}
SDXL_COMPONENTS = {
    "unet": (UNET_PREFIX, "diffusion_pytorch_model"),
    "vae": (VAE_PREFIX, "diffusion_pytorch_model"),
    "text_encoder": (SDXL_CLIP_L_PREFIX, "model"),
    "text_encoder_2": (SDXL_OPEN_CLIP_PREFIX, "model"),  # in OpenCLIP's layout (`open_clip_key_map`)
}

# The VAE mid-block attention's linear weights, stored as 1x1 convs in the original layout
VAE_ATTENTION_WEIGHT = re.compile(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def family_components(family: ModelFamily) -> dict[str, tuple[str, str]]:
    """The merged diffusers components of a family's folders and their single-file prefixes (`COMPONENTS`)."""
    return SDXL_COMPONENTS if family is SDXL else COMPONENTS


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor of a checkpoint is: its file and name there, and its shape in the original layout."""

    file: Path
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: F32, F16, BF16, ...

    @property
    def is_float(self) -> bool:
        return self.dtype in ("F64", "F32", "F16", "BF16")


@dataclass(frozen=True)
class JoinedTensor:
    """An original-layout tensor that a diffusers folder stores as several tensors or transposed (SDXL's OpenCLIP
    text encoder: `attn.in_proj_*` is q, k and v concatenated, `text_projection` the linear weight's transpose)."""

    key: str  # without the component prefix, as `single_file.open_clip_tensor` names it
    parts: tuple[StoredTensor, ...]
    shape: tuple[int, ...]

    @property
    def dtype(self) -> str:
        return self.parts[0].dtype

    @property
    def is_float(self) -> bool:
        return self.parts[0].is_float


class Checkpoint:
    """An input opened for reading tensor by tensor: `tensors` maps each original-layout key to where it is, and
    `family` is the model family of its keys.

    `safe_open` maps the whole file into memory, and every page read through the mapping counts towards the
    process's resident memory until the file is closed; so a file is closed and opened anew (one header parse)
    after every `REOPEN_AFTER_BYTES` read from it, which keeps a merge's peak RSS far below the inputs' size.
    """

    def __init__(self, path: Path, tensors: dict[str, StoredTensor | JoinedTensor], family: ModelFamily):
        self.path = path
        self.tensors = tensors
        self.family = family
        self.handles: dict[Path, object] = {}
        self.bytes_read: dict[Path, int] = {}

    @property
    def files(self) -> list[Path]:
        """The weight files read (to hash them)."""
        files = set()
        for stored in self.tensors.values():
            files.update(part.file for part in (stored.parts if isinstance(stored, JoinedTensor) else (stored,)))
        return sorted(files)

    def read(self, key: str) -> torch.Tensor:
        """One tensor (a copy, not a view of the file), in its stored dtype and original-layout shape."""
        stored = self.tensors[key]
        if isinstance(stored, JoinedTensor):
            tensor = open_clip_tensor(stored.key, [self.read_stored(part) for part in stored.parts])
            return tensor.contiguous().reshape(stored.shape)
        return self.read_stored(stored).reshape(stored.shape)

    def read_stored(self, stored: StoredTensor) -> torch.Tensor:
        if stored.file not in self.handles or self.bytes_read[stored.file] >= REOPEN_AFTER_BYTES:
            self.handles[stored.file] = safe_open(stored.file, framework="pt")
            self.bytes_read[stored.file] = 0
        tensor = self.handles[stored.file].get_tensor(stored.name)
        self.bytes_read[stored.file] += tensor.nbytes
        return tensor

    def close(self) -> None:
        self.handles.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- which model ---------------------------------------------------------------------------------------


def resolve_source(source: str, *, base_model: str, train_dir: str | Path, key: str) -> Path:
    """The folder or file of a recipe input: `base`, `train:<method>` or a path (`key` names it in errors)."""
    if source == "base":
        return model_path(base_model, "base.base_model")
    if source.startswith(("train:", "train@")):
        method = source[len("train:") :]
        model_dir = Path(train_dir) / method / "model"
        for candidate in (model_dir / "diffusers", model_dir / "model.safetensors"):
            if candidate.exists():
                return candidate
        raise SdpipeError(
            f"{key} {source!r}: {model_dir} has no whole-model checkpoint (diffusers/ or model.safetensors). Only "
            f"methods that train the whole model (dreambooth, finetune) can be merged: is {method} in train.methods, "
            f"and has `dvc repro train@{method}` run?"
        )
    return model_path(source, key)


def model_path(model: str, key: str) -> Path:
    """A diffusers folder, a .safetensors file, or the cached snapshot folder of a hub id."""
    if classify_model_source(model, key=key) == "hub":
        return cached_snapshot(model, key)
    return Path(model).expanduser()


def open_checkpoint(path: Path, key: str) -> Checkpoint:
    """Opens a diffusers folder or an original-layout .safetensors file; `key` names the input in errors."""
    if classify_model_source(str(path), key=key) == "folder":
        return open_diffusers_folder(path, key)
    return open_single_file(path, key)


def open_single_file(path: Path, key: str) -> Checkpoint:
    try:
        check_safetensors_file(path)
    except SdpipeError as error:
        raise SdpipeError(f"{key}: {error}") from None
    tensors, skipped = {}, 0
    with safe_open(path, framework="pt") as f:
        for name in f.keys():
            if not name.startswith(MODEL_PREFIXES) or name.endswith(SKIPPED_SUFFIXES) or name in SKIPPED_KEYS:
                skipped += 1
                continue
            tensor_slice = f.get_slice(name)
            tensors[name] = StoredTensor(path, name, tuple(tensor_slice.get_shape()), tensor_slice.get_dtype())
    if not any(name.startswith(UNET_PREFIX) for name in tensors):
        raise SdpipeError(
            f"{key} {path}: no UNet weights (keys starting with {UNET_PREFIX!r}); expected an SD 1.x/2.x or SDXL "
            "checkpoint in the original single-file layout"
        )
    if skipped:
        log(f"{key} {path}: skipped {skipped} tensors outside the UNet, VAE and text encoder (e.g. EMA copies)")
    return Checkpoint(path, tensors, single_file_family(tensors))


def open_diffusers_folder(folder: Path, key: str) -> Checkpoint:
    config_file = folder / "unet" / "config.json"
    if not config_file.is_file():
        raise SdpipeError(f"{key}: diffusers folder {folder} has no unet/config.json")
    family = folder_family(folder, key=key)
    unet_config = json.loads(config_file.read_text())
    tensors = {}
    for component, (prefix, stem) in family_components(family).items():
        stored = component_tensors(folder / component, stem, key)
        names = [name for name in stored if not name.endswith(SKIPPED_SUFFIXES)]
        try:
            original_names = original_keys(component, names, unet_config)
        except SdpipeError as error:
            raise SdpipeError(f"{key} {folder}: {error}") from None
        for original, parts in original_names.items():
            if component == "text_encoder_2":  # OpenCLIP's layout: joined or transposed
                meta_parts = [torch.empty(stored[name].shape, device="meta") for name in parts]
                shape = tuple(open_clip_tensor(original, meta_parts).shape)  # on the meta device: the shape only
                tensors[prefix + original] = JoinedTensor(original, tuple(stored[name] for name in parts), shape)
            else:
                [name] = parts
                tensors[prefix + original] = replace(
                    stored[name], shape=original_shape(prefix + original, stored[name].shape)
                )
    return Checkpoint(folder, tensors, family)


def component_tensors(folder: Path, stem: str, key: str) -> dict[str, StoredTensor]:
    """Every tensor of one component folder: `<stem>.safetensors`, a sharded index, or a lone variant file."""
    single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = sorted({folder / file for file in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
        if len(files) != 1:
            pickled = " (only pickled .bin weights, which sdpipe does not read)" if any(folder.glob("*.bin")) else ""
            raise SdpipeError(f"{key}: {folder} has no {stem}.safetensors{pickled}")
    stored = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                tensor_slice = f.get_slice(name)
                stored[name] = StoredTensor(file, name, tuple(tensor_slice.get_shape()), tensor_slice.get_dtype())
    return stored


# --- key maps --------------------------------------------------------------------------------------------


def original_keys(component: str, names: list[str], unet_config: dict) -> dict[str, tuple[str, ...]]:
    """{original key without the component prefix: the diffusers keys it is made of} for a component's diffusers
    keys: one each, except in SDXL's `text_encoder_2`, whose OpenCLIP layout joins q, k and v
    (`single_file.open_clip_key_map`)."""
    if component == "text_encoder_2":
        return open_clip_key_map(names)
    identity = {name: name for name in names}
    if component == "unet":
        renamed = unet_to_original(identity, unet_config)
    elif component == "vae":
        renamed = vae_original_keys(names)
    else:
        renamed = text_encoder_to_original(identity)
    return {original: (name,) for original, name in renamed.items()}


def vae_original_keys(names: list[str]) -> dict[str, str]:
    """`single_file.vae_to_original` for key names alone (the level and resnet counts come from the keys)."""
    levels = {int(m[1]) for name in names if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", name))}
    resnets = {int(m[1]) for name in names if (m := re.match(r"\w+\.\w+_blocks\.\d+\.resnets\.(\d+)\.", name))}
    prefixes = vae_prefix_map(num_levels=max(levels, default=-1) + 1, max_resnets=max(resnets, default=-1) + 1)
    return rename_keys({name: name for name in names}, prefixes, "VAE")


def original_shape(key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A diffusers tensor's shape in the original layout (the VAE attention's linears become 1x1 convs)."""
    if key.startswith(VAE_PREFIX) and VAE_ATTENTION_WEIGHT.search(key) and len(shape) == 2:
        return (*shape, 1, 1)
    return shape
