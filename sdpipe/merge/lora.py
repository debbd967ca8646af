"""LoRA recipes of the merge stage: bake LoRAs into a model, extract a LoRA from two models, resize a LoRA.

A kohya LoRA names each layer by its diffusers module path (`sdpipe.formats.kohya`); a merge input names each
tensor by its original single-file key (`sdpipe.merge.sources`). `model_layers` joins the two through the
architecture's diffusers models, built on the meta device from their configs: for every linear and conv layer of
the UNet and the CLIP text encoder, its kohya name, the original key of its weight and the weight's shape.

- `lora_bake` (`LoraBaker`): a merge of one model input, W + Σ strength × ΔW, ΔW being what
  `kohya.delta_weights` makes of each LoRA layer (LoRA/LoCon, LoHa, LoKr, DoRA). The model is read and written
  one tensor at a time by `sdpipe.merge.recipe` like any merge; the LoRA files (small) are read whole.
- `lora_extract` (`extract_lora`): for each layer whose weight differs between two models, the truncated SVD of
  the difference as kohya `lora_down` / `lora_up` with alpha = rank (scale 1), reading one layer at a time.
- `lora_resize` (`resize_lora`): each layer's ΔW truncated to the new rank by SVD.

The truncated SVD is the best approximation of its rank (Eckart–Young), so extracting at rank r the difference
that a rank-r LoRA made gives that LoRA's update back, up to float rounding.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from sdpipe.errors import SdpipeError
from sdpipe.formats import kohya
from sdpipe.merge.output import meta_models
from sdpipe.merge.sources import COMPONENTS, original_keys
from sdpipe.methods.lora import LORA_FILE
from sdpipe.progress import track

LORA_COMPONENTS = ("unet", "text_encoder")
"""The models a kohya LoRA of SD 1.x/2.x adapts (`lora_unet_…`, `lora_te_…`)."""


@dataclass(frozen=True)
class ModelLayer:
    """A linear or conv layer of a model: the original-layout key of its weight, and the weight's shape."""

    key: str
    shape: tuple[int, ...]

    @property
    def is_spatial_conv(self) -> bool:
        """A conv with a kernel larger than 1x1: kohya's `conv_dim` layers (1x1 convs count as linear)."""
        return any(size > 1 for size in self.shape[2:])


def model_layers(config_folder: Path, key: str) -> dict[str, ModelLayer]:
    """Kohya name → `ModelLayer` of every linear and conv layer of the UNet and text encoder that the diffusers
    folder `config_folder` describes; `key` names the params key of the folder in errors."""
    models = meta_models(config_folder, key)
    layers = {}
    for component in LORA_COMPONENTS:
        model = models[component]
        paths = kohya.model_kohya_names(model, component)
        names_by_weight = {f"{path}.weight": name for name, path in paths.items()}
        try:
            weights = original_keys(component, list(names_by_weight), models["unet"].config)
        except SdpipeError as error:
            raise SdpipeError(f"{key} {config_folder}: {error}") from None
        prefix = COMPONENTS[component][0]
        for original, weight in weights.items():
            name = names_by_weight[weight]
            shape = tuple(model.get_submodule(paths[name]).weight.shape)
            layers[name] = ModelLayer(prefix + original, shape)
    return layers


# ---------------------------------------------------------------------------------------------------------
# LoRA inputs


def resolve_lora_source(source: str, *, train_dir: str | Path, key: str) -> Path:
    """The file of a LoRA input: `train:lora` is `<train_dir>/lora/model/lora.safetensors`, else a path."""
    if source.startswith(("train:", "train@")):
        method = source[len("train:") :]
        path = Path(train_dir) / method / "model" / LORA_FILE
        if not path.is_file():
            raise SdpipeError(
                f"{key} {source!r}: {path} does not exist; is {method} in train.methods, and has "
                f"`dvc repro train@{method}` run?"
            )
        return path
    path = Path(source).expanduser()
    if not path.is_file():
        raise SdpipeError(f"{key} {source!r}: no such file")
    return path


@dataclass(frozen=True)
class LoraFile:
    """A LoRA input of a recipe: where it comes from, and its tensors by kohya layer name and part."""

    role: str
    source: str
    path: Path
    layers: dict[str, dict[str, torch.Tensor]]
    metadata: dict[str, str]

    def where(self, key: str) -> str:
        """The input in error messages: `merge.recipes.x.inputs.loras[0] (train:lora: artifacts/...)`."""
        return f"{key}.inputs.{self.role} ({self.source}: {self.path})"

    def delta(self, name: str, shape: tuple[int, ...], key: str, weight: torch.Tensor | None = None) -> torch.Tensor:
        """ΔW (fp32) of layer `name` at strength 1, in the model weight's `shape`; DoRA layers need the `weight`."""
        parts = {f"{name}.{part}": tensor for part, tensor in self.layers[name].items()}
        try:
            delta = kohya.delta_weights(parts, None if weight is None else {name: weight})[name]
            return delta.reshape(shape)
        except ValueError as error:
            raise SdpipeError(f"{self.where(key)}: {error}") from None
        except RuntimeError as error:  # a reshape (or product) of the wrong size
            raise SdpipeError(
                f"{self.where(key)}: LoRA layer {name!r} does not fit the model's {list(shape)} weight ({error})"
            ) from None


def load_lora(role: str, source: str, path: Path, key: str) -> LoraFile:
    """Reads a kohya/LyCORIS `.safetensors` LoRA; `key` is the recipe's params key (errors name the input)."""
    where = f"{key}.inputs.{role} ({source}: {path})"
    try:
        tensors, metadata = kohya.load_kohya_lora(path)
    except (OSError, SafetensorError) as error:
        raise SdpipeError(f"{where}: not a readable .safetensors file: {error}") from None
    if not tensors:
        raise SdpipeError(f"{where}: the file holds no tensors")
    prefixes = tuple(f"{prefix}_" for prefix in kohya.PREFIXES.values())
    for name in sorted(tensors):
        if not name.startswith(prefixes) or "." not in name:
            raise SdpipeError(
                f"{where}: {name!r} is not a kohya LoRA key (`lora_unet_<layer>.<part>`, `lora_te_<layer>.<part>`); "
                "diffusers/PEFT-layout files (pytorch_lora_weights.safetensors) are not read: give the kohya file"
            )
    return LoraFile(role, source, path, kohya.group_by_layer(tensors), metadata)


def unknown_layer_error(lora: LoraFile, name: str, key: str, architecture: str) -> SdpipeError:
    return SdpipeError(
        f"{lora.where(key)}: LoRA layer {name!r} matches no linear or conv layer of {architecture} "
        "(a LoRA for another architecture, such as SD 2.x or SDXL?)"
    )


# ---------------------------------------------------------------------------------------------------------
# lora_bake


class LoraBaker:
    """The merger of `lora_bake`: given an original-layout key and the model's tensor (`{"model": W}`, fp32), returns
    W + strength × ΔW summed over every LoRA layer that adapts it; other tensors come back as they are.

    Each LoRA's update is taken against the model's own W (for DoRA, whose update depends on W), so the order of
    the LoRAs does not matter. Raises, before any work, naming the first LoRA layer that matches no model weight.
    """

    seed = None  # no randomness

    def __init__(
        self,
        recipe,
        loras: list[LoraFile],
        strengths: list[float],
        layers: dict[str, ModelLayer],
        model_keys: set[str],
        key: str,
    ):
        self.recipe = recipe
        self.key = key
        self.targets: dict[str, list[tuple[LoraFile, str, float]]] = {}
        for lora, strength in zip(loras, strengths, strict=True):
            for name in sorted(lora.layers):
                layer = layers.get(name)
                if layer is None or layer.key not in model_keys:
                    raise unknown_layer_error(lora, name, key, "the model's UNet or text encoder")
                self.targets.setdefault(layer.key, []).append((lora, name, strength))

    def __call__(self, key: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        weight = tensors["model"]
        if key not in self.targets:
            return weight
        baked = weight.clone()
        for lora, name, strength in self.targets[key]:
            baked += strength * lora.delta(name, tuple(weight.shape), self.key, weight)
        return baked

    def layer_counts(self) -> dict[str, int]:
        """How many layers of each LoRA input were baked in, by role."""
        counts: dict[str, int] = {}
        for targets in self.targets.values():
            for lora, _, _ in targets:
                counts[lora.role] = counts.get(lora.role, 0) + 1
        return counts


# ---------------------------------------------------------------------------------------------------------
# lora_extract and lora_resize


def low_rank(delta: torch.Tensor, rank: int, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], float]:
    """The kohya LoRA parts of the best rank-`rank` approximation of `delta` (truncated SVD, conv kernels
    flattened): `lora_down` [r, in(, kh, kw)], `lora_up` [out, r(, 1, 1)] and `alpha` = r, so the scale is 1, with
    r = min(rank, out, in·kh·kw); and the share of ‖delta‖ (Frobenius norm) that the approximation keeps."""
    u, s, vh = torch.linalg.svd(delta.float().flatten(1), full_matrices=False)
    rank = min(rank, s.numel())
    root = s[:rank].sqrt()  # the singular values split evenly between up and down: both stay well scaled in fp16
    up = (u[:, :rank] * root).reshape(delta.shape[0], rank, *[1] * (delta.dim() - 2))
    down = (root[:, None] * vh[:rank]).reshape(rank, *delta.shape[1:])
    total = s.square().sum()
    retained = (s[:rank].square().sum() / total).sqrt().item() if total > 0 else 1.0
    parts = {
        "lora_down.weight": down.to(dtype).contiguous(),
        "lora_up.weight": up.to(dtype).contiguous(),
        "alpha": torch.tensor(float(rank), dtype=dtype),
    }
    return parts, retained


def add_layer(tensors: dict, report: dict, name: str, parts: dict[str, torch.Tensor], retained: float) -> None:
    tensors.update({f"{name}.{part}": tensor for part, tensor in parts.items()})
    report[name] = {"rank": parts["lora_down.weight"].shape[0], "retained": round(retained, 6)}


def extract_lora(
    read_tuned: Callable[[str], torch.Tensor],
    read_base: Callable[[str], torch.Tensor],
    layers: dict[str, ModelLayer],
    *,
    rank: int,
    conv_rank: int,
    min_diff: float,
    dtype: torch.dtype,
) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """A kohya LoRA of tuned − base: its tensors, and per layer its rank and the share of the difference's norm it
    keeps (`low_rank`). `read_tuned` / `read_base` read one original-layout weight; `layers` are the layers to
    look at, by kohya name. A layer is left out when its rank is 0 (`conv_rank` 0 for spatial convs) or its
    largest absolute difference is at most `min_diff`. One layer is in memory at a time."""
    tensors: dict[str, torch.Tensor] = {}
    report: dict[str, dict] = {}
    for name in track(sorted(layers), "lora_extract"):
        layer = layers[name]
        layer_rank = conv_rank if layer.is_spatial_conv else rank
        if layer_rank == 0:
            continue
        delta = read_tuned(layer.key).float() - read_base(layer.key).float()
        if delta.abs().max().item() <= min_diff:
            continue
        add_layer(tensors, report, name, *low_rank(delta, layer_rank, dtype))
    return tensors, report


def resize_lora(
    lora: LoraFile, layers: dict[str, ModelLayer], *, rank: int, conv_rank: int, dtype: torch.dtype, key: str
) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """`lora` at another rank: each layer's ΔW (shaped as `layers` says) truncated by SVD; its tensors, and per
    layer its rank and the share of ΔW's norm it keeps. A LoRA layer keeps its rank when it is at most the new
    one; spatial conv layers get `conv_rank` (0 leaves them out). DoRA layers are refused (their update depends
    on the model's weights), and so is a layer that matches none of `layers`, before any work."""
    for name in sorted(lora.layers):
        if name not in layers:
            raise unknown_layer_error(lora, name, key, f"the architecture ({key}.config)")
        if "dora_scale" in lora.layers[name]:
            raise SdpipeError(
                f"{lora.where(key)}: layer {name!r} is DoRA (dora_scale), whose update depends on the model's "
                "weights; bake it into its model (lora_bake) and extract a LoRA from that (lora_extract) instead"
            )
    tensors: dict[str, torch.Tensor] = {}
    report: dict[str, dict] = {}
    for name in track(sorted(lora.layers), "lora_resize"):
        layer = layers[name]
        layer_rank = conv_rank if layer.is_spatial_conv else rank
        if layer_rank == 0:
            continue
        parts = lora.layers[name]
        if "lora_down.weight" in parts:
            layer_rank = min(layer_rank, parts["lora_down.weight"].shape[0])
        add_layer(tensors, report, name, *low_rank(lora.delta(name, layer.shape, key), layer_rank, dtype))
    return tensors, report


def lora_metadata(recipe, report: dict[str, dict], layers: dict[str, ModelLayer], base: dict[str, str]) -> dict:
    """kohya's `ss_*` keys of a LoRA written by `lora_extract` or `lora_resize` (over `base`, the input's own)."""
    conv_rank = recipe.rank if recipe.conv_rank is None else recipe.conv_rank
    has_convs = any(layers[name].is_spatial_conv for name in report)
    metadata = {key: value for key, value in base.items() if key != "ss_network_args"}
    comment = f"{recipe.method} by sdpipe (merge.recipes.{recipe.name})"
    if base.get("ss_training_comment"):
        comment += f"; {base['ss_training_comment']}"
    metadata.update(
        {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(recipe.rank),
            "ss_network_alpha": str(float(recipe.rank)),
            "ss_training_comment": comment,
            "sdpipe_merge_recipe": json.dumps(recipe.model_dump(mode="json"), sort_keys=True),
        }
    )
    if has_convs:
        metadata["ss_network_args"] = json.dumps({"conv_dim": str(conv_rank), "conv_alpha": str(float(conv_rank))})
    return metadata
