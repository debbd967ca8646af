"""The training methods, each declared once: everything that looks a method up by name reads this table.

A method is three things:

- its module `sdpipe/methods/<name>.py`, with
  - `train(params, out_dir) -> dict`: the `train@<name>` stage (writes `<out_dir>/model/`, `samples/`,
    `metrics.json`, `live/`);
  - `sampling_pipeline(params, model_dir, device) -> (pipeline, trigger)`: the trained model loaded as a user
    would load it, and the word that names the concept in prompts (`evaluate`, `export`, `sdpipe sample`);
  - `evaluation_metrics(params, method_dir, concept) -> dict`, for a method that `evaluate` scores by its own measure
    instead of by sampling (`own_metrics` below);
- its params class in `sdpipe/config/train.py`, which validates the `train.<name>` section;
- a row of `METHODS` below.

To add a method: write the module and the params class, add the row, give the method its section in params.yaml
(and its name in `train.methods` to run it). `tests/test_registry.py` checks that every row is complete; dvc.yaml's
`train` matrix runs each method listed in `train.methods` with `sdpipe/methods/<name>.py` as its own code dep.

Nothing here is imported eagerly but the standard library: the config builds `TrainParams` and validates
`train.methods` from this table without importing torch. A method's module is imported when its entry point is
called, and a method module never imports another (what methods share lives in `sdpipe.training`,
`sdpipe.models` and `sdpipe.formats`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

OUTPUTS = {
    "embedding": "textual-inversion embeddings, one `<token>.safetensors` each (A1111/kohya `emb_params`)",
    "lora": "a kohya/A1111-format LoRA, `lora.safetensors` (diffusers' `load_lora_weights` reads it too)",
    "full_model": "a diffusers pipeline folder and an original-layout single-file checkpoint",
    "attention_processors": "diffusers custom-diffusion attention weights and the modifier tokens' embeddings",
    "hypernetwork": "an A1111 hypernetwork `.pt` (A1111 and ComfyUI load it)",
    "aesthetic_embedding": "an A1111 aesthetic embedding (`.pt`, and `.safetensors` beside it)",
    "clip_embedding": "a concept vector in CLIP image-embedding space, for an image-variations model",
    "inversion_records": "per-image records: the inverted noise and per-timestep null-text embeddings",
}
"""What a method's `model/` folder holds, by kind."""


@dataclass(frozen=True)
class Method:
    """One training method: its name, params, output, and its entry points (imported when called)."""

    name: str
    """Its `train.methods` name: its module is `sdpipe.methods.<name>`, its params `train.<name>`, its stage
    `train@<name>`, its outputs `<paths.train>/<name>/`."""

    params: str
    """The name of its params class in `sdpipe.config.train` (a name, not the class: the config builds
    `TrainParams` from this table, so this module cannot import the config)."""

    output: str
    """What its `model/` folder holds: a key of `OUTPUTS`."""

    summary: str
    """One line on the method and its files: the documentation of `train.<name>`."""

    own_metrics: bool = False
    """`evaluate` reports its module's `evaluation_metrics` instead of scoring sampled images."""

    families: tuple[str, ...] = ("sd",)
    """The model families (`sdpipe.families`) it trains; a base of another family is refused before any work."""

    never: dict[str, str] | None = None
    """Families it cannot train at all, by name, with the reason (the refusal says it instead of "not yet")."""

    @property
    def module_name(self) -> str:
        return f"sdpipe.methods.{self.name}"

    def module(self) -> ModuleType:
        """The method's module (torch, diffusers and the rest are imported now)."""
        return importlib.import_module(self.module_name)

    def train(self, params, out_dir):
        """Runs the `train@<name>` stage into `out_dir`; returns its metrics."""
        self.check_family(params.base)
        return self.module().train(params, out_dir)

    def check_family(self, base) -> None:
        """Refuses a base model of a family the method does not train."""
        from sdpipe.errors import SdpipeError
        from sdpipe.models.loading import model_family

        family = model_family(base.base_model, base.base_model_config)
        if family.name not in self.families:
            able = ", ".join(name for name, method in METHODS.items() if family.name in method.families)
            reason = (self.never or {}).get(family.name)
            cannot = f"cannot train {family.title} models ({reason})" if reason else f"does not train {family.title} models yet"
            raise SdpipeError(
                f"train.{self.name} {cannot}, and base.base_model {base.base_model!r} is one; the methods that do: {able}"
            )

    def sampling_pipeline(self, params, model_dir, device):
        """The trained model of `model_dir` as a pipeline on `device`, and the word that names its concept."""
        return self.module().sampling_pipeline(params, model_dir, device)

    def evaluation_metrics(self, params, method_dir, concept: str) -> dict:
        """The method's own measures, from its trained `method_dir` (only where `own_metrics`), on `concept` (the row's,
        a key of `evaluate.concepts`)."""
        if not self.own_metrics:
            raise ValueError(f"{self.name} is scored by sampling; it has no evaluation_metrics")
        return self.module().evaluation_metrics(params, method_dir, concept)


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method(
            "textual_inversion",
            "TextualInversionParams",
            "embedding",
            "Textual inversion: new token embeddings, one `<token>.safetensors` (A1111, ComfyUI and diffusers load it).",
            families=("sd", "sdxl"),
        ),
        Method(
            "finetune",
            "FinetuneParams",
            "full_model",
            "Full fine-tuning of the UNet (optionally the text encoder), with EMA: diffusers folder + single file.",
            families=("sd", "sdxl"),
        ),
        Method(
            "dreambooth",
            "DreamBoothParams",
            "full_model",
            "DreamBooth with prior preservation: diffusers folder + single file.",
            families=("sd", "sdxl"),
        ),
        Method(
            "lora",
            "LoraParams",
            "lora",
            "LoRA / LoCon / DoRA / LoHa / LoKr adapters: a kohya/A1111 `.safetensors` LoRA (diffusers loads plain "
            "LoRA).",
            families=("sd", "sdxl"),
        ),
        Method(
            "hypernetwork",
            "HypernetworkParams",
            "hypernetwork",
            "A1111 hypernetwork: MLPs on the attention context (an A1111 `.pt`, which A1111 and ComfyUI load).",
            families=("sd", "sdxl"),
        ),
        Method(
            "custom_diffusion",
            "CustomDiffusionParams",
            "attention_processors",
            "Custom Diffusion: cross-attention K/V and modifier tokens (diffusers `load_attn_procs` weights + "
            "embeddings).",
            families=("sd", "sdxl"),
        ),
        Method(
            "aesthetic_gradient",
            "AestheticGradientParams",
            "aesthetic_embedding",
            "Aesthetic gradients: a dataset's mean CLIP image embedding (A1111 `.pt`) that steers prompts when "
            "sampling.",
            families=("sd", "sdxl"),
        ),
        Method(
            "null_text_inversion",
            "NullTextInversionParams",
            "inversion_records",
            "Null-text inversion: per image, its inverted noise and per-timestep null embeddings, for reconstruction "
            "and prompt edits.",
            own_metrics=True,
            families=("sd", "sdxl"),
        ),
        Method(
            "dreamartist",
            "DreamArtistParams",
            "embedding",
            "DreamArtist: a positive and a negative embedding trained with guidance in the loss (two A1111 "
            "embeddings).",
            families=("sd", "sdxl"),
        ),
        Method(
            "clip_inversion",
            "ClipInversionParams",
            "clip_embedding",
            "CLIP inversion: a concept vector in CLIP image-embedding space for an image-variations model.",
            own_metrics=True,
            never={
                "sdxl": "it samples with an image-variations model (a UNet conditioned on CLIP image embeddings), "
                "and no SDXL release has one"
            },
        ),
    )
}
"""Every training method, by name, in the order `train` documents them."""


def methods_writing(output: str) -> tuple[str, ...]:
    """The names of the methods whose `model/` folder holds `output` (a key of `OUTPUTS`)."""
    if output not in OUTPUTS:
        raise ValueError(f"unknown method output {output!r}; expected one of {', '.join(OUTPUTS)}")
    return tuple(name for name, method in METHODS.items() if method.output == output)
