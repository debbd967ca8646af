"""`evaluate`: sampling every model with the same prompts and seeds and scoring it."""

from pydantic import Field, model_validator

from sdpipe.config.section import Section


class Concept(Section):
    """What the oracle reads as a dataset's concept: a shape (fidelity, editability) or a style (style)."""

    shape: str | None = None
    """The shape a concept sample must show (`star`, `cross`, ...) to count towards `fidelity`."""

    style: str | None = None
    """The style (`outlined`, `dark`) a sample of an `a <color> <shape>` prompt must show to count towards `style`."""

    @model_validator(mode="after")
    def _one_kind(self):
        if (self.shape is None) == (self.style is None):
            raise ValueError("a concept is either a shape or a style: give exactly one of shape, style")
        return self


def default_concepts() -> dict[str, Concept]:
    return {
        "star": Concept(shape="star"),
        "cross": Concept(shape="cross"),
        "outlined": Concept(style="outlined"),
        "dark": Concept(style="dark"),
    }


class EvaluateParams(Section):
    seeds_per_prompt: int = Field(default=8, ge=2)
    """Images sampled per prompt (seeds 0..N-1, the same for every model)."""

    steps: int = Field(default=25, ge=1)
    """Sampler steps per image."""

    guidance_scale: float = Field(default=7.5, ge=1.0)
    """Classifier-free guidance scale."""

    batch_size: int = Field(default=64, ge=1)
    """Images sampled per pipeline call."""

    oracle: bool = True
    """Score with the tiny world's oracle (color/shape/joint accuracy, `prior_preservation`, `fidelity`, `editability`,
    `style`: the `a <color> <shape>` prompts are sampled too). false for a real model: only the concept prompts are
    sampled (CLIP, DINO, validation loss, the grid) and evaluate imports nothing of `sdpipe.tinyworld`."""

    colors: list[str] = Field(default_factory=lambda: ["red", "green", "blue", "yellow"], min_length=1)
    """The colors of the concept prompts `a <color> <trigger> <class_word>` (with the oracle: colors the tiny world
    draws, which it reads)."""

    trigger: str = Field(default="sks", min_length=1)
    """The concept's trigger word in the dataset captions; a method that names the concept differently (textual
    inversion's placeholder token) substitutes its own."""

    class_word: str = Field(default="shape", min_length=1)
    """The class word after the trigger in the concept prompts: `a <color> <trigger> <class_word>`."""

    concepts: dict[str, Concept] = Field(default_factory=default_concepts)
    """What each training dataset teaches, as the oracle reads it, by dataset name. A method's row is scored on the
    concept of the first of its datasets listed here (the scoreboard's `concept` column); every row also records the
    rate of every concept (`concept_rates`), so the base's rate stands beside each method's."""

    concept_dataset: str = "star"
    """The concept (a key of `concepts`, in `base.datasets`) of the rows that trained on none: the base and merges of
    models that did not. CLIP-I and KID compare a row's samples with its shape concept's images."""

    clip_model: str | None = None
    """A CLIP model folder (transformers `CLIPModel`) for CLIP-T, CLIP-I and KID; null: the tiny world's CLIP
    shipped beside the base model (`<base.base_model>/clip`), or no CLIP metrics when it has none."""

    dino_model: str | None = None
    """A DINO / DINOv2 model folder (transformers `AutoModel`, e.g. facebook/dinov2-small saved locally) for the `dino`
    subject-fidelity metric; null: no DINO metric (the tiny world ships none)."""

    validation_datasets: list[str] = Field(default_factory=lambda: ["star_val"])
    """Held-out datasets (in `base.datasets`, not trained on) for the validation loss; empty: none."""
