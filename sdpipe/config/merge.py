"""`merge`: checkpoint merge and LoRA recipes, each written to `<paths.merge>/<recipe>/`.

`merge.recipes` maps a recipe name to its recipe (a list of recipes with a `name` each is accepted too):

    merge:
      recipes:
        blend:                                  # -> artifacts/merge/blend/
          method: weighted_sum
          inputs: {a: train:dreambooth, b: train:finetune}
          alpha: 0.5
          dtype: fp16
        baked:                                  # a LoRA baked into a model
          method: lora_bake
          inputs: {model: base, loras: [train:lora]}
          strength: 0.8

The methods:

- merges of whole models: `weighted_sum`, `add_difference`, `triple_sum`, `sum_twice`, `slerp`,
  `cosine_adaptive`, `ties`, `dare`;
- `lora_bake`: LoRAs (kohya LoRA/LoCon, LyCORIS LoHa/LoKr, DoRA) added into a model's weights at a strength;
- `lora_extract`: a kohya LoRA of a given rank from the difference of two models (SVD per layer);
- `lora_resize`: a LoRA brought to another rank (SVD of each layer's update).

The model-writing methods (all but `lora_extract` and `lora_resize`) write `model/` (a diffusers folder),
`model.safetensors` (original layout) and `recipe.json`; `lora_extract` and `lora_resize` write `lora.safetensors`
(kohya format) and `recipe.json`.

A model input is `base` (`base.base_model`), `train:<method>` (the whole-model checkpoint a training method wrote to
`<paths.train>/<method>/model/`: dreambooth, finetune) or the path of a diffusers folder or of an original-layout
single-file `.safetensors` checkpoint (SD 1.x/2.x, or SDXL in the SGM layout). A LoRA input is `train:lora`
(`<paths.train>/lora/model/lora.safetensors`) or the path of a kohya-format `.safetensors` LoRA (SDXL: kohya's SDXL
names). The inputs of a recipe are of one model family. Each method has its own inputs and parameters; `alpha` and
`beta` are one number or per-block weights (`sdpipe.merge.blocks`: the inputs' family's list in supermerger's order,
26 for SD 1.x/2.x: BASE, IN00-IN11, M00, OUT00-OUT11, 20 for SDXL: BASE, IN00-IN08, M00, OUT00-OUT08; or a mapping
of block ids with BASE), which makes any of those methods a block-weighted merge."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from sdpipe.config.section import Section
from sdpipe.merge.blocks import check_block_weights
from sdpipe.methods.registry import METHODS, methods_writing

RecipeName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
BlockWeights = Annotated[float | list[float] | dict[str, float], AfterValidator(check_block_weights)]


def check_source(source: str) -> str:
    """An input: `base`, `train:<method>` or a path (whose existence is checked when the recipe runs)."""
    if not source.strip():
        raise ValueError("expected `base`, `train:<method>` or the path of a diffusers folder or .safetensors file")
    if source.startswith(("train:", "train@")):
        method = source[len("train:") :]
        if method not in METHODS:
            raise ValueError(f"unknown training method {method!r} in {source!r}; expected one of {', '.join(METHODS)}")
    return source


Source = Annotated[str, AfterValidator(check_source)]

LORA_METHODS = methods_writing("lora")
"""Training methods whose output is a LoRA file (`train:<method>` as a LoRA input)."""


def check_lora_source(source: str) -> str:
    """A LoRA input: `train:lora` or the path of a `.safetensors` file (whose existence is checked when the
    recipe runs)."""
    if source.startswith(("train:", "train@")):
        method = source[len("train:") :]
        if method not in LORA_METHODS:
            raise ValueError(f"{source!r} is not a LoRA; expected {' or '.join(f'train:{m}' for m in LORA_METHODS)}")
        return source
    if not source.strip().endswith(".safetensors"):
        raise ValueError(f"expected `train:lora` or the path of a kohya-format .safetensors LoRA file, not {source!r}")
    return source


LoraSource = Annotated[str, AfterValidator(check_lora_source)]


class PairInputs(Section):
    a: Source
    """Model A (what `alpha` = 0 gives)."""
    b: Source
    """Model B."""


class TripleInputs(Section):
    a: Source
    """Model A."""
    b: Source
    """Model B."""
    c: Source
    """Model C."""


class TaskVectorInputs(Section):
    base: Source
    """The model the others were fine-tuned from: their differences ("task vectors") are taken against it."""
    models: list[Source] = Field(min_length=1)
    """The fine-tuned models whose differences from `base` are merged."""
    target: Source | None = None
    """The model the merged difference is added to; null: `base`."""


class RecipeCommon(Section):
    name: RecipeName
    """The recipe's name: its output folder `<paths.merge>/<name>/` (the key of the recipe in `merge.recipes`)."""

    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    """Floating-point type of the merged weights (the math always runs in fp32; inputs may be any of the three)."""

    config: str | None = None
    """A local diffusers folder with the merged model's architecture, whose configs, tokenizer and scheduler the
    output diffusers folder gets; null: the first input that is a diffusers folder, else the base model's
    folder (`base.base_model`, or `base.base_model_config` for a single file)."""


class WeightedSumRecipe(RecipeCommon):
    method: Literal["weighted_sum"]
    """(1 - alpha) * A + alpha * B."""
    inputs: PairInputs
    """Models A and B."""
    alpha: BlockWeights
    """Share of B: one number, or per block (a block-weighted merge)."""


class AddDifferenceRecipe(RecipeCommon):
    method: Literal["add_difference"]
    """A + alpha * (B - C): adds what B learned over C to A."""
    inputs: TripleInputs
    """Models A, B and C."""
    alpha: BlockWeights
    """Strength of the difference: one number, or per block."""


class TripleSumRecipe(RecipeCommon):
    method: Literal["triple_sum"]
    """(1 - alpha - beta) * A + alpha * B + beta * C."""
    inputs: TripleInputs
    """Models A, B and C."""
    alpha: BlockWeights
    """Share of B: one number, or per block."""
    beta: BlockWeights
    """Share of C: one number, or per block."""


class SumTwiceRecipe(RecipeCommon):
    method: Literal["sum_twice"]
    """(1 - beta) * ((1 - alpha) * A + alpha * B) + beta * C: two weighted sums in a row."""
    inputs: TripleInputs
    """Models A, B and C."""
    alpha: BlockWeights
    """Share of B in the first sum: one number, or per block."""
    beta: BlockWeights
    """Share of C in the second sum: one number, or per block."""


class SlerpRecipe(RecipeCommon):
    method: Literal["slerp"]
    """Spherical interpolation from A to B, each tensor as one vector (a weighted sum where A and B are nearly
    parallel)."""
    inputs: PairInputs
    """Models A and B."""
    alpha: BlockWeights
    """Interpolation position: 0 is A, 1 is B; one number, or per block."""


class CosineAdaptiveRecipe(RecipeCommon):
    method: Literal["cosine_adaptive"]
    """Supermerger's cosine merge, one similarity per tensor: k * A + (1 - k) * B with k = clip(s - alpha, 0, 1),
    where s is the tensor's cosine similarity between A and B scaled over the model from 0 (the least similar
    tensors, 1st percentile) to 1 (the most similar, 99th percentile). Tensors where A and B agree keep more of
    A, tensors where they differ take more of B."""
    inputs: PairInputs
    """Models A and B."""
    alpha: BlockWeights
    """Shift towards B: 0 keeps A where the models agree most; 1 or more is B everywhere. One number, or per block."""


class TiesRecipe(RecipeCommon):
    method: Literal["ties"]
    """TIES-merging (Yadav et al. 2023): each model's difference from `base` is trimmed to its largest entries,
    each entry's sign is elected by the weighted sum, and the entries that agree with it are averaged (weighted);
    the result, times `scale`, is added to `target`."""
    inputs: TaskVectorInputs
    """The base, the fine-tuned models and (optionally) the target."""
    density: float = Field(gt=0.0, le=1.0)
    """Share of each difference's entries kept, by magnitude (the paper's k: 0.2 keeps the top 20%); 1 keeps all."""
    weights: list[Annotated[float, Field(gt=0.0)]] | None = None
    """One positive weight per model, for the sign election and the average; null: 1 each."""
    scale: float = 1.0
    """Strength of the merged difference (the paper's lambda)."""

    @model_validator(mode="after")
    def _one_weight_per_model(self):
        check_weights(self.weights, self.inputs.models)
        return self


class DareRecipe(RecipeCommon):
    method: Literal["dare"]
    """DARE (Yu et al. 2023): each model's difference from `base` has a random `drop_rate` share of its entries
    zeroed and the rest scaled by 1 / (1 - drop_rate); target + sum of weight * difference. Seeded: the same seed
    drops the same entries. With drop_rate 0 and one model it is add difference."""
    inputs: TaskVectorInputs
    """The base, the fine-tuned models and (optionally) the target."""
    drop_rate: float = Field(ge=0.0, lt=1.0)
    """Probability that an entry of a difference is dropped (the paper's p; 0.9 is common for large models)."""
    weights: list[float] | None = None
    """One weight per model's difference; null: 1 each."""
    seed: int | None = Field(default=None, ge=0)
    """Seed of the random drops; null: `base.seed`."""

    @model_validator(mode="after")
    def _one_weight_per_model(self):
        check_weights(self.weights, self.inputs.models)
        return self


class LoraBakeInputs(Section):
    model: Source
    """The model the LoRAs are baked into."""
    loras: list[LoraSource] = Field(min_length=1)
    """The LoRAs (kohya LoRA/LoCon, LyCORIS LoHa/LoKr, DoRA), each `train:lora` or a `.safetensors` path. Every
    layer of every LoRA must match a linear or conv layer of the model's UNet or text encoder."""


class LoraBakeRecipe(RecipeCommon):
    method: Literal["lora_bake"]
    """W + strength × ΔW for every layer each LoRA adapts, as A1111's `<lora:name:strength>` applies it (DoRA
    updates are taken against the model's own weights, for each LoRA)."""
    inputs: LoraBakeInputs
    """The model and the LoRAs."""
    strength: float | list[float] = 1.0
    """Strength of the LoRAs: one number for all, or one per LoRA."""

    @model_validator(mode="after")
    def _one_strength_per_lora(self):
        if isinstance(self.strength, list) and len(self.strength) != len(self.inputs.loras):
            raise ValueError(
                f"strength has {len(self.strength)} entries for {len(self.inputs.loras)} inputs.loras; give one "
                "number, or one per LoRA"
            )
        return self


class LoraExtractInputs(Section):
    tuned: Source
    """The fine-tuned model (e.g. `train:dreambooth`)."""
    base: Source
    """The model it was tuned from: the LoRA holds tuned − base."""


class LoraExtractRecipe(RecipeCommon):
    method: Literal["lora_extract"]
    """A kohya LoRA (`lora.safetensors`, alpha = rank so its scale is 1) of tuned − base: for every linear and conv
    layer of the UNet and text encoder whose weights differ, the truncated SVD of the difference (conv kernels
    flattened). Biases and norms are not LoRA layers and are left out. `dtype` is the LoRA's."""
    inputs: LoraExtractInputs
    """The tuned and the base model."""
    rank: int = Field(ge=1)
    """Rank of the linear (and 1x1 conv) layers (kohya `network_dim`); a layer's rank is at most its smaller side."""
    conv_rank: int | None = Field(default=None, ge=0)
    """Rank of the conv layers with a kernel larger than 1x1 (kohya `conv_dim`); 0 leaves them out; null: `rank`."""
    min_diff: float = Field(default=0.0, ge=0.0)
    """Layers whose largest absolute difference is at most this are left out; 0 keeps every layer that differs at
    all (raise it when one model was stored in fp16 and the other in fp32)."""


class LoraResizeInputs(Section):
    lora: LoraSource
    """The LoRA to resize (LoRA/LoCon, LoHa or LoKr; not DoRA, whose update depends on the model's weights)."""


class LoraResizeRecipe(RecipeCommon):
    method: Literal["lora_resize"]
    """A kohya LoRA (`lora.safetensors`, alpha = rank) of another rank: each layer's update ΔW at strength 1,
    truncated to `rank` by SVD (the best approximation of that rank). `recipe.json` reports the share of each
    layer's ΔW (Frobenius norm) the new LoRA keeps. The architecture (`config`) gives each layer's shape and must
    have every layer of the LoRA."""
    inputs: LoraResizeInputs
    """The LoRA."""
    rank: int = Field(ge=1)
    """New rank of the linear (and 1x1 conv) layers; a layer already at or below it keeps its rank."""
    conv_rank: int | None = Field(default=None, ge=0)
    """New rank of the conv layers with a kernel larger than 1x1; 0 leaves them out; null: `rank`."""


def check_weights(weights: list[float] | None, models: list[str]) -> None:
    if weights is not None and len(weights) != len(models):
        raise ValueError(f"weights has {len(weights)} entries for {len(models)} inputs.models; give one per model")


Recipe = Annotated[
    WeightedSumRecipe
    | AddDifferenceRecipe
    | TripleSumRecipe
    | SumTwiceRecipe
    | SlerpRecipe
    | CosineAdaptiveRecipe
    | TiesRecipe
    | DareRecipe
    | LoraBakeRecipe
    | LoraExtractRecipe
    | LoraResizeRecipe,
    Field(discriminator="method"),
]

LORA_FILE_METHODS = ("lora_extract", "lora_resize")
"""Methods that write a LoRA (`lora.safetensors`) instead of a model (`model/`, `model.safetensors`)."""


class MergeParams(Section):
    recipes: dict[RecipeName, Recipe] = Field(default_factory=dict)
    """Merge recipes by name, each run into `<paths.merge>/<name>/` (`model/` diffusers folder, `model.safetensors`
    original-layout single file, `recipe.json`; `lora.safetensors` and `recipe.json` for `lora_extract` and
    `lora_resize`). A list of recipes with a `name` each is accepted too."""

    @field_validator("recipes", mode="before")
    @classmethod
    def _name_recipes(cls, recipes):
        """Gives each recipe its name: the mapping key, or its own `name` in the list form."""
        if isinstance(recipes, list):
            named = {}
            for index, recipe in enumerate(recipes):
                name = recipe.get("name") if isinstance(recipe, dict) else None
                if not isinstance(name, str):
                    raise ValueError(f"recipe {index} has no `name` (in the list form every recipe needs one)")
                if name in named:
                    raise ValueError(f"two recipes are named {name!r}")
                named[name] = recipe
            return named
        if isinstance(recipes, dict):
            named = {}
            for name, recipe in recipes.items():
                if isinstance(recipe, dict):
                    if recipe.get("name", name) != name:
                        raise ValueError(
                            f"recipe {name!r} has name {recipe['name']!r}; leave `name` out or make it {name!r}"
                        )
                    recipe = {**recipe, "name": name}
                named[name] = recipe
            return named
        return recipes
