"""LoRA (Hu et al. 2021) and its LyCORIS relatives: train small adapters beside the frozen model weights.

Every adapted layer keeps its weight W and learns an update ΔW with few parameters; the model computes with
W + ΔW. How ΔW is made is the `algorithm` (through peft):

- `lora`: ΔW = B·A × alpha / rank, A [rank, in] and B [out, rank], B starting at zero (kohya `networks.lora`);
- `dora` (Liu et al. 2024): LoRA's direction plus a trained magnitude per output channel,
  W' = m × (W + ΔW) / ‖W + ΔW‖;
- `loha` (LyCORIS, after FedPara): the Hadamard product of two low-rank products, (B1·A1) ⊙ (B2·A2) — rank r²
  from 2× LoRA's parameters;
- `lokr` (LyCORIS): a Kronecker product w1 ⊗ w2 of two small matrices (w2 low-rank when the layer is wide).

1. `setup` puts adapters on the layers the `preset` names (LyCORIS's names): by default (`sdpipe`) every linear
   layer of the UNet's transformer blocks, as kohya does (proj_in/proj_out, to_q/to_k/to_v/to_out.0 of self- and
   cross-attention, the feed-forward layers); `attn-only` the attention projections alone, as diffusers' scripts
   do; `full-lin` and `full` every linear (and conv) layer. With `conv` also on the UNet's ResNet and
   down/upsampler convolutions (LoCon, at `conv_rank` and `conv_alpha`); with `train_text_encoder` also on the
   CLIP text encoder's q/k/v/out_proj (and its MLP's fc1/fc2 for `attn-mlp`, `full-lin` and `full`, as kohya
   does). Only the adapters train.
2. The training core (`sdpipe.training`) runs the diffusion loss on the captions as they are: the trigger word
   of the captions (`sks`) becomes the concept because the adapted cross-attention learns what it means. The text
   encoder's adapters train at their own rate (a second optimizer parameter group). With `prior_loss_weight` the
   class images (kohya's regularization images; the `class_images` stage's, shared with DreamBooth) train beside
   the concept's, which keeps the rest of the class drawing as before.
3. `save` writes `lora.safetensors` in the kohya/A1111 layout (`sdpipe.formats.kohya`: `lora_unet_…`, `lora_te_…`,
   `.alpha`; LyCORIS names for LoHa/LoKr/DoRA; on SDXL kohya's SDXL names: the UNet's layers by their original
   module paths, `lora_unet_input_blocks_4_1_…`, and `lora_te1_…`, `lora_te2_…` for the two text encoders) with kohya's `ss_*` and the SAI `modelspec.*` metadata: A1111,
   ComfyUI and kohya's tools load it as it is (`<lora:lora:1>`), diffusers reads plain LoRA
   (`pipe.load_lora_weights(folder, weight_name="lora.safetensors")`). For `lora` and `dora` it also writes
   `pytorch_lora_weights.safetensors` in diffusers' PEFT layout (`pipe.load_lora_weights(folder)`), the one
   diffusers reads DoRA from (it drops kohya's `dora_scale`); its text encoder keys keep CLIP's `text_model.`
   (`text_encoder.text_model.encoder.layers.0…`), which ComfyUI and diffusers before transformers 5 need.
"""

from __future__ import annotations

import datetime
import json
import math
import re
from collections import Counter
from pathlib import Path

import torch

from sdpipe.class_images import shared_prior_preservation
from sdpipe.config.train import LoraParams
from sdpipe.data.captions import load_captions, split_tags
from sdpipe.errors import SdpipeError
from sdpipe.formats.diffusers_lora import with_text_model_keys
from sdpipe.families import SDXL, pipeline_family
from sdpipe.formats.kohya import (
    SDXL_BASE_MODEL_VERSION,
    from_sdxl_names,
    load_kohya_lora,
    merge_lora,
    model_kohya_names,
    peft_to_kohya,
    save_kohya_lora,
    sdxl_unet_names,
    to_sdxl_names,
)
from sdpipe.io import save_safetensors, source_date_epoch
from sdpipe.models.loading import load_pipeline, model_fingerprint, resolve_device, resolve_dtype
from sdpipe.training import Models, TrainingMethod, run_training
from sdpipe.training.data import PriorPreservation
from sdpipe.training.datasets import method_datasets

KEY = "train.lora"

LORA_FILE = "lora.safetensors"
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
UNET_TRANSFORMER = ".attentions."  # the Transformer2DModel blocks of the down, mid and up blocks
UNET_ATTENTION = re.compile(r"\.attn\d+\.(to_q|to_k|to_v|to_out\.0)$")  # self- and cross-attention projections
UNET_RESNETS = ".resnets."
UNET_CONV_BLOCKS = (UNET_RESNETS, ".downsamplers.", ".upsamplers.")  # kohya's LoCon blocks
UNET_TIME_EMBEDDING = ("time_embedding.linear_1", "time_embedding.linear_2")
UNET_STEM_CONVS = ("conv_in", "conv_out")
TEXT_ENCODER_ATTENTION = (".q_proj", ".k_proj", ".v_proj", ".out_proj")  # CLIPAttention
TEXT_ENCODER_MLP = (".fc1", ".fc2")  # CLIPMLP
ATTENTION_ONLY_TEXT_ENCODER = ("attn-only", "sdpipe")  # presets that leave out the text encoder's MLP
KOHYA_PRESETS = ("sdpipe", "attn-mlp")  # what kohya's networks.lora builds (with conv_dim for LoCon)
MIXED_PRECISION = {torch.float32: "no", torch.float16: "fp16", torch.bfloat16: "bf16"}  # kohya's names
DIFFUSERS_LOADABLE = ("lora", "dora")  # algorithms diffusers' load_lora_weights reads (DoRA from its own layout)


def train(params, out_dir: Path) -> dict:
    """The `train@lora` stage: trains the adapters and writes `<out_dir>/model/lora.safetensors` (and more)."""
    lora = params.train.lora
    datasets = method_datasets(params.base.datasets, lora.datasets, KEY)
    prior = shared_prior_preservation(params, lora.prior_loss_weight, datasets, KEY)
    metadata = run_metadata(params, datasets, prior)
    training_date = source_date_epoch([Path(params.paths.datasets) / name for name in datasets])
    method = Lora(lora, params.base.base_model, run_metadata=metadata, prior=prior, training_date=training_date)
    return run_training(params, method, out_dir)


def sampling_pipeline(params, model_dir: Path, device: torch.device):
    """The base pipeline with the LoRA applied as a user would, and the trigger word of its prompts.

    Plain LoRA is loaded with diffusers' `load_lora_weights` from the kohya file; DoRA from the diffusers-layout
    file; LoHa and LoKr (which diffusers cannot read) are merged into the weights with `sdpipe.formats.kohya`.
    """
    pipeline = load_pipeline(params.base.base_model, params.base.base_model_config, device=device)
    algorithm = params.train.lora.algorithm
    if algorithm == "lora":
        pipeline.load_lora_weights(str(model_dir), weight_name=LORA_FILE)
    elif algorithm == "dora":
        pipeline.load_lora_weights(str(model_dir), weight_name=DIFFUSERS_FILE)
    else:
        tensors, _ = load_kohya_lora(model_dir / LORA_FILE)
        family = pipeline_family(pipeline)
        if family is SDXL:
            tensors = from_sdxl_names(tensors, sdxl_unet_names(model_kohya_names(pipeline.unet, "unet").values(), pipeline.unet.config))
        for name in ("unet", *family.text_encoders):
            merge_lora(getattr(pipeline, name), name, tensors)
    return pipeline, params.evaluate.trigger


class Lora(TrainingMethod):
    """Trains peft adapters on the layers of the UNet (and text encoder) its preset names; saves a kohya LoRA."""

    name = "lora"

    def __init__(
        self,
        params: LoraParams,
        base_model: str,
        run_metadata: dict[str, str] | None = None,
        prior: PriorPreservation | None = None,
        training_date: int = 0,
    ):
        super().__init__(params)
        self.base_model = base_model
        self.training_date = training_date  # seconds since the epoch (`sdpipe.io.source_date_epoch`)
        self.prior = prior
        self.run_metadata = dict(run_metadata or {})
        self.trained_models = ("unet", "text_encoder") if params.train_text_encoder else ("unet",)
        self.configs: dict[str, object] = {}  # the peft config of each adapted model

    def setup(self, models: Models) -> None:
        """Injects the adapters; peft leaves only their weights trainable."""
        from peft import inject_adapter_in_model

        params = self.params
        layers = unet_layers(models.unet, params)
        self.unet_paths = sorted(layers)  # peft may shorten its config's target_modules to suffixes
        self.configs["unet"] = adapter_config(params, layers)
        inject_adapter_in_model(self.configs["unet"], models.unet)
        self.unet_parameters = [p for p in models.unet.parameters() if p.requires_grad]
        self.text_encoder_parameters = []
        if params.train_text_encoder:  # every text encoder of the family (SDXL's two, as kohya's sdxl_train_network)
            self.trained_models = ("unet", *models.family.text_encoders)
            for name, text_encoder in zip(models.family.text_encoders, models.text_encoders):
                layers = {path: (params.rank, params.alpha) for path in text_encoder_layers(text_encoder, params)}
                self.configs[name] = adapter_config(params, layers)
                inject_adapter_in_model(self.configs[name], text_encoder)
                self.text_encoder_parameters += [p for p in text_encoder.parameters() if p.requires_grad]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return self.unet_parameters + self.text_encoder_parameters

    def prior_preservation(self) -> PriorPreservation | None:
        return self.prior

    def parameter_groups(self) -> list[dict]:
        groups = [{"params": self.unet_parameters}]
        if self.text_encoder_parameters:
            groups.append({"params": self.text_encoder_parameters, "lr": self.params.text_encoder_learning_rate})
        return groups

    def save(self, models: Models, folder: Path, step: int) -> None:
        tensors = {}
        for name in ("unet", *models.family.text_encoders):
            if name in self.configs:
                tensors.update(peft_to_kohya(getattr(models, name), name))
        if models.family is SDXL:  # kohya's SDXL names: the UNet's original module paths, `lora_te1_`
            tensors = to_sdxl_names(tensors, sdxl_unet_names(self.unet_paths, models.unet.config))
        save_kohya_lora(tensors, folder / LORA_FILE, self.metadata(models, step))
        if self.params.algorithm in DIFFUSERS_LOADABLE:
            self.save_diffusers_layout(models, folder)

    def metadata(self, models: Models, step: int) -> dict[str, str]:
        """kohya's `ss_*` and the SAI model spec's `modelspec.*` keys of the file."""
        params = self.params
        sdxl = models.family is SDXL
        # SD 2's OpenCLIP ViT-H is 1024 wide; SD 1's and SDXL's first encoder, CLIP ViT-L, 768
        v2 = not sdxl and models.text_encoder.config.hidden_size == 1024
        v_prediction = models.noise_scheduler.config.prediction_type == "v_prediction"
        base_version = SDXL_BASE_MODEL_VERSION if sdxl else ("sd_v2_768_v" if v_prediction else "sd_v2") if v2 else "sd_v1"
        metadata = {
            **self.run_metadata,
            "ss_output_name": Path(LORA_FILE).stem,
            "ss_network_module": network_module(params),
            "ss_network_dim": str(params.rank),
            "ss_network_alpha": str(float(params.alpha)),
            "ss_network_dropout": str(float(params.dropout)),
            "ss_network_args": json.dumps(network_args(params)),
            "ss_learning_rate": str(params.learning_rate),
            "ss_unet_lr": str(params.learning_rate),
            "ss_text_encoder_lr": str(params.text_encoder_learning_rate if params.train_text_encoder else 0.0),
            "ss_network_train_unet_only": str(not params.train_text_encoder),
            "ss_max_train_steps": str(params.max_steps),
            "ss_steps": str(step),
            "ss_base_model_version": base_version,
            "ss_v2": str(v2),
            "ss_v_parameterization": str(v_prediction),
            "ss_sd_model_name": Path(self.base_model).name,
            "ss_sd_model_hash": base_model_hash(self.base_model),
            "ss_training_started_at": str(float(self.training_date)),  # deterministic: the bytes depend on inputs
            "ss_training_finished_at": str(float(self.training_date)),
        }
        architecture = "stable-diffusion-v1"
        if v2:
            architecture = "stable-diffusion-v2-768-v" if v_prediction else "stable-diffusion-v2-512"
        if sdxl:
            architecture = "stable-diffusion-xl-v1-base"
        metadata.update(
            {
                "modelspec.sai_model_spec": "1.0.0",
                "modelspec.architecture": f"{architecture}/lora",
                "modelspec.implementation": "diffusers",
                "modelspec.title": f"{params.algorithm} of {Path(self.base_model).name}",
                "modelspec.date": datetime.datetime.fromtimestamp(self.training_date, datetime.UTC).isoformat(),
                "modelspec.prediction_type": "v" if v_prediction else "epsilon",
            }
        )
        return metadata

    def save_diffusers_layout(self, models: Models, folder: Path) -> None:
        """`pytorch_lora_weights.safetensors`: diffusers' layout (peft keys, the peft configs as metadata)."""
        import diffusers
        from peft.utils import get_peft_model_state_dict

        layers, configs = {}, {}
        for name in ("unet", *models.family.text_encoders):
            if name in self.configs:
                layers[f"{name}_lora_layers"] = get_peft_model_state_dict(getattr(models, name))
                configs[f"{name}_lora_adapter_metadata"] = adapter_metadata(self.configs[name])
        pipeline_class = getattr(diffusers, models.family.pipeline_class)
        pipeline_class.save_lora_weights(folder, weight_name=DIFFUSERS_FILE, **layers, **configs)
        # Written again with a sorted header (diffusers' file bytes change from one process to the next), and
        # `text_encoder.text_model.…` keys, which ComfyUI and older diffusers need (`with_text_model`).
        tensors, metadata = load_kohya_lora(folder / DIFFUSERS_FILE)
        # As a new file: the streaming writer must not overwrite a file whose tensors may still be memory-mapped.
        (folder / DIFFUSERS_FILE).unlink()
        save_safetensors(with_text_model_keys(tensors), folder / DIFFUSERS_FILE, metadata)


def unet_layers(unet: torch.nn.Module, params: LoraParams) -> dict[str, tuple[int, float]]:
    """{module path: (rank, alpha)} of the UNet layers that `params.preset` and `params.conv` adapt.

    Linear and 1x1 conv layers get `rank` and `alpha`, 3x3 convolutions `conv_rank` and `conv_alpha`, as in kohya's
    and LyCORIS's networks; the `sdpipe` preset's LoCon (as sdpipe always did it) gives every convolution of the
    ResNet blocks and down/upsamplers `conv_rank` and leaves their time_emb_proj out.
    """
    layers = {}
    for path, module in unet.named_modules():
        if is_linear(module) and is_unet_linear_target(path, params):
            layers[path] = (params.rank, params.alpha)
        elif isinstance(module, torch.nn.Conv2d) and is_unet_conv_target(path, params):
            layers[path] = (params.conv_rank, params.conv_alpha)
    return layers


def is_unet_linear_target(path: str, params: LoraParams) -> bool:
    preset = params.preset
    if preset != "sdpipe" and params.adapts_convs and any(block in path for block in UNET_CONV_BLOCKS):
        # kohya's conv_dim adds ResnetBlock2D, Downsample2D and Upsample2D whole: their linear and 1x1 layers
        # (time_emb_proj, conv_shortcut) at the linear rank. (`sdpipe` keeps its own LoCon: every conv at conv_rank.)
        return True
    if preset == "attn-only":  # diffusers' target_modules to_q/to_k/to_v/to_out.0; LyCORIS CrossAttention
        return UNET_TRANSFORMER in path and UNET_ATTENTION.search(path) is not None
    if preset in ("sdpipe", "attn-mlp"):  # kohya's Transformer2DModel
        return UNET_TRANSFORMER in path
    # full-lin, full: LyCORIS adds ResnetBlock2D (time_emb_proj, conv_shortcut) and the time embedding
    return UNET_TRANSFORMER in path or UNET_RESNETS in path or path in UNET_TIME_EMBEDDING


def is_unet_conv_target(path: str, params: LoraParams) -> bool:
    """A conv layer that no linear target took: LoCon's ResNet and down/upsampler convs, `full`'s conv_in/conv_out."""
    if params.adapts_convs and any(block in path for block in UNET_CONV_BLOCKS):
        return True
    return params.preset == "full" and path in UNET_STEM_CONVS


def is_linear(module: torch.nn.Module) -> bool:
    """A linear layer, or a 1x1 convolution (SD 1's proj_in/proj_out, ResNet shortcuts), which kohya treats as one."""
    return isinstance(module, torch.nn.Linear) or (
        isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) == (1, 1)
    )


def text_encoder_layers(text_encoder: torch.nn.Module, params: LoraParams) -> list[str]:
    """Module paths of the CLIP text encoder's layers that `params.preset` adapts: q/k/v/out_proj of every layer
    (diffusers' scripts), with the MLP's fc1/fc2 too for kohya's and LyCORIS's presets (CLIPAttention + CLIPMLP)."""
    suffixes = TEXT_ENCODER_ATTENTION
    if params.preset not in ATTENTION_ONLY_TEXT_ENCODER:
        suffixes += TEXT_ENCODER_MLP
    return [
        path
        for path, module in text_encoder.named_modules()
        if isinstance(module, torch.nn.Linear) and path.endswith(suffixes)
    ]


def adapter_config(params: LoraParams, layers: dict[str, tuple[int, float]]):
    """The peft config of `params.algorithm` for `layers` ({module path: (rank, alpha)})."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    if not layers:
        raise SdpipeError("train.lora: base.base_model has no layers to put adapters on (not Stable Diffusion?)")
    targets = sorted(layers)
    # Layers whose rank or alpha differ from the common ones (LoCon's convs), by escaped full path.
    rank_pattern = {re.escape(path): rank for path, (rank, _) in layers.items() if rank != params.rank}
    alpha_pattern = {re.escape(path): alpha for path, (_, alpha) in layers.items() if alpha != params.alpha}
    common = dict(r=params.rank, target_modules=targets, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    if params.algorithm in ("lora", "dora"):
        return LoraConfig(
            lora_alpha=params.alpha, lora_dropout=params.dropout, use_dora=params.algorithm == "dora", **common
        )
    config_class = LoHaConfig if params.algorithm == "loha" else LoKrConfig
    return config_class(alpha=params.alpha, rank_dropout=params.dropout, **common)


def network_module(params: LoraParams) -> str:
    """kohya's `network_module` that builds this network: `networks.lora` for plain LoRA on kohya's layers, else
    LyCORIS's `lycoris.kohya` (its algorithms, and its presets for other layers)."""
    if params.algorithm == "lora" and params.preset in KOHYA_PRESETS:
        return "networks.lora"
    return "lycoris.kohya"


def network_args(params: LoraParams) -> dict[str, str]:
    """kohya's `network_args` (strings, as its command line gives them) that rebuild this network: LyCORIS's `algo`
    and `preset`, LoCon's `conv_dim` and `conv_alpha`."""
    args: dict[str, str] = {}
    if network_module(params) == "lycoris.kohya":
        args["algo"] = "lora" if params.algorithm == "dora" else params.algorithm
        if params.algorithm == "dora":
            args.update({"dora_wd": "True", "wd_on_output": "True"})
    args["preset"] = params.preset
    if params.adapts_convs:
        args.update({"conv_dim": str(params.conv_rank), "conv_alpha": str(float(params.conv_alpha))})
    return args


def run_metadata(params, datasets: list[str], prior: PriorPreservation | None = None) -> dict[str, str]:
    """The `ss_*` keys that describe the training run and its data (known before training)."""
    common, lora = params.train.common, params.train.lora
    tag_frequency: dict[str, dict[str, int]] = {}
    dataset_dirs = {}
    images = 0
    for name in datasets:
        rows = load_captions(Path(params.paths.captions) / f"{name}.jsonl")
        counts = Counter(tag for row in rows for tag in split_tags(row["caption"] or ""))
        tag_frequency[name] = dict(sorted(counts.items()))
        dataset_dirs[name] = {"n_repeats": 1, "img_count": len(rows)}
        images += len(rows)
    total_batch = common.batch_size * common.gradient_accumulation_steps
    epochs = math.ceil(lora.max_steps * total_batch / images) if images else 0
    ops = common.caption_ops
    precision = resolve_dtype(params.base.precision, resolve_device(params.base.device))
    return {
        "ss_training_comment": "trained with sdpipe (train@lora)",
        "ss_num_train_images": str(images),
        "ss_num_reg_images": str(len(prior.examples) if prior else 0),
        "ss_prior_loss_weight": str(float(prior.loss_weight if prior else 0.0)),
        "ss_num_epochs": str(epochs),
        "ss_epoch": str(epochs),
        "ss_batch_size_per_device": str(common.batch_size),
        "ss_total_batch_size": str(total_batch),
        "ss_gradient_accumulation_steps": str(common.gradient_accumulation_steps),
        "ss_gradient_checkpointing": str(common.gradient_checkpointing),
        "ss_lr_scheduler": common.lr_scheduler,
        "ss_lr_warmup_steps": str(common.lr_warmup_steps),
        "ss_optimizer": "AdamW",
        "ss_max_grad_norm": str(common.max_grad_norm or 0.0),
        "ss_min_snr_gamma": str(common.snr_gamma),
        "ss_noise_offset": str(common.noise_offset),
        "ss_caption_dropout_rate": str(ops.caption_dropout),
        "ss_caption_tag_dropout_rate": str(ops.tag_dropout),
        "ss_shuffle_caption": str(ops.shuffle_tags),
        "ss_keep_tokens": str(ops.keep_tokens),
        "ss_flip_aug": str(common.flip),
        "ss_cache_latents": "True",
        "ss_mixed_precision": MIXED_PRECISION[precision],
        "ss_seed": str(params.base.seed),
        "ss_resolution": str((params.base.resolution, params.base.resolution)),
        "ss_dataset_dirs": json.dumps(dataset_dirs),
        "ss_tag_frequency": json.dumps(tag_frequency),
        "modelspec.resolution": f"{params.base.resolution}x{params.base.resolution}",
        "modelspec.trigger_phrase": params.evaluate.trigger,
    }


def adapter_metadata(config) -> dict:
    """The peft config as a dict, its module sets as sorted lists: a set's order changes from one process to the next
    (string hashing is randomized), and the file's bytes must not."""
    metadata = config.to_dict()
    for key, value in metadata.items():
        if isinstance(value, (set, frozenset)) or (key == "target_modules" and isinstance(value, list)):
            metadata[key] = sorted(value)
    return metadata


def base_model_hash(base_model: str) -> str:
    """The base model's fingerprint (`sdpipe.models.loading.model_fingerprint`), for `ss_sd_model_hash`."""
    try:
        return model_fingerprint(base_model)
    except SdpipeError:
        return ""
