"""Hypernetworks (A1111, after NovelAI): small MLPs that transform what the UNet's attention keys and values come from.

For each context width (768 for SD 1.x, 1024 for SD 2.x) the hypernetwork holds two MLPs, one for the keys and one
for the values; each cross-attention computes its K and V from the transformed context

    context_k = context + mlp_k(context) × strength,   context_v = context + mlp_v(context) × strength

and its queries as before. The UNet and the text encoder stay frozen; only the MLPs train.

1. `setup` builds the MLPs of the UNet's cross-attention width exactly as A1111's `HypernetworkModule` does (the
   same `torch.nn.Sequential` of Linear, activation, LayerNorm and Dropout layers, so the same state-dict keys, and
   the same weight initializations), registers them as the UNet's `hypernetwork` submodule (so that they train,
   and are checkpointed, with it) and puts `HypernetworkAttnProcessor` on every attention layer of that width: the
   cross-attention (`attn2`) layers and, as in A1111, any self-attention layer as wide as the text context. With
   `self_attention`, MLPs for the self-attention widths train too (A1111's `Modules` 320, 640, 1280 on SD 1.x).
2. The training core (`sdpipe.training`) runs the diffusion loss on the captions as they are: the default
   `outlined` dataset teaches a style to every prompt, with no trigger word.
3. `save` writes `hypernetwork.pt` in A1111's layout, the only file of the model folder: {context width (int):
   (K state dict, V state dict)} plus `layer_structure`, `activation_func`, `is_layer_norm`, ... It loads with
   `torch.load(weights_only=True)`, and A1111 and ComfyUI load it from `models/hypernetworks/` as it is (params
   allow only the activations and layouts that both rebuild the same way). There is no `.safetensors` copy: A1111
   lists only `.pt` hypernetworks, and ComfyUI lists `.safetensors` ones too but reads them as flat tensor names,
   finds no integer context-width key in any layout a `.safetensors` file can hold, and silently applies nothing.

At sampling time `sampling_pipeline` reads `hypernetwork.pt` back (its own settings, not params', decide the MLPs:
any A1111 hypernetwork file works) and applies it at `train.hypernetwork.strength` by A1111's rule: every attention
layer gets the MLPs of the width of what its K and V come from, when the file has them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from sdpipe.config.caption import CaptionOps
from sdpipe.config.train import HypernetworkParams
from sdpipe.errors import SdpipeError
from sdpipe.formats.a1111 import checkpoint_hash
from sdpipe.formats.pickled import load_pickled
from sdpipe.models.loading import load_pipeline
from sdpipe.training import Models, TrainingMethod, run_training

A1111_FILE = "hypernetwork.pt"
NAME = "hypernetwork"  # A1111 names a hypernetwork after its file
# A1111's names; "swish" is its name for Hardswish. Any other is a torch.nn activation class, lowercased (`gelu`):
# A1111 files may hold any of them; what sdpipe trains is limited to those ComfyUI loads too (HypernetworkParams).
ACTIVATIONS = {"linear": torch.nn.Identity, "swish": torch.nn.Hardswish}


def train(params, out_dir: Path) -> dict:
    """The `train@hypernetwork` stage: trains the MLPs, writes `<out_dir>/model/hypernetwork.pt`."""
    method = HypernetworkTraining(params.train.hypernetwork, base_model=params.base.base_model)
    return run_training(params, method, out_dir)


def sampling_pipeline(params, model_dir: Path, device: torch.device):
    """The base pipeline with the hypernetwork of `model_dir/hypernetwork.pt` on its cross-attention, at
    `train.hypernetwork.strength`, and the trigger word of the concept prompts (a hypernetwork has none of its own)."""
    pipeline = load_pipeline(params.base.base_model, params.base.base_model_config, device=device)
    path = Path(model_dir) / A1111_FILE
    hypernetwork = load_hypernetwork(path).to(device).eval()
    apply_hypernetwork(pipeline.unet, hypernetwork, params.train.hypernetwork.strength, source=str(path))
    return pipeline, params.evaluate.trigger


@dataclass(frozen=True)
class Architecture:
    """What shapes A1111's MLPs: the settings its `.pt` files keep beside the weights."""

    layer_structure: tuple[float, ...]
    activation_func: str
    add_layer_norm: bool
    activate_output: bool
    use_dropout: bool
    dropout_structure: tuple[float, ...]
    weight_initialization: str

    @classmethod
    def from_params(cls, params: HypernetworkParams) -> Architecture:
        layers = tuple(params.layer_structure)
        if not params.use_dropout:
            dropout = (0.0,) * len(layers)
        elif params.dropout_structure is None:
            dropout = (0.0,) + (0.3,) * (len(layers) - 2) + (0.0,)  # A1111's legacy default: 0.3 after hidden layers
        else:
            dropout = tuple(params.dropout_structure)
        return cls(
            layers, params.activation_func, params.add_layer_norm, params.activate_output, params.use_dropout, dropout,
            params.weight_initialization,
        )

    @classmethod
    def from_file(cls, data: dict) -> Architecture:
        """The settings of an A1111 file, with the defaults A1111 assumes for keys that older files lack."""
        layers = tuple(data.get("layer_structure") or (1, 2, 1))
        use_dropout = bool(data.get("use_dropout", False))
        dropout = data.get("dropout_structure")
        if dropout is None:
            dropout = legacy_dropout_structure(layers, use_dropout, bool(data.get("last_layer_dropout", False)))
        return cls(
            layers, data.get("activation_func") or "linear", bool(data.get("is_layer_norm", False)),
            bool(data.get("activate_output", True)), use_dropout or any(dropout), tuple(dropout),
            data.get("weight_initialization") or "Normal",
        )

    def file_settings(self) -> dict:
        """The settings as A1111 writes them into its files."""
        return {
            "layer_structure": list(self.layer_structure),
            "activation_func": self.activation_func,
            "is_layer_norm": self.add_layer_norm,
            "weight_initialization": self.weight_initialization,
            "activate_output": self.activate_output,
            "use_dropout": self.use_dropout,
            "dropout_structure": list(self.dropout_structure),
            "last_layer_dropout": self.dropout_structure[-2] != 0,
        }


def legacy_dropout_structure(layers: tuple[float, ...], use_dropout: bool, last_layer_dropout: bool) -> list[float]:
    """The dropout of A1111 files written before `dropout_structure` existed (A1111's `parse_dropout_structure`)."""
    if not use_dropout:
        return [0.0] * len(layers)
    return [0.0] + [0.3] * (len(layers) - 3) + [0.3 if last_layer_dropout else 0.0] + [0.0]


def activation_class(name: str) -> type[torch.nn.Module]:
    """The torch module class of an A1111 activation name."""
    if name in ACTIVATIONS:
        return ACTIVATIONS[name]
    module = torch.nn.modules.activation
    classes = {cls.__name__.lower(): cls for cls in vars(module).values()
               if isinstance(cls, type) and cls.__module__ == module.__name__}
    if name not in classes:
        raise ValueError(f"unknown activation_func {name!r}")
    return classes[name]


class HypernetworkMLP(torch.nn.Module):
    """One MLP of A1111's `HypernetworkModule`: `linear` is the same Sequential, so the state-dict keys match
    (`linear.0.weight`, ...). `forward` returns the MLP's output; the residual and the strength are the caller's."""

    def __init__(self, dim: int, architecture: Architecture):
        super().__init__()
        layers, dropout = architecture.layer_structure, architecture.dropout_structure
        activation = architecture.activation_func
        modules: list[torch.nn.Module] = []
        for i in range(len(layers) - 1):
            modules.append(torch.nn.Linear(int(dim * layers[i]), int(dim * layers[i + 1])))
            last = i == len(layers) - 2
            if activation != "linear" and (architecture.activate_output or not last):
                modules.append(activation_class(activation)())
            if architecture.add_layer_norm:
                modules.append(torch.nn.LayerNorm(int(dim * layers[i + 1])))
            if dropout[i + 1] > 0:
                modules.append(torch.nn.Dropout(p=dropout[i + 1]))
        self.linear = torch.nn.Sequential(*modules)

    def initialize(self, weight_initialization: str, activation: str) -> None:
        """A1111's initializations; LayerNorms (their weights too) always start from N(0, 0.01), as in A1111."""
        nonlinearity = "leaky_relu" if activation == "leakyrelu" else "relu"
        for layer in self.linear:
            if not isinstance(layer, (torch.nn.Linear, torch.nn.LayerNorm)):
                continue
            torch.nn.init.zeros_(layer.bias)
            if weight_initialization == "Normal" or isinstance(layer, torch.nn.LayerNorm):
                torch.nn.init.normal_(layer.weight, mean=0.0, std=0.01)
            elif weight_initialization == "XavierUniform":
                torch.nn.init.xavier_uniform_(layer.weight)
            elif weight_initialization == "XavierNormal":
                torch.nn.init.xavier_normal_(layer.weight)
            elif weight_initialization == "KaimingUniform":
                torch.nn.init.kaiming_uniform_(layer.weight, nonlinearity=nonlinearity)
            elif weight_initialization == "KaimingNormal":
                torch.nn.init.kaiming_normal_(layer.weight, nonlinearity=nonlinearity)
            else:
                raise ValueError(f"unknown weight_initialization {weight_initialization!r}")

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        return self.linear(context)


class Hypernetwork(torch.nn.Module):
    """The K and V MLPs of each context width (`mlps["768"]` = [K, V])."""

    def __init__(self, dims: list[int], architecture: Architecture):
        super().__init__()
        self.architecture = architecture
        self.mlps = torch.nn.ModuleDict(
            {str(dim): torch.nn.ModuleList([HypernetworkMLP(dim, architecture) for _ in "kv"]) for dim in dims}
        )

    @property
    def dims(self) -> list[int]:
        return [int(dim) for dim in self.mlps]

    def initialize(self) -> None:
        for pair in self.mlps.values():
            for mlp in pair:
                mlp.initialize(self.architecture.weight_initialization, self.architecture.activation_func)


class HypernetworkAttnProcessor:
    """diffusers' `AttnProcessor2_0` with the hypernetwork's MLPs on the context of K and V:
    K = to_k(context + mlp_k(context) × strength), V likewise; Q is unchanged.

    A plain object, not a module: several layers share one pair of MLPs, which the UNet holds once (its `hypernetwork`).
    """

    def __init__(self, mlp_k: HypernetworkMLP, mlp_v: HypernetworkMLP, strength: float = 1.0):
        self.mlp_k, self.mlp_v, self.strength = mlp_k, mlp_v, strength

    def transform(self, mlp: HypernetworkMLP, context: torch.Tensor) -> torch.Tensor:
        # The MLP runs in its own precision (fp32 beside an fp16 UNet, as in A1111).
        dtype = mlp.linear[0].weight.dtype
        return context + mlp(context.to(dtype)).to(context.dtype) * self.strength

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, sequence_length, _ = context.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            context = hidden_states  # after the group norm, as in AttnProcessor2_0
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key = attn.to_k(self.transform(self.mlp_k, context))
        value = attn.to_v(self.transform(self.mlp_v, context))

        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # linear projection, dropout

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def attention_layers(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The UNet's attention layers by processor name (`<module path>.processor`)."""
    return {name: unet.get_submodule(name.removesuffix(".processor")) for name in unet.attn_processors}


def context_width(attention: torch.nn.Module) -> int:
    """The width of what an attention layer computes K and V from: the text context for cross-attention, the image
    features for self-attention (A1111 picks a hypernetwork's MLPs by this width, whatever the layer)."""
    return attention.to_k.in_features


def cross_attention_dims(unet: torch.nn.Module) -> list[int]:
    """The widths of the context that the UNet's cross-attention layers take (one for Stable Diffusion)."""
    return sorted({context_width(layer) for layer in attention_layers(unet).values() if layer.is_cross_attention})


def self_attention_dims(unet: torch.nn.Module) -> list[int]:
    """The widths of the UNet's self-attention layers (320, 640 and 1280 for SD 1.x: A1111's other `Modules`)."""
    return sorted({context_width(layer) for layer in attention_layers(unet).values() if not layer.is_cross_attention})


def apply_hypernetwork(
    unet: torch.nn.Module, hypernetwork: Hypernetwork, strength: float = 1.0, source: str = "the hypernetwork"
) -> None:
    """Makes the UNet hold `hypernetwork` (as its `hypernetwork` submodule) and apply it, at `strength`, as A1111
    does: to every attention layer whose context width it has MLPs for (the cross-attention's 768 for SD 1.x; self-
    attention layers too, for the widths of theirs it has). The other attention processors stay as they are.
    `source` names the hypernetwork in errors."""
    layers = attention_layers(unet)
    widths = sorted({context_width(layer) for layer in layers.values()})
    if not set(widths) & set(hypernetwork.dims):
        raise SdpipeError(
            f"{source} is for context widths {hypernetwork.dims} but the attention layers of base.base_model "
            f"take {widths}: it was made for another base model"
        )
    unet.hypernetwork = hypernetwork
    processors = dict(unet.attn_processors)
    for name, attention in layers.items():
        width = str(context_width(attention))
        if width in hypernetwork.mlps:
            mlp_k, mlp_v = hypernetwork.mlps[width]
            processors[name] = HypernetworkAttnProcessor(mlp_k, mlp_v, strength)
    unet.set_attn_processor(processors)


class HypernetworkTraining(TrainingMethod):
    """Trains the hypernetwork's MLPs on the frozen UNet's attention layers; saves an A1111 hypernetwork."""

    name = "hypernetwork"
    trained_models = ("unet",)  # the MLPs are a UNet submodule: accelerate prepares and checkpoints them with it

    def __init__(self, params: HypernetworkParams, base_model: str):
        super().__init__(params)
        self.base_model = base_model

    def setup(self, models: Models) -> None:
        """Builds and initializes the MLPs of the UNet's cross-attention width (and, with `self_attention`, of its
        self-attention widths) and puts them on the attention layers of those widths."""
        dims = cross_attention_dims(models.unet)
        if not dims:
            raise SdpipeError(f"{self.params_key}: the UNet of base.base_model has no cross-attention layers")
        if self.params.self_attention:
            dims = sorted(set(dims) | set(self_attention_dims(models.unet)))
        small = [dim for dim in dims if min(int(dim * size) for size in self.params.layer_structure) < 1]
        if small:
            raise SdpipeError(
                f"{self.params_key}.layer_structure {self.params.layer_structure} makes a layer of no units at "
                f"context width {small[0]}; use larger multipliers"
            )
        self.hypernetwork = Hypernetwork(dims, Architecture.from_params(self.params))
        self.hypernetwork.initialize()
        apply_hypernetwork(models.unet, self.hypernetwork)
        self.hypernetwork.requires_grad_(True)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.hypernetwork.parameters())

    def caption_ops(self, common_ops: CaptionOps) -> CaptionOps:
        """`train.common.caption_ops` with this method's own `caption_dropout`, when it has one."""
        if self.params.caption_dropout is None:
            return common_ops
        return common_ops.model_copy(update={"caption_dropout": self.params.caption_dropout})

    def save(self, models: Models, folder: Path, step: int) -> None:
        torch.save(a1111_hypernetwork(models.unet.hypernetwork, step, self.base_model), folder / A1111_FILE)


def a1111_hypernetwork(hypernetwork: Hypernetwork, step: int, base_model: str) -> dict:
    """The dict A1111's `Hypernetwork.save` writes: {width: (K state dict, V state dict)} and its settings."""
    data: dict = {}
    for width, pair in hypernetwork.mlps.items():
        data[int(width)] = tuple(
            {key: tensor.detach().float().cpu().clone() for key, tensor in mlp.state_dict().items()} for mlp in pair
        )
    data.update(hypernetwork.architecture.file_settings())
    data.update(
        {
            "step": step,
            "name": NAME,
            "sd_checkpoint": checkpoint_hash(base_model),
            "sd_checkpoint_name": Path(base_model).stem,
            "optional_info": "trained with sdpipe (train@hypernetwork)",
        }
    )
    return data


def load_hypernetwork(path: Path) -> Hypernetwork:
    """An A1111 hypernetwork `.pt` (read with `weights_only=True`), its MLPs built from the file's own settings."""
    path = Path(path)
    if not path.is_file():
        raise SdpipeError(f"{path}: no hypernetwork file; run `dvc repro train@hypernetwork` first")
    data = load_pickled(path)
    widths = [key for key in data if isinstance(key, int)] if isinstance(data, dict) else []
    if not widths:
        raise SdpipeError(f"{path}: not an A1111 hypernetwork (no integer context-width keys such as 768)")
    try:
        architecture = Architecture.from_file(data)
        hypernetwork = Hypernetwork(widths, architecture)
        for width in widths:
            states = data[width]
            if len(states) != 2:
                raise ValueError(f"width {width} holds {len(states)} state dicts, not 2 (K and V)")
            for mlp, state in zip(hypernetwork.mlps[str(width)], states):
                mlp.load_state_dict(state)
    except (ValueError, TypeError, RuntimeError, IndexError) as error:
        raise SdpipeError(f"{path}: not a hypernetwork this version can read: {error}") from None
    return hypernetwork
