"""Custom Diffusion (Kumari et al. 2023): teach the model new concepts by training only the key and value projections
of its cross-attention layers, and one new token per concept, as diffusers' `train_custom_diffusion.py` does.

1. `setup` gives every cross-attention layer of the UNet a diffusers `CustomDiffusionAttnProcessor2_0` whose key
   and value projections (`to_k_custom_diffusion`, `to_v_custom_diffusion`) start as copies of the layer's own and
   train; with `freeze_model: crossattn` the query and output projections train too. The rest of the UNet stays
   frozen. Each concept's modifier token (`<new1>`) becomes a new row of the text encoder's token embeddings,
   started from its initializer word (textual inversion's `add_tokens`).
2. `caption` rewrites the captions: each concept's trigger word becomes its modifier token
   (`a red sks shape` → `a red <new1> shape`); sample prompts go through the same rewrite.
3. The training core trains on the concepts' images and, with prior preservation, as many class images (the
   `class_images` stage's, shared with DreamBooth): loss = concept loss + `prior_loss_weight` × class loss.
   `after_optimizer_step` puts every token-embedding row but the modifier tokens' back (AdamW's weight decay would
   otherwise move them).
4. `save` writes `pytorch_custom_diffusion_weights.safetensors` with the keys of diffusers' `save_attn_procs`
   (`<layer>.processor.to_k_custom_diffusion.weight`, …), which `unet.load_attn_procs(folder, weight_name=...)`
   reads, and `<new1>.safetensors` per modifier token (`{"<new1>": vector}`, the reference's layout), which
   `pipe.load_textual_inversion(path, token="<new1>")` reads. The attention layers without trained weights are
   listed as empty tensors, where diffusers' pickled `.bin` holds empty dicts (which safetensors cannot store):
   `load_attn_procs` needs one entry per attention layer to install the processors.

On an SDXL base the cross-attention of every transformer block trains (their context is both text encoders' hidden
states side by side), each modifier token is added to both text encoders, and its file holds `clip_l` and `clip_g`
(the SDXL embedding layout textual inversion writes; diffusers: `load_textual_inversion` of each tensor with its
encoder and tokenizer).
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdpipe.class_images import shared_prior_preservation
from sdpipe.config.caption import CaptionOps
from sdpipe.config.train import CustomDiffusionParams
from sdpipe.data.captions import load_captions
from sdpipe.errors import SdpipeError
from sdpipe.formats.embeddings import Embedding, load_into_pipeline, save_embedding
from sdpipe.io import save_safetensors
from sdpipe.models.loading import load_pipeline
from sdpipe.training import Models, TrainingMethod, run_training
from sdpipe.training.data import PriorPreservation
from sdpipe.training.datasets import method_datasets
from sdpipe.training.tokens import TokenRowsTraining, add_tokens, replace_trigger

WEIGHTS_FILE = "pytorch_custom_diffusion_weights.safetensors"
KEY = "train.custom_diffusion"


def train(params, out_dir: Path) -> dict:
    """The `train@custom_diffusion` stage: trains the cross-attention and modifier tokens and writes
    `<out_dir>/model/` (the custom-diffusion weights and one embedding per modifier token)."""
    settings = params.train.custom_diffusion
    datasets = method_datasets(params.base.datasets, [concept.dataset for concept in settings.concepts], KEY)
    check_captions(settings, Path(params.paths.captions))
    method = CustomDiffusion(settings.model_copy(update={"datasets": datasets}), params)
    return run_training(params, method, out_dir)


def sampling_pipeline(params, model_dir: Path, device: torch.device):
    """The base pipeline with the trained weights and tokens loaded as a user would (`unet.load_attn_procs`,
    `load_textual_inversion`), and the modifier token of the first concept, which names it in prompts."""
    concepts = params.train.custom_diffusion.concepts
    pipeline = load_pipeline(params.base.base_model, params.base.base_model_config, device=device)
    load_custom_diffusion(pipeline, Path(model_dir), [concept.modifier_token for concept in concepts])
    return pipeline, concepts[0].modifier_token


def load_custom_diffusion(pipeline, model_dir: Path, tokens: list[str]) -> None:
    """Loads `model_dir`'s custom-diffusion weights into `pipeline.unet` and its modifier `tokens`' embeddings."""
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor

    # diffusers installs the loaded processors only when `load_attn_procs` is given the pipeline
    # (huggingface/diffusers#9320: without it, the call silently changes nothing).
    pipeline.unet.load_attn_procs(str(model_dir), weight_name=WEIGHTS_FILE, _pipeline=pipeline)
    processors = pipeline.unet.attn_processors.values()
    if not any(isinstance(processor, CustomDiffusionAttnProcessor) for processor in processors):
        raise SdpipeError(f"{model_dir / WEIGHTS_FILE}: diffusers loaded no custom-diffusion weights from it")
    for token in tokens:
        load_into_pipeline(pipeline, model_dir / f"{token}.safetensors", token)


def check_captions(settings: CustomDiffusionParams, captions_dir: Path) -> None:
    """With several concepts, every caption of a concept's dataset must hold its trigger word (or modifier token):
    that is how a caption gets the right modifier token."""
    if len(settings.concepts) == 1:
        return
    for index, concept in enumerate(settings.concepts):
        path = captions_dir / f"{concept.dataset}.jsonl"
        for row in load_captions(path):
            caption = row["caption"] or ""
            if caption.strip() and not replace_trigger(caption, concept.modifier_token, concept.replace_word, "")[1]:
                raise SdpipeError(
                    f"{path}: the caption {caption!r} (image {row['id']!r}) lacks {KEY}.concepts[{index}].replace_word "
                    f"{concept.replace_word!r}; with several concepts every caption of a concept's dataset must name "
                    "it, so that it gets the concept's modifier token"
                )


class CustomDiffusion(TokenRowsTraining, TrainingMethod):
    """Trains the UNet's cross-attention K/V (optionally Q and out) in custom-diffusion processors, and the new
    token-embedding rows of the modifier tokens."""

    name = "custom_diffusion"
    trained_models = ("unet", "text_encoder")

    def __init__(self, params: CustomDiffusionParams, all_params):
        super().__init__(params)
        self.all_params = all_params

    def setup(self, models: Models) -> None:
        """Puts trainable custom-diffusion processors on the cross-attention layers and adds the modifier tokens."""
        from diffusers.models.attention_processor import Attention, CustomDiffusionAttnProcessor2_0

        train_q_out = self.params.freeze_model == "crossattn"
        self.processors = []
        for name, attn in models.unet.named_modules():
            if not isinstance(attn, Attention) or not attn.is_cross_attention:
                continue
            trained = (attn.to_k, attn.to_v, attn.to_q) if train_q_out else (attn.to_k, attn.to_v)
            if any(projection.bias is not None for projection in trained):
                raise SdpipeError(
                    f"base.base_model: the cross-attention layer {name} has biased projections, which diffusers' "
                    "custom-diffusion processors cannot hold"
                )
            processor = CustomDiffusionAttnProcessor2_0(
                train_kv=True,
                train_q_out=train_q_out,
                hidden_size=attn.to_k.out_features,
                cross_attention_dim=attn.to_k.in_features,
                out_bias=attn.to_out[0].bias is not None,
            )
            initial = {
                "to_k_custom_diffusion.weight": attn.to_k.weight,
                "to_v_custom_diffusion.weight": attn.to_v.weight,
            }
            if train_q_out:
                initial["to_q_custom_diffusion.weight"] = attn.to_q.weight
                initial |= {f"to_out_custom_diffusion.0.{k}": v for k, v in attn.to_out[0].named_parameters()}
            processor.load_state_dict(initial)
            attn.set_processor(processor)
            self.processors.append(processor)
        if not self.processors:
            raise SdpipeError("base.base_model: its UNet has no cross-attention layers for Custom Diffusion to train")

        self.trained_models = ("unet", *models.family.text_encoders)
        for tokenizer, text_encoder in zip(models.tokenizers, models.text_encoders):  # SDXL: both
            token_ids = []
            for index, concept in enumerate(self.params.concepts):
                token_ids += add_tokens(
                    tokenizer,
                    text_encoder,
                    [concept.modifier_token],
                    concept.initializer_word,
                    token_key=f"{KEY}.concepts[{index}].modifier_token",
                    word_key=f"{KEY}.concepts[{index}].initializer_word",
                )
            self.train_token_rows(text_encoder, token_ids)

    def attention_parameters(self) -> list[torch.nn.Parameter]:
        return [parameter for processor in self.processors for parameter in processor.parameters()]

    def token_parameters(self) -> list[torch.nn.Parameter]:
        return [rows.embeddings for rows in self.token_rows]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return self.attention_parameters() + self.token_parameters()

    def parameter_groups(self) -> list[dict]:
        """The attention weights at `learning_rate`, the token embeddings at `token_learning_rate`."""
        return [
            {"params": self.attention_parameters()},
            {"params": self.token_parameters(), "lr": self.params.token_learning_rate},
        ]

    def prior_preservation(self) -> PriorPreservation | None:
        return shared_prior_preservation(self.all_params, self.params.prior_loss_weight, self.params.datasets, KEY)

    def caption_ops(self, common_ops: CaptionOps) -> CaptionOps:
        """`train.common.caption_ops` with this method's own `caption_dropout`, when it has one."""
        if self.params.caption_dropout is None:
            return common_ops
        return common_ops.model_copy(update={"caption_dropout": self.params.caption_dropout})

    def caption(self, caption: str) -> str:
        """Each concept's trigger word becomes its modifier token (`a red sks shape` → `a red <new1> shape`); with
        one concept, a caption without the trigger word gets the token in front."""
        if not caption.strip():
            return caption  # a dropped caption trains the unconditional prediction
        found_any = False
        for concept in self.params.concepts:
            caption, found = replace_trigger(
                caption,
                concept.modifier_token,
                concept.replace_word,
                concept.modifier_token,
            )
            found_any = found_any or found
        if not found_any and len(self.params.concepts) == 1:
            return f"{self.params.concepts[0].modifier_token} {caption}"
        return caption

    def save(self, models: Models, folder: Path, step: int) -> None:
        save_safetensors(
            custom_diffusion_state_dict(models.unet),
            folder / WEIGHTS_FILE,
            {"format": "pt"},
        )
        for index, concept in enumerate(self.params.concepts):
            path = folder / f"{concept.modifier_token}.safetensors"
            vectors = [rows.embeddings.detach()[rows.token_ids[index]].float().cpu().clone() for rows in self.token_rows]
            if len(vectors) == 1:
                save_safetensors({concept.modifier_token: vectors[0]}, path)
            else:  # SDXL: one row per text encoder
                save_embedding([Embedding(vector[None], concept.modifier_token, {}) for vector in vectors], path)


def custom_diffusion_state_dict(unet) -> dict[str, torch.Tensor]:
    """The UNet's custom-diffusion weights under diffusers' `save_attn_procs` keys, fp32 on the CPU; an attention
    layer without trained weights is an empty tensor under its processor's name."""
    state = {}
    for name, processor in unet.attn_processors.items():
        weights = processor.state_dict() if isinstance(processor, torch.nn.Module) else {}
        if not weights:
            state[name] = torch.empty(0)
        for key, tensor in weights.items():
            state[f"{name}.{key}"] = tensor.detach().float().cpu().contiguous()
    return state
