"""The kohya / A1111 / LyCORIS LoRA file format: layer names, peft adapters to file tensors, weight updates.

A LoRA file (`.safetensors`) holds, for every adapted layer, a few tensors named `<kohya name>.<part>`. The kohya
name is the layer's module path in the diffusers UNet or the CLIP text encoder, `.` replaced by `_`, behind a
prefix: `lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`,
`lora_te_text_model_encoder_layers_0_self_attn_q_proj`. Text encoder names always hold `text_model_`, although
transformers 5's `CLIPTextModel` has no `text_model` module any more (its paths start at `encoder.`).

The parts name the algorithm. With ΔW the update of the layer's weight at strength 1 and `alpha` the layer's
scalar tensor:

- LoRA / LoCon (kohya `networks.lora`): `lora_down.weight` [r, in(, kh, kw)] and `lora_up.weight`
  [out, r(, 1, 1)]; ΔW = up · down × alpha / r (a conv layer may have a Tucker core `lora_mid.weight`);
- LoHa (LyCORIS): `hada_w1_a` [out, r], `hada_w1_b` [r, in·kh·kw], `hada_w2_a`, `hada_w2_b`;
  ΔW = (w1_a · w1_b) ⊙ (w2_a · w2_b) × alpha / r (Tucker cores `hada_t1`, `hada_t2` for conv layers);
- LoKr (LyCORIS): `lokr_w1` or its factors `lokr_w1_a` · `lokr_w1_b`, and `lokr_w2` or `lokr_w2_a` · `lokr_w2_b`
  (with a Tucker core `lokr_t2`); ΔW = w1 ⊗ w2 × alpha / r, r being the inner size of the factors (w2's when
  both are factored). Without any factored matrix the scale is 1 and alpha is ignored;
- DoRA (any of the above, plus `dora_scale`): the updated weight is renormalized, W' = dora_scale × (W + ΔW) /
  ‖W + ΔW‖, the norm taken per output channel when `dora_scale` is [out, 1, …] (peft; LyCORIS `wd_on_output`)
  and per input channel when it is [1, in, …] (early LyCORIS); ΔW = W' − W then depends on W.

Those are the readers' conventions (A1111's built-in Lora extension, ComfyUI, LyCORIS; diffusers'
`load_lora_weights` reads plain LoRA). `peft_to_kohya` writes peft adapters in them (`LoraConfig` with or
without `use_dora`, `LoHaConfig`, `LoKrConfig`), `delta_weights` turns file tensors into weight updates,
`merge_lora` adds those to a model's weights and `save_kohya_lora` / `load_kohya_lora` write and read files.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from sdpipe.io import atomic_path, save_safetensors

PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
"""The kohya name prefix of each adapted component (diffusers pipeline attribute names)."""

TEXT_MODEL = "text_model"
LORA_PARTS = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")
LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
COMMON_PARTS = ("alpha", "dora_scale")
PEFT_WRAPPER_PREFIXES = ("base_model.model.", "_orig_mod.")


# ---------------------------------------------------------------------------------------------------------
# Names


def component_prefix(component: str) -> str:
    if component not in PREFIXES:
        raise ValueError(f"unknown component {component!r}; expected one of {', '.join(PREFIXES)}")
    return PREFIXES[component]


def kohya_name(component: str, module_path: str) -> str:
    """The kohya name of the layer at `module_path` of `component` (`unet`, `text_encoder`, `text_encoder_2`).

    `kohya_name("unet", "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0")` is
    `lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0`; text encoder paths get `text_model.`
    in front unless they have it (transformers < 5): `encoder.layers.0.self_attn.q_proj` →
    `lora_te_text_model_encoder_layers_0_self_attn_q_proj`.
    """
    prefix = component_prefix(component)
    path = module_path
    if component != "unet":
        path = f"{TEXT_MODEL}.{path.removeprefix(TEXT_MODEL + '.')}"
    return f"{prefix}_{path.replace('.', '_')}"


def kohya_names(component: str, module_paths: Iterable[str]) -> dict[str, str]:
    """Kohya name → module path, for the layers at `module_paths` (the reverse mapping: a kohya name alone cannot
    tell the underscores of `down_blocks` from the dots, so it is looked up among the model's own paths).

    Paths may end in `.weight` (state dict keys); that suffix is dropped.
    """
    names: dict[str, str] = {}
    for path in module_paths:
        path = path.removesuffix(".weight")
        name = kohya_name(component, path)
        if names.get(name, path) != path:
            raise ValueError(f"the module paths {names[name]!r} and {path!r} have the same kohya name {name!r}")
        names[name] = path
    return names


def model_kohya_names(model: torch.nn.Module, component: str) -> dict[str, str]:
    """Kohya name → module path of every linear and conv layer of `model` (a plain diffusers/transformers model)."""
    layers = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)
    return kohya_names(component, (path for path, module in model.named_modules() if isinstance(module, layers)))


def split_key(key: str) -> tuple[str, str]:
    """`lora_unet_conv_in.lora_down.weight` → (`lora_unet_conv_in`, `lora_down.weight`)."""
    name, dot, part = key.partition(".")
    if not dot:
        raise ValueError(f"{key!r} is not a kohya LoRA key (<name>.<part>)")
    return name, part


def group_by_layer(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{kohya name: {part: tensor}} of a file's tensors."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, part = split_key(key)
        layers.setdefault(name, {})[part] = tensor
    return layers


def component_tensors(tensors: Mapping[str, torch.Tensor], component: str) -> dict[str, torch.Tensor]:
    """The tensors of one component (`lora_te_…` for the text encoder; `lora_te2_…` is another component)."""
    prefix = component_prefix(component) + "_"
    return {key: tensor for key, tensor in tensors.items() if key.startswith(prefix)}


SDXL_TEXT_ENCODER_PREFIX = "lora_te1"
"""kohya's SDXL LoRA files call the first text encoder `lora_te1` (the second is `lora_te2`, as for any model)."""
SDXL_BASE_MODEL_VERSION = "sdxl_base_v1-0"
"""kohya's `ss_base_model_version` of SDXL LoRAs."""


def sdxl_unet_names(unet_paths: Iterable[str], unet_config: Mapping) -> dict[str, str]:
    """{kohya name by diffusers path: kohya SDXL name} of the UNet layers at `unet_paths`: kohya's SDXL files name the
    UNet's layers by their original (SGM) module paths, `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`
    where SD 1.x files have `lora_unet_down_blocks_1_attentions_0_…`."""
    from sdpipe.models.single_file import original_module_path

    return {
        kohya_name("unet", path): kohya_name("unet", original_module_path(path, unet_config))
        for path in (path.removesuffix(".weight") for path in unet_paths)
    }


def to_sdxl_names(tensors: Mapping[str, torch.Tensor], unet_names: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """A LoRA's tensors in kohya's SDXL names: the UNet's by `unet_names` (`sdxl_unet_names`), the first text
    encoder's as `lora_te1_…`."""
    renamed = {}
    for key, tensor in tensors.items():
        name, part = split_key(key)
        renamed[f"{to_sdxl_name(name, unet_names)}.{part}"] = tensor
    return renamed


def to_sdxl_name(name: str, unet_names: Mapping[str, str]) -> str:
    """One layer's kohya name in kohya's SDXL names (`to_sdxl_names`)."""
    if name.startswith(PREFIXES["text_encoder"] + "_"):
        name = SDXL_TEXT_ENCODER_PREFIX + name.removeprefix(PREFIXES["text_encoder"])
    return unet_names.get(name, name)


def from_sdxl_names(tensors: Mapping[str, torch.Tensor], unet_names: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """The reverse of `to_sdxl_names`: the names `merge_lora` looks up in diffusers models."""
    diffusers_names = {sdxl: name for name, sdxl in unet_names.items()}
    renamed = {}
    for key, tensor in tensors.items():
        name, part = split_key(key)
        if name.startswith(SDXL_TEXT_ENCODER_PREFIX + "_"):
            name = PREFIXES["text_encoder"] + name.removeprefix(SDXL_TEXT_ENCODER_PREFIX)
        renamed[f"{diffusers_names.get(name, name)}.{part}"] = tensor
    return renamed


# ---------------------------------------------------------------------------------------------------------
# peft adapters → kohya tensors


def peft_to_kohya(model: torch.nn.Module, component: str, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The kohya/LyCORIS tensors (fp32, CPU) of the peft adapter `adapter_name` in `model`, one of `PREFIXES`.

    Reads every peft LoRA (and DoRA), LoHa and LoKr layer; the file gives each layer the update that peft's
    `get_delta_weight` computes (LoKr layers without factored matrices carry their scale in `lokr_w1`).
    """
    from peft.tuners.loha import LoHaLayer
    from peft.tuners.lokr import LoKrLayer
    from peft.tuners.lora import LoraLayer

    tensors: dict[str, torch.Tensor] = {}
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            parts = lora_parts(module, adapter_name)
        elif isinstance(module, LoHaLayer) and adapter_name in module.hada_w1_a:
            parts = loha_parts(module, adapter_name)
        elif isinstance(module, LoKrLayer) and adapter_name in module.r:
            parts = lokr_parts(module, adapter_name)
        else:
            continue
        for prefix in PEFT_WRAPPER_PREFIXES:
            path = path.removeprefix(prefix)
        name = kohya_name(component, path)
        for part, tensor in parts.items():
            tensors[f"{name}.{part}"] = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()
    return tensors


def lora_parts(module, adapter: str) -> dict[str, torch.Tensor]:
    down = module.lora_A[adapter].weight
    up = module.lora_B[adapter].weight
    rank = down.shape[0]
    # peft's scaling is alpha / r (alpha / sqrt(r) with rsLoRA); the file's alpha gives the same scale.
    parts = {"lora_down.weight": down, "lora_up.weight": up, "alpha": alpha_tensor(module.scaling[adapter] * rank)}
    if module.use_dora.get(adapter, False):
        parts["dora_scale"] = output_axis_scale(module.lora_magnitude_vector[adapter].weight, module)
    return parts


def loha_parts(module, adapter: str) -> dict[str, torch.Tensor]:
    parts = {part: getattr(module, part)[adapter] for part in LOHA_PARTS if adapter in getattr(module, part)}
    parts["alpha"] = alpha_tensor(module.scaling[adapter] * module.r[adapter])
    return parts


def lokr_parts(module, adapter: str) -> dict[str, torch.Tensor]:
    parts = {part: getattr(module, part)[adapter] for part in LOKR_PARTS if adapter in getattr(module, part)}
    scale, rank = module.scaling[adapter], module.r[adapter]
    if "lokr_w1_a" in parts or "lokr_w2_a" in parts:
        parts["alpha"] = alpha_tensor(scale * rank)  # readers divide by the factors' inner size, which is r
    else:  # readers apply no scale to unfactored LoKr: it goes into w1
        parts["lokr_w1"] = parts["lokr_w1"] * scale
        parts["alpha"] = alpha_tensor(rank)
    return parts


def alpha_tensor(alpha: float) -> torch.Tensor:
    return torch.tensor(float(alpha), dtype=torch.float32)


def output_axis_scale(magnitude: torch.Tensor, module) -> torch.Tensor:
    """peft's DoRA magnitude ([out] for linear, [1, out, 1, 1] for conv layers) as a `dora_scale` [out, 1, …]."""
    weight = module.get_base_layer().weight
    return magnitude.reshape(weight.shape[0], *[1] * (weight.dim() - 1))


# ---------------------------------------------------------------------------------------------------------
# kohya tensors → weight updates


def delta_weights(
    tensors: Mapping[str, torch.Tensor], base_weights: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The weight update (fp32) each layer of a kohya/LyCORIS file gets at strength 1: {kohya name: ΔW}.

    `base_weights` ({kohya name: the layer's weight}) is needed for DoRA layers (their update depends on the
    weight) and gives every update its layer's shape; without it, conv updates of LoHa and LoKr come flat
    [out, in·kh·kw] (`delta.reshape(weight.shape)` fits them). Raises `ValueError` for a layer whose parts match
    no algorithm, or a DoRA layer without its base weight.
    """
    base_weights = base_weights or {}
    deltas = {}
    for name, parts in group_by_layer(tensors).items():
        base = base_weights.get(name)
        parts = {part: tensor.float() for part, tensor in parts.items()}
        delta = layer_delta(name, parts)
        if base is not None:
            delta = delta.reshape(base.shape)
        if "dora_scale" in parts:
            if base is None:
                raise ValueError(f"{name}: a DoRA layer (dora_scale); its update needs the layer's base weight")
            delta = dora_delta(delta, base.float(), parts["dora_scale"])
        deltas[name] = delta
    return deltas


def layer_delta(name: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """ΔW of one layer before any DoRA renormalization."""
    unknown = sorted(set(parts) - set(LORA_PARTS + LOHA_PARTS + LOKR_PARTS + COMMON_PARTS))
    if unknown:
        raise ValueError(f"{name}: unknown LoRA part(s) {', '.join(unknown)}")
    if "lora_down.weight" in parts:
        delta, rank = lora_delta(parts)
    elif "hada_w1_a" in parts:
        delta, rank = loha_delta(parts)
    elif "lokr_w1" in parts or "lokr_w1_a" in parts:
        delta, rank = lokr_delta(parts)
    else:
        raise ValueError(f"{name}: no LoRA, LoHa or LoKr weights (parts: {', '.join(sorted(parts))})")
    alpha = parts.get("alpha")
    scale = alpha.item() / rank if alpha is not None and rank is not None else 1.0
    return delta * scale


def lora_delta(parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    down, up = parts["lora_down.weight"], parts["lora_up.weight"]
    rank = down.shape[0]
    if "lora_mid.weight" in parts:  # Tucker: 1×1 down, kh×kw core, 1×1 up
        delta = torch.einsum("i j k l, p i, j r -> p r k l", parts["lora_mid.weight"], up.flatten(1), down.flatten(1))
    else:
        delta = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
    return delta, rank


def loha_delta(parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    w1a, w1b, w2a, w2b = (parts[part] for part in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    if "hada_t1" in parts:
        delta = tucker(parts["hada_t1"], w1a, w1b) * tucker(parts["hada_t2"], w2a, w2b)
    else:
        delta = (w1a @ w1b) * (w2a @ w2b)
    return delta, w1b.shape[0]


def lokr_delta(parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int | None]:
    rank = None
    if "lokr_w1" in parts:
        w1 = parts["lokr_w1"]
    else:
        w1, rank = parts["lokr_w1_a"] @ parts["lokr_w1_b"], parts["lokr_w1_b"].shape[0]
    if "lokr_w2" in parts:
        w2 = parts["lokr_w2"]
    elif "lokr_t2" in parts:
        w2, rank = tucker(parts["lokr_t2"], parts["lokr_w2_a"], parts["lokr_w2_b"]), parts["lokr_w2_b"].shape[0]
    else:
        w2, rank = parts["lokr_w2_a"] @ parts["lokr_w2_b"], parts["lokr_w2_b"].shape[0]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2), rank


def tucker(core: torch.Tensor, out_factor: torch.Tensor, in_factor: torch.Tensor) -> torch.Tensor:
    """A conv weight [out, in, kh, kw] from a Tucker core [r, r, kh, kw] and factors [r, out], [r, in]."""
    # contiguous: einsum may return a permuted view, which torch.kron (LoKr) cannot reshape
    return torch.einsum("i j k l, i p, j r -> p r k l", core, out_factor, in_factor).contiguous()


def dora_delta(delta: torch.Tensor, weight: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """W' − W for W' = dora_scale × (W + ΔW) / ‖W + ΔW‖, the norm on the axis `dora_scale`'s shape names."""
    updated = weight + delta
    ones = [1] * (weight.dim() - 1)
    if dora_scale.numel() == weight.shape[0] and dora_scale.shape[0] == weight.shape[0]:  # per output channel
        norm = updated.flatten(1).norm(dim=1).reshape(weight.shape[0], *ones)
    else:  # per input channel
        norm = updated.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, weight.shape[1], *ones[1:])
    return updated * (dora_scale.reshape(norm.shape) / norm) - weight


def merge_lora(
    model: torch.nn.Module, component: str, tensors: Mapping[str, torch.Tensor], strength: float = 1.0
) -> list[str]:
    """Adds `strength` × the update of each of `component`'s layers in `tensors` to `model`'s weights, in place.

    `model` is a plain diffusers UNet or transformers CLIP text encoder; tensors of other components are left out.
    Returns the kohya names merged. Raises `ValueError` when a name matches no layer of the model.
    """
    own = component_tensors(tensors, component)
    paths = model_kohya_names(model, component)
    names = sorted(group_by_layer(own))
    missing = [name for name in names if name not in paths]
    if missing:
        raise ValueError(
            f"{len(missing)} LoRA layer(s) match no layer of the {component}: {', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''} (a LoRA for another model architecture?)"
        )
    weights = {name: model.get_submodule(paths[name]).weight for name in names}
    with torch.no_grad():
        for name, delta in delta_weights(own, weights).items():
            weights[name].add_(delta.to(device=weights[name].device, dtype=weights[name].dtype), alpha=strength)
    return names


# ---------------------------------------------------------------------------------------------------------
# Files


def save_kohya_lora(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str]) -> None:
    """Writes `tensors` (kohya keys) with string `metadata` (`ss_*`, `modelspec.*`) to a `.safetensors` file,
    atomically and byte-for-byte reproducibly."""
    not_text = [key for key, value in metadata.items() if not isinstance(value, str)]
    if not_text:
        raise TypeError(f"safetensors metadata values must be strings; not so for {', '.join(not_text)}")
    for key in tensors:
        split_key(key)
    contiguous = {key: tensor.detach().cpu().contiguous() for key, tensor in tensors.items()}
    with atomic_path(path) as tmp:
        save_safetensors(contiguous, tmp, dict(metadata))


def load_kohya_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a kohya/LyCORIS `.safetensors` LoRA file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata() or {})
