"""`train`: which training methods run (one `train@<method>` DVC stage each) and their settings.

`train.common` holds what every method shares (batch size, optimizer, noise and loss options, checkpoints,
samples); `train.<method>` holds one method's own settings, including its learning rate and step count, whose
good values differ by orders of magnitude between methods.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from sdpipe.config.caption import CaptionOps
from sdpipe.config.section import Section

METHODS = (
    "finetune",
    "textual_inversion",
    "aesthetic_gradient",
    "custom_diffusion",
    "hypernetwork",
    "null_text_inversion",
    "clip_inversion",
    "dreamartist",
    "dreambooth",
    "lora",
)
# methods whose sdpipe.methods module exists
BUILT_METHODS: tuple[str, ...] = ("textual_inversion", "finetune", "dreambooth", "lora")

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
DatasetName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]


class TrainCommon(Section):
    """Settings every training method shares (`train.common`)."""

    batch_size: int = Field(default=8, ge=1)
    """Images per micro-batch on each device."""

    gradient_accumulation_steps: int = Field(default=1, ge=1)
    """Micro-batches whose gradients add up to one optimizer step (effective batch: `batch_size` × this ×
    the number of devices)."""

    lr_scheduler: Literal[LR_SCHEDULERS] = "constant_with_warmup"  # type: ignore[valid-type]
    """How the learning rate changes over the steps (diffusers' `get_scheduler` names): `constant`,
    `constant_with_warmup`, `linear`, `cosine`, `cosine_with_restarts` or `polynomial`."""

    lr_warmup_steps: int = Field(default=20, ge=0)
    """Optimizer steps over which the learning rate rises linearly from 0 (ignored by `constant`)."""

    adam_beta1: float = Field(default=0.9, ge=0.0, lt=1.0)
    """AdamW's first-moment decay."""

    adam_beta2: float = Field(default=0.999, ge=0.0, lt=1.0)
    """AdamW's second-moment decay."""

    adam_epsilon: float = Field(default=1e-8, gt=0.0)
    """AdamW's denominator epsilon."""

    weight_decay: float = Field(default=0.01, ge=0.0)
    """AdamW's decoupled weight decay."""

    use_8bit_adam: bool = True
    """Use bitsandbytes' 8-bit AdamW (less optimizer memory) when bitsandbytes is installed and training runs on
    CUDA; the ordinary AdamW otherwise."""

    max_grad_norm: float | None = Field(default=1.0, gt=0.0)
    """Clip the gradient norm to this value before each optimizer step; null: no clipping."""

    snr_gamma: float | None = Field(default=5.0, gt=0.0)
    """Min-SNR-γ loss weighting (Hang et al. 2023): each timestep's loss is weighted by min(SNR, γ)/SNR
    (min(SNR, γ)/(SNR + 1) for v-prediction). 5 is the paper's value; null: the plain mean squared error."""

    noise_offset: float = Field(default=0.0, ge=0.0)
    """Add this much per-channel constant noise (Guttenberg's offset noise) so that the model learns to change
    the mean brightness; 0.05–0.1 is usual, 0 turns it off."""

    min_timestep: int = Field(default=0, ge=0)
    """The smallest diffusion timestep sampled for training (inclusive)."""

    max_timestep: int | None = Field(default=None, ge=1)
    """The largest diffusion timestep sampled for training (exclusive); null: the scheduler's
    `num_train_timesteps` (1000 for SD)."""

    flip: bool = True
    """Use the cached left-right flipped latents (`encode.flip`) for a random half of the samples."""

    caption_ops: CaptionOps = Field(default_factory=CaptionOps)
    """Caption changes made each time a caption is used (trigger word, tag shuffle and dropout, caption dropout)."""

    cache_text_embeddings: bool = True
    """When a method keeps the text encoder frozen, encode each distinct caption once and reuse it (same
    result, less compute). Captions that change at every step (tag shuffle or dropout) are never cached."""

    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass of the trained models instead of storing them: less memory,
    about 20% slower."""

    checkpoint_every: int = Field(default=100, ge=0)
    """Save the full training state every this many optimizer steps under `<out>/checkpoints/`, to resume from
    after an interruption; 0: never."""

    keep_checkpoints: int = Field(default=2, ge=1)
    """How many of the most recent checkpoints to keep."""

    resume: bool = True
    """Resume from the latest checkpoint when one made with the same params and data exists (others are
    deleted). The result is the same as that of an uninterrupted run."""

    sample_every: int = Field(default=100, ge=0)
    """Sample `sample_prompts` with fixed seeds every this many optimizer steps (and after the last one) into
    `<out>/samples/`; 0: never."""

    sample_prompts: list[str] = Field(default_factory=lambda: ["a blue sks shape", "a red sks shape"])
    """Prompts for the sample images, written as the captions are (a method maps its trigger word as it does
    in captions, e.g. textual inversion replaces `sks` by its placeholder token)."""

    sample_steps: int = Field(default=20, ge=1)
    """Denoising steps of each sample image (DDIM)."""

    sample_guidance_scale: float = Field(default=7.5, ge=1.0)
    """Classifier-free guidance scale of the sample images (1: no guidance)."""

    @model_validator(mode="after")
    def _ranges_are_usable(self) -> TrainCommon:
        if self.max_timestep is not None and self.min_timestep >= self.max_timestep:
            raise ValueError(
                f"train.common.min_timestep ({self.min_timestep}) must be smaller than "
                f"train.common.max_timestep ({self.max_timestep})"
            )
        if self.sample_every and not self.sample_prompts:
            raise ValueError("train.common.sample_prompts is empty; list a prompt or set sample_every to 0")
        return self


class MethodParams(Section):
    """What every method section has: the data it trains on, how long, and how fast."""

    datasets: list[DatasetName] | None = None
    """Datasets (of `base.datasets`) to train on; null: all of them."""

    max_steps: int = Field(default=500, ge=1)
    """Optimizer steps to train."""

    learning_rate: float = Field(default=1e-4, gt=0.0)
    """The peak learning rate (after warmup)."""


class TextualInversionParams(MethodParams):
    """Textual inversion (Gal et al. 2022): learns new token embeddings for a concept; the models stay frozen."""

    datasets: list[DatasetName] | None = Field(default_factory=lambda: ["star"])
    """Datasets (of `base.datasets`) to train on; null: all of them."""

    max_steps: int = Field(default=300, ge=1)
    """Optimizer steps to train."""

    learning_rate: float = Field(default=5e-3, gt=0.0)
    """The peak learning rate (after warmup); embeddings take much larger rates than weights (A1111: 5e-3)."""

    placeholder_token: str = "<sks>"
    """The new token that names the concept in prompts. With several vectors, the extra tokens are
    `<token>_1`, `<token>_2`, … (diffusers' multi-vector convention); prompts still use `<token>` alone."""

    num_vectors: int = Field(default=1, ge=1, le=75)
    """Embedding vectors learned for the token: more vectors hold more detail but leave fewer of the prompt's
    tokens and overfit sooner."""

    initializer_word: str = Field(default="shape", min_length=1)
    """Word(s) whose embeddings start the new vectors: a coarse description of the concept (`dog`, `shape`).
    If it tokenizes to several tokens, they are spread over the vectors."""

    replace_word: str | None = "sks"
    """The trigger word of the captions, replaced by the placeholder token; captions without it get the
    placeholder token prepended. Null: always prepend."""

    @field_validator("placeholder_token")
    @classmethod
    def _token_is_one_word(cls, token: str) -> str:
        if not token or token != token.strip() or any(c.isspace() for c in token):
            raise ValueError("placeholder_token must be one word without spaces, e.g. <sks>")
        return token


class WeightTrainingParams(MethodParams):
    """What the methods that train the model's own weights (fine-tuning, DreamBooth) share."""

    train_text_encoder: bool = False
    """Also train every weight of the CLIP text encoder (at `text_encoder_learning_rate`), not only the UNet: the
    model learns new words better, but drifts more from the base and needs more memory."""

    text_encoder_learning_rate: float = Field(default=5e-5, gt=0.0)
    """The text encoder's peak learning rate, when `train_text_encoder` is on (usually below the UNet's)."""

    caption_dropout: float | None = Field(default=0.1, ge=0.0, lt=1.0)
    """Share of this method's captions replaced by the empty caption, instead of
    `train.common.caption_ops.caption_dropout` (null: that one). Training the weights on a few images moves the
    conditional prediction away from the unconditional one that classifier-free guidance subtracts; dropping
    captions trains both (on the tiny world, 0.1 raised the fine-tuned star fidelity from 0.5 to 0.84)."""

    ema_decay: float | None = Field(default=None, gt=0.0, lt=1.0)
    """Keep an exponential moving average (EMA) of the trained weights, checkpointed with them, and save it instead
    of the last weights; null: no EMA. The first step copies the weights, the n-th keeps min(ema_decay, n / (n + 9))
    of the average (diffusers' `EMAModel` warmup), so a run of a few hundred steps averages about its last few
    dozen whatever this cap; 0.999–0.9999 suits runs of many thousands of steps."""


CLASS_COLORS = ("red", "green", "blue", "yellow")
CLASS_SHAPES = ("circle", "square", "triangle")  # the tiny world's shapes the base model knows


class ClassImagesParams(Section):
    """DreamBooth's class images (`train.dreambooth.class_images`): generated by the base model from class prompts
    (the `class_images` stage, cached as its own output), or a dataset the user supplies."""

    dataset: DatasetName | None = None
    """A dataset of `base.datasets` (prepared, captioned and encoded like the others) whose images are the class
    images, with their captions as class prompts; null: generate them with the base model from `prompts`."""

    prompts: list[str] = Field(
        default_factory=lambda: [
            f"a {size} {color} {shape}"
            for shape in CLASS_SHAPES
            for color in CLASS_COLORS
            for size in ("small", "large")
        ],
        min_length=1,
    )
    """Class prompts: members of the subject's class, without the trigger word. Generated image i uses prompt
    i mod len(prompts); varied prompts (every shape, color and size) keep more of the base model than one generic
    prompt. The tiny-world default names the shapes the base knows: with `a small red shape`-style prompts, which
    differ from the instance captions by the trigger word only, the class loss undid the concept (star fidelity
    0.06 against 0.16–0.5 with these)."""

    num_images: int = Field(default=72, ge=1)
    """Class images to generate (diffusers' `num_class_images`); each is seeded by `base.seed` and its index."""

    steps: int = Field(default=25, ge=1)
    """Denoising steps per generated image (the base model's own scheduler)."""

    guidance_scale: float = Field(default=7.5, ge=1.0)
    """Classifier-free guidance scale of the generated images."""

    batch_size: int = Field(default=32, ge=1)
    """Images generated per pipeline call (only speed and memory depend on it)."""


class FinetuneParams(WeightTrainingParams):
    """Full fine-tuning: trains every UNet weight (and optionally the text encoder) on captioned datasets, with an
    EMA of the weights. Saves a diffusers folder and a single-file checkpoint."""

    datasets: list[DatasetName] | None = Field(default_factory=lambda: ["star"])
    """Datasets (of `base.datasets`) to train on; null: all of them."""

    max_steps: int = Field(default=300, ge=1)
    """Optimizer steps to train."""

    learning_rate: float = Field(default=2e-4, gt=0.0)
    """The UNet's peak learning rate (after warmup)."""

    ema_decay: float | None = Field(default=0.999, gt=0.0, lt=1.0)
    """Keep an exponential moving average (EMA) of the trained weights, checkpointed with them, and save it instead
    of the last weights; null: no EMA. The first step copies the weights, the n-th keeps min(ema_decay, n / (n + 9))
    of the average (diffusers' `EMAModel` warmup), so a run of a few hundred steps averages about its last few
    dozen whatever this cap; 0.999–0.9999 suits runs of many thousands of steps."""


class DreamBoothParams(WeightTrainingParams):
    """DreamBooth (Ruiz et al. 2022): fine-tunes the UNet (optionally the text encoder) on the instance images,
    whose captions hold the trigger word, with a prior-preservation loss on class images. Saves a diffusers folder
    and a single-file checkpoint."""

    datasets: list[DatasetName] | None = Field(default_factory=lambda: ["star"])
    """Instance datasets (of `base.datasets`) to train on; null: all of them (but the class image dataset)."""

    max_steps: int = Field(default=300, ge=1)
    """Optimizer steps to train (each on `train.common.batch_size` instance and as many class images)."""

    learning_rate: float = Field(default=2e-4, gt=0.0)
    """The UNet's peak learning rate (after warmup)."""

    train_text_encoder: bool = True
    """Also train every weight of the CLIP text encoder (at `text_encoder_learning_rate`), not only the UNet. On
    for DreamBooth: with a frozen text encoder the trigger word barely changes the conditioning, and the class
    loss then keeps the model from learning the subject."""

    text_encoder_learning_rate: float = Field(default=5e-4, gt=0.0)
    """The text encoder's peak learning rate, when `train_text_encoder` is on."""

    prior_loss_weight: float = Field(default=0.5, ge=0.0)
    """Weight of the class images' loss: loss = instance loss + this × class loss (diffusers' `train_dreambooth.py`;
    its usual 1.0 held the concept back on the tiny world). 0 turns prior preservation off (no class images are
    read)."""

    class_images: ClassImagesParams = Field(default_factory=ClassImagesParams)
    """The class images of the prior-preservation loss."""

    @model_validator(mode="after")
    def _class_images_are_not_instance_images(self) -> DreamBoothParams:
        class_dataset = self.class_images.dataset
        if class_dataset is not None and self.datasets is None:
            raise ValueError(
                f"train.dreambooth.class_images.dataset is {class_dataset!r}, so train.dreambooth.datasets must "
                "list the instance datasets (null would train on every dataset, the class images included)"
            )
        if class_dataset is not None and class_dataset in self.datasets:
            raise ValueError(
                f"train.dreambooth.class_images.dataset {class_dataset!r} is also an instance dataset "
                "(train.dreambooth.datasets); class images must be other images of the class"
            )
        return self


LORA_ALGORITHMS = ("lora", "dora", "loha", "lokr")


class LoraParams(MethodParams):
    """LoRA and its LyCORIS relatives (LoCon, DoRA, LoHa, LoKr): small trained adapters beside frozen weights, saved
    as a kohya/A1111 `.safetensors` LoRA."""

    datasets: list[DatasetName] | None = Field(default_factory=lambda: ["star"])
    """Datasets (of `base.datasets`) to train on; null: all of them."""

    max_steps: int = Field(default=300, ge=1)
    """Optimizer steps to train."""

    learning_rate: float = Field(default=1e-3, gt=0.0)
    """The UNet adapters' peak learning rate (after warmup). Adapters take larger rates than full fine-tuning
    (kohya's usual 1e-4 is for SD-sized models with alpha far below the rank)."""

    algorithm: Literal[LORA_ALGORITHMS] = "lora"  # type: ignore[valid-type]
    """The adapter: `lora` (ΔW = B·A, kohya `networks.lora`; loads in diffusers), `dora` (LoRA with a trained
    magnitude per output channel, Liu et al. 2024), `loha` (Hadamard product of two low-rank products, LyCORIS) or
    `lokr` (Kronecker product, LyCORIS)."""

    rank: int = Field(default=8, ge=1)
    """The adapters' rank (kohya `network_dim`): larger holds more detail, makes larger files and overfits sooner.
    For LoKr it only decides which Kronecker factors are low-rank (both are full on layers under 2 × rank wide)."""

    alpha: float = Field(default=8.0, gt=0.0)
    """The adapters' alpha (kohya `network_alpha`): the update is scaled by alpha / rank, so alpha = rank trains at
    the learning rate as given and a smaller alpha acts as a smaller rate."""

    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Dropout probability: on each adapter's input for `lora`/`dora`, on the rows of the update (LyCORIS rank
    dropout) for `loha`/`lokr`; 0: none."""

    conv: bool = False
    """Also adapt the UNet's ResNet and down/upsampler convolutions (LoCon; LyCORIS does so for LoHa and LoKr too),
    with `conv_rank` and `conv_alpha`: more capacity for shape and texture, a larger file."""

    conv_rank: int = Field(default=4, ge=1)
    """The rank of the conv layers' adapters, when `conv` is on (kohya `conv_dim`)."""

    conv_alpha: float = Field(default=4.0, gt=0.0)
    """The alpha of the conv layers' adapters, when `conv` is on (kohya `conv_alpha`)."""

    train_text_encoder: bool = False
    """Also put adapters on the CLIP text encoder's attention projections (q/k/v/out_proj; kohya `lora_te_` keys),
    trained at `text_encoder_learning_rate`: the trigger word is learnt in the text encoder too."""

    text_encoder_learning_rate: float = Field(default=5e-4, gt=0.0)
    """The text encoder adapters' peak learning rate, when `train_text_encoder` is on (kohya `text_encoder_lr`;
    usually half the UNet's or less)."""


class TrainParams(Section):
    methods: list[Literal[METHODS]] = Field(default_factory=list)  # type: ignore[valid-type]
    """Methods to train, each as its own `train@<method>` stage writing `artifacts/train/<method>/`."""

    common: TrainCommon = Field(default_factory=TrainCommon)
    """Settings every method shares."""

    textual_inversion: TextualInversionParams = Field(default_factory=TextualInversionParams)
    """Textual inversion: new token embeddings (A1111 `.pt`/`.safetensors` and diffusers-loadable)."""

    finetune: FinetuneParams = Field(default_factory=FinetuneParams)
    """Full fine-tuning of the UNet (optionally the text encoder), with EMA: diffusers folder + single file."""

    dreambooth: DreamBoothParams = Field(default_factory=DreamBoothParams)
    """DreamBooth with prior preservation: diffusers folder + single file."""

    lora: LoraParams = Field(default_factory=LoraParams)
    """LoRA / LoCon / DoRA / LoHa / LoKr adapters: a kohya/A1111 `.safetensors` LoRA (diffusers loads plain LoRA)."""

    @field_validator("methods")
    @classmethod
    def _methods_are_built(cls, methods: list[str]) -> list[str]:
        missing = [m for m in methods if m not in BUILT_METHODS]
        if missing:
            built = ", ".join(BUILT_METHODS) or "none yet"
            raise ValueError(f"method(s) {', '.join(missing)} not available in this version (available: {built})")
        if len(set(methods)) != len(methods):
            raise ValueError("a method is listed twice")
        return methods
