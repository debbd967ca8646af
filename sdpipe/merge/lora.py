"""LoRA recipes of the merge stage: bake LoRAs into a model, extract a LoRA from two models, resize a LoRA.

A kohya LoRA names each layer by its diffusers module path (`sdpipe.formats.kohya`); a merge input names each
tensor by its original single-file key (`sdpipe.merge.sources`). `model_layers` joins the two through the
architecture's diffusers models, built on the meta device from their configs: for every linear and conv layer of
the UNet and the text encoders, its kohya name, the original key of its weight and the weight's shape. SD 1.x/2.x
LoRAs name layers `lora_unet_<diffusers path>`, `lora_te_…`; SDXL's use kohya's SDXL names (`lora_unet_<original
module path>`, `lora_te1_…`, `lora_te2_…`), and a q, k or v layer of SDXL's second text encoder is a third of
OpenCLIP's fused `attn.in_proj_weight` in the model.

- `lora_bake` (`LoraBaker`): a merge of one model input, W + Σ strength × ΔW, ΔW being what
  `kohya.delta_weights` makes of each LoRA layer (LoRA/LoCon, LoHa, LoKr, DoRA). The model is read and written
  one tensor at a time by `sdpipe.merge.recipe` like any merge; the LoRA files (small) are read whole.
- `lora_extract` (`extract_lora`): for each layer whose weight differs between two models, the truncated SVD of
  the difference as kohya `lora_down` / `lora_up` with alpha = rank (scale 1), reading one layer at a time.
- `lora_resize` (`resize_lora`): each layer's ΔW truncated to the new rank by SVD, the SVD taken from the
  layer's low-rank factors (`layer_svd`) rather than from the dense ΔW.

The truncated SVD is the best approximation of its rank (Eckart–Young), so extracting at rank r the difference
that a rank-r LoRA made gives that LoRA's update back, up to float rounding.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from sdpipe.errors import SdpipeError
from sdpipe.families import SD, SDXL, ModelFamily, folder_family
from sdpipe.formats import kohya
from sdpipe.merge.output import meta_models, model_placements
from sdpipe.merge.sources import family_components
from sdpipe.methods.lora import LORA_FILE
from sdpipe.progress import track

SGM_UNET_BLOCKS = ("input_blocks", "middle_block", "output_blocks")
NOT_LORA_LAYERS = {"text_encoder_2": ("text_projection",)}
"""Linear layers that kohya's LoRA networks do not adapt (only the text encoders' attention and MLP layers)."""


@dataclass(frozen=True)
class ModelLayer:
    """A linear or conv layer of a model: the original-layout key of its weight, and the weight's shape. In SDXL's
    OpenCLIP text encoder, q, k and v are the `part`-th of the `parts` thirds of the fused `attn.in_proj_weight`."""

    key: str
    shape: tuple[int, ...]
    part: int = 0
    parts: int = 1

    @property
    def is_spatial_conv(self) -> bool:
        """A conv with a kernel larger than 1x1: kohya's `conv_dim` layers (1x1 convs count as linear)."""
        return any(size > 1 for size in self.shape[2:])

    def weight_of(self, tensor: torch.Tensor) -> torch.Tensor:
        """The layer's weight in the tensor at `key`: that tensor, or (a view of) its part."""
        return tensor.chunk(self.parts)[self.part] if self.parts > 1 else tensor


def model_layers(config_folder: Path, key: str) -> dict[str, ModelLayer]:
    """Kohya name → `ModelLayer` of every linear and conv layer of the UNet and text encoders that the diffusers
    folder `config_folder` describes (SDXL: kohya's SDXL names); `key` names the params key of the folder in errors."""
    family = folder_family(config_folder, key=key)
    models = meta_models(config_folder, key)
    unet_config = models["unet"].config
    layers = {}
    for component in ("unet", *family.text_encoders):
        model = models[component]
        paths = kohya.model_kohya_names(model, component)
        paths = {name: path for name, path in paths.items() if path not in NOT_LORA_LAYERS.get(component, ())}
        prefix = family_components(family)[component][0]
        places = model_placements(component, model, prefix, unet_config, f"{key} {config_folder}")
        if family is SDXL:  # kohya's SDXL names: the UNet's by their original module paths, `lora_te1_`
            unet_names = kohya.sdxl_unet_names(paths.values(), unet_config) if component == "unet" else {}
            paths = {kohya.to_sdxl_name(name, unet_names): path for name, path in paths.items()}
        for name, path in paths.items():
            place = places[f"{path}.weight"]
            layers[name] = ModelLayer(place.original, place.shape, place.part, place.parts)
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
    prefixes = tuple(f"{prefix}_" for prefix in (*kohya.PREFIXES.values(), kohya.SDXL_TEXT_ENCODER_PREFIX))
    for name in sorted(tensors):
        if not name.startswith(prefixes) or "." not in name:
            raise SdpipeError(
                f"{where}: {name!r} is not a kohya LoRA key (`lora_unet_<layer>.<part>`, `lora_te_<layer>.<part>`, "
                "SDXL's `lora_te1_`, `lora_te2_`); "
                "diffusers/PEFT-layout files (pytorch_lora_weights.safetensors) are not read: give the kohya file"
            )
    return LoraFile(role, source, path, kohya.group_by_layer(tensors), metadata)


def lora_family(lora: LoraFile) -> ModelFamily:
    """The family a kohya LoRA is for, from its names (kohya's SDXL files: `lora_te1_`, `lora_te2_`, UNet layers
    under their original `input_blocks`/`middle_block`/`output_blocks` paths) or `ss_base_model_version`."""
    sdxl_names = ("lora_te1_", "lora_te2_", *(f"lora_unet_{block}_" for block in SGM_UNET_BLOCKS))
    if any(name.startswith(sdxl_names) for name in lora.layers):
        return SDXL
    return SDXL if lora.metadata.get("ss_base_model_version", "").startswith("sdxl") else SD


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
        self.targets: dict[str, list[tuple[LoraFile, str, float, ModelLayer]]] = {}
        for lora, strength in zip(loras, strengths, strict=True):
            for name in sorted(lora.layers):
                layer = layers.get(name)
                if layer is None or layer.key not in model_keys:
                    raise unknown_layer_error(lora, name, key, "the model's UNet or text encoders")
                self.targets.setdefault(layer.key, []).append((lora, name, strength, layer))

    def __call__(self, key: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        weight = tensors["model"]
        if key not in self.targets:
            return weight
        baked = weight.clone()
        for lora, name, strength, layer in self.targets[key]:
            layer_weight = layer.weight_of(weight)
            layer.weight_of(baked).add_(strength * lora.delta(name, tuple(layer_weight.shape), self.key, layer_weight))
        return baked

    def layer_counts(self) -> dict[str, int]:
        """How many layers of each LoRA input were baked in, by role."""
        counts: dict[str, int] = {}
        for targets in self.targets.values():
            for lora, _, _, _ in targets:
                counts[lora.role] = counts.get(lora.role, 0) + 1
        return counts


# ---------------------------------------------------------------------------------------------------------
# lora_extract and lora_resize


def low_rank(delta: torch.Tensor, rank: int, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], float]:
    """The kohya LoRA parts of the best rank-`rank` approximation of `delta` (truncated SVD, conv kernels
    flattened): `lora_down` [r, in(, kh, kw)], `lora_up` [out, r(, 1, 1)] and `alpha` = r, so the scale is 1, with
    r = min(rank, out, in·kh·kw); and the share of ‖delta‖ (Frobenius norm) that the approximation keeps."""
    u, s, vh = torch.linalg.svd(delta.float().flatten(1), full_matrices=False)
    return svd_parts(u, s, vh, rank, tuple(delta.shape), dtype)


def svd_parts(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int, shape: tuple[int, ...], dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], float]:
    """`low_rank`'s parts and kept share from an SVD u·diag(s)·vh of a weight of `shape` flattened to
    [out, in·kh·kw]; `s` sorted in descending order and holding every non-zero singular value."""
    rank = min(rank, s.numel())
    root = s[:rank].sqrt()  # the singular values split evenly between up and down: both stay well scaled in fp16
    up = (u[:, :rank] * root).reshape(shape[0], rank, *[1] * (len(shape) - 2))
    down = (root[:, None] * vh[:rank]).reshape(rank, *shape[1:])
    total = s.square().sum()
    retained = (s[:rank].square().sum() / total).sqrt().item() if total > 0 else 1.0
    parts = {
        "lora_down.weight": down.to(dtype).contiguous(),
        "lora_up.weight": up.to(dtype).contiguous(),
        "alpha": torch.tensor(float(rank), dtype=dtype),
    }
    return parts, retained


# The SVD of a LoRA layer's update from its factors. A full SVD of a dense update costs O(out·n·min(out, n))
# (n = in·kh·kw; seconds for SD's 1280×11520 convs); an update of rank k given as a product A·B ([out, k] @
# [k, n]) has the SVD Qa·(U S Vh)·Qbᵀ, from QR decompositions A = Qa·Ra, Bᵀ = Qb·Rb and the SVD of the small
# k×k core Ra·Rbᵀ = U S Vh, in O((out + n)·k²). LoRA/LoCon updates are such products; a LoHa update
# (A1·B1) ∘ (A2·B2) is one of rank ≤ k1·k2, (A1 ⊙ A2)·(B1 ⊙ B2) with row-wise and column-wise Khatri–Rao
# products; a LoKr update W1 ⊗ W2 has the SVD (U1 ⊗ U2)(S1 ⊗ S2)(V1 ⊗ V2)ᵀ of its small factors' SVDs.


def product_svd(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD (u, s, vh; s descending) of a @ b, a [out, k] and b [k, n], through QR when k is the smaller."""
    if a.shape[1] >= min(a.shape[0], b.shape[1]):  # no thinner than the product: its SVD is as cheap
        return torch.linalg.svd(a @ b, full_matrices=False)
    qa, ra = torch.linalg.qr(a)
    qb, rb = torch.linalg.qr(b.T)
    u, s, vh = torch.linalg.svd(ra @ rb.T)
    return qa @ u, s, vh @ qb.T


def kronecker_svd(
    first: tuple[torch.Tensor, torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SVD of W1 ⊗ W2 from the SVDs of W1 and W2: every pair of singular vectors, sorted by s1·s2."""
    (u1, s1, vh1), (u2, s2, vh2) = first, second
    s, order = torch.sort(torch.outer(s1, s2).flatten(), descending=True)
    i, j = order // s2.numel(), order % s2.numel()
    u = (u1[:, i].unsqueeze(1) * u2[:, j].unsqueeze(0)).reshape(u1.shape[0] * u2.shape[0], -1)
    vh = (vh1[i].unsqueeze(2) * vh2[j].unsqueeze(1)).reshape(-1, vh1.shape[1] * vh2.shape[1])
    return u, s, vh


def tucker_factors(core: torch.Tensor, out_factor: torch.Tensor, in_factor: torch.Tensor):
    """`kohya.tucker`'s conv weight (core [r, r, kh, kw], factors [r, out], [r, in]) flattened, as A @ B."""
    return out_factor.T, torch.einsum("i j k l, j r -> i r k l", core, in_factor).flatten(1)


def layer_svd(parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The SVD of the update `kohya.layer_delta` makes of a LoRA/LoCon, LoHa or LoKr layer's parts (fp32),
    flattened to [out, in·kh·kw], from its factors; None for parts of another kind (the caller goes dense)."""
    if "lora_down.weight" in parts:
        up, down = parts["lora_up.weight"].flatten(1), parts["lora_down.weight"]
        rank = down.shape[0]
        if "lora_mid.weight" in parts:  # Tucker: 1×1 down, kh×kw core, 1×1 up
            a, b = up, torch.einsum("i j k l, j r -> i r k l", parts["lora_mid.weight"], down.flatten(1)).flatten(1)
        else:
            a, b = up, down.flatten(1)
        return product_svd(a * layer_scale(parts, rank), b)
    if "hada_w1_a" in parts:
        if "hada_t1" in parts:
            a1, b1 = tucker_factors(parts["hada_t1"], parts["hada_w1_a"], parts["hada_w1_b"])
            a2, b2 = tucker_factors(parts["hada_t2"], parts["hada_w2_a"], parts["hada_w2_b"])
        else:
            a1, b1, a2, b2 = (parts[part].flatten(1) for part in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        a = (a1.unsqueeze(2) * a2.unsqueeze(1)).flatten(1)  # row p: a1[p] ⊗ a2[p]
        b = (b1.unsqueeze(1) * b2.unsqueeze(0)).flatten(0, 1)  # column q: b1[:, q] ⊗ b2[:, q]
        return product_svd(a * layer_scale(parts, parts["hada_w1_b"].shape[0]), b)
    if "lokr_w1" in parts or "lokr_w1_a" in parts:
        rank = None
        if "lokr_w1" in parts:
            w1 = parts["lokr_w1"]
            if w1.dim() > 2 and w1.shape[2:].numel() > 1:
                return None
            first = torch.linalg.svd(w1.flatten(1), full_matrices=False)
        else:
            rank = parts["lokr_w1_b"].shape[0]
            first = product_svd(parts["lokr_w1_a"], parts["lokr_w1_b"])
        if "lokr_w2" in parts:
            second = torch.linalg.svd(parts["lokr_w2"].flatten(1), full_matrices=False)
        else:
            rank = parts["lokr_w2_b"].shape[0]
            if "lokr_t2" in parts:
                second = product_svd(*tucker_factors(parts["lokr_t2"], parts["lokr_w2_a"], parts["lokr_w2_b"]))
            else:
                second = product_svd(parts["lokr_w2_a"], parts["lokr_w2_b"].flatten(1))
        scale = layer_scale(parts, rank)
        u1, s1, vh1 = first
        first = (u1 * (1.0 if scale >= 0 else -1.0), s1 * abs(scale), vh1)
        return kronecker_svd(first, second)
    return None


def layer_scale(parts: dict[str, torch.Tensor], rank: int | None) -> float:
    """alpha / rank, the factor `kohya.layer_delta` applies (1 without alpha or rank)."""
    alpha = parts.get("alpha")
    return alpha.item() / rank if alpha is not None and rank is not None else 1.0


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
        delta = layer.weight_of(read_tuned(layer.key)).float() - layer.weight_of(read_base(layer.key)).float()
        if delta.abs().max().item() <= min_diff:
            continue
        add_layer(tensors, report, name, *low_rank(delta, layer_rank, dtype))
    return tensors, report


def resize_lora(
    lora: LoraFile, layers: dict[str, ModelLayer], *, rank: int, conv_rank: int, dtype: torch.dtype, key: str
) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """`lora` at another rank: each layer's ΔW (shaped as `layers` says) truncated by SVD; its tensors, and per
    layer its rank and the share of ΔW's norm it keeps. A layer keeps its rank when it is at most the new one (a
    LoRA's rank, r1·r2 for LoHa); spatial conv layers get `conv_rank` (0 leaves them out). DoRA layers are
    refused (their update depends on the model's weights), and so is a layer that matches none of `layers`,
    before any work."""
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
        add_layer(tensors, report, name, *resize_layer(lora, name, layer.shape, layer_rank, dtype, key))
    return tensors, report


def resize_layer(
    lora: LoraFile, name: str, shape: tuple[int, ...], rank: int, dtype: torch.dtype, key: str
) -> tuple[dict[str, torch.Tensor], float]:
    """`low_rank` of one LoRA layer's update (`shape`: the model weight's), its SVD taken from the layer's factors
    (`layer_svd`), so its rank is at most the update's own (a LoRA's rank; r1·r2 for LoHa)."""
    parts = {part: tensor.float() for part, tensor in lora.layers[name].items()}
    known = kohya.LORA_PARTS + kohya.LOHA_PARTS + kohya.LOKR_PARTS + kohya.COMMON_PARTS
    try:
        svd = layer_svd(parts) if set(parts) <= set(known) else None
    except (RuntimeError, KeyError):  # parts that do not fit together: the dense update names the problem
        svd = None
    if svd is None:
        return low_rank(lora.delta(name, shape, key), rank, dtype)
    u, s, vh = svd
    if u.shape[0] != shape[0] or vh.shape[1] != math.prod(shape[1:]):
        raise SdpipeError(
            f"{lora.where(key)}: LoRA layer {name!r} does not fit the model's {list(shape)} weight (its update is "
            f"[{u.shape[0]}, {vh.shape[1]}] flattened)"
        )
    return svd_parts(u, s, vh, rank, shape, dtype)


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
