"""`evaluate`: sampling every model with the same prompts and seeds and scoring it."""

from pydantic import Field

from sdpipe.config.section import Section


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

    concept_dataset: str = "star"
    """The dataset of the concept (in `base.datasets`): CLIP-I and KID compare samples with its images."""

    concept_shape: str = "star"
    """What the oracle must read as the shape of a concept sample for it to count towards `fidelity`."""

    style: str = "outlined"
    """The style the style methods learn; `style` is the share of samples the oracle reads in it."""

    clip_model: str | None = None
    """A CLIP model folder (transformers `CLIPModel`) for CLIP-T, CLIP-I and KID; null: the tiny world's CLIP
    shipped beside the base model (`<base.base_model>/clip`), or no CLIP metrics when it has none."""

    dino_model: str | None = None
    """A DINO / DINOv2 model folder (transformers `AutoModel`, e.g. facebook/dinov2-small saved locally) for the `dino`
    subject-fidelity metric; null: no DINO metric (the tiny world ships none)."""

    validation_datasets: list[str] = Field(default_factory=lambda: ["star_val"])
    """Held-out datasets (in `base.datasets`, not trained on) for the validation loss; empty: none."""
