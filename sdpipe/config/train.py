"""`train`: which training methods run (one `train@<method>` DVC stage each) and their settings.

`train.common` holds what every method shares (batch size, optimizer, noise and loss options, checkpoints,
samples); `train.<method>` holds one method's own settings, including its learning rate and step count, whose
good values differ by orders of magnitude between methods. Which methods exist, and which params class below is
whose, is declared once in `sdpipe.methods.registry`; `TrainParams` gets one field per method from it.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, create_model, field_validator, model_validator

from sdpipe.config.caption import CaptionOps
from sdpipe.config.section import Section
from sdpipe.methods.registry import METHODS

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
DatasetName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]


class TrainCommon(Section):
    """Settings every training method shares (`train.common`)."""

    batch_size: int = Field(default=8, ge=1)
    """Images per micro-batch on each device."""

    gradient_accumulation_steps: int = Field(default=1, ge=1)
    """Micro-batches whose gradients add up to one optimizer step (effective batch: `batch_size` × this ×
    `processes`)."""

    processes: int = Field(default=1, ge=1)
    """Data-parallel training processes: one per GPU, or processes sharing the CPU cores (one torch thread each).
    Above 1, the `train@<method>` stage launches itself under `accelerate launch --num_processes <this>`, so that
    `dvc repro` and `dvc exp run` train with them. The processes split each micro-batch of
    `processes` × `batch_size` images: the effective batch is `processes` × `batch_size` ×
    `gradient_accumulation_steps`, and the run draws the same images, noise and timesteps as one process with that
    batch (learning rates need no change). Over several machines: the processes of all of them (see
    `accelerate_config`)."""

    accelerate_config: str | None = None
    """An accelerate config file (written by `accelerate config`; examples in `configs/accelerate/`) that the stage
    launches its processes with: which GPUs (`gpu_ids`), several machines (`num_machines`, `machine_rank`,
    `main_process_ip`, `main_process_port`). Given, the stage launches itself even with one process (to pick a GPU
    with `gpu_ids`). `processes` overrides its `num_processes`, `base.precision` its `mixed_precision`. Null: the
    processes run on one machine, on its GPUs or (with `base.device: cpu` or no CUDA) on its CPU."""

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

    compile: bool = False
    """`torch.compile` the UNet (TorchInductor; on the CPU it needs a C++ compiler): faster steps after a compile
    that takes a minute or more, so worth it for long runs, not for the tiny world's few hundred steps."""

    channels_last: bool = False
    """Keep the UNet's weights and activations in channels-last memory layout (faster convolutions on recent
    GPUs with bf16/fp16; on the CPU it rarely helps)."""

    checkpoint_every: int = Field(default=100, ge=0)
    """Save the full training state every this many optimizer steps under `<out>/checkpoints/`, to resume from
    after an interruption; 0: never."""

    keep_checkpoints: int = Field(default=2, ge=1)
    """How many of the most recent checkpoints to keep."""

    resume: bool = True
    """Resume from the latest checkpoint when one made with the same params, data and sdpipe code exists
    (others are deleted). The result is the same as that of an uninterrupted run."""

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
    `<token>_1`, `<token>_2`, … (diffusers' multi-vector convention); prompts still use `<token>` alone.
    The embedding file is named after it without `<`, `>` (`sks.safetensors`), the word that A1111 and ComfyUI
    (`embedding:sks`) take from the file name."""

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
        if not any(c.isalnum() for c in token):
            raise ValueError(
                f"placeholder_token {token!r} has no letter or digit to name the embedding file with, e.g. <sks>"
            )
        return token


class DreamArtistParams(TextualInversionParams):
    """DreamArtist (Dong et al. 2022): a positive and a negative embedding trained together, with classifier-free
    guidance inside the loss; the models stay frozen. Saves two A1111 embeddings, `<name>.safetensors` and
    `<name>-neg.safetensors`, `<name>` being the placeholder token without `<`, `>`."""

    learning_rate: float = Field(default=5e-3, gt=0.0)
    """The positive embedding's peak learning rate (after warmup)."""

    placeholder_token: str = "<sks>"
    """The positive embedding's token, which names the concept in prompts; the negative one is this + `-neg`
    (`<sks>-neg`, A1111's DreamArtist convention). With several vectors, the extra tokens are `<token>_1`, … ."""

    num_vectors: int = Field(default=1, ge=1, le=75)
    """Vectors of the positive embedding."""

    negative_num_vectors: int = Field(default=1, ge=1, le=75)
    """Vectors of the negative embedding."""

    negative_initializer_word: str | None = None
    """Word(s) whose embeddings start the negative vectors (plus noise of std 1e-3, as the reference does, so that
    the two start apart); null: `initializer_word`."""

    negative_learning_rate: float | None = Field(default=None, gt=0.0)
    """The negative embedding's peak learning rate (the reference's `neg_lr_w` × `learning_rate`); null:
    `learning_rate`."""

    cfg_scale: float = Field(default=7.5, ge=1.0)
    """The guidance scale inside the loss: the prediction compared with the noise is
    eps_neg + cfg_scale × (eps_pos − eps_neg), eps_pos conditioned on the caption with the positive tokens, eps_neg
    on the same caption with the negative ones. Sample with a guidance scale near it and `<token>-neg` in the
    negative prompt; 7.5 is the guidance `evaluate` samples with (the A1111 extension's default is 5)."""

    reconstruction_loss_weight: float = Field(default=0.0, ge=0.0)
    """The reference's reconstruction loss (its `use_rec`, on by default there with weight 1): the clean image that
    the guided prediction implies, decoded by the VAE, against the training image (L1, here the VAE's decoding of
    the image's cached latent), times this weight, added to the diffusion loss. It ties the embeddings to what the
    image looks like at every noise level. Each step then also decodes its batch with gradients through the VAE:
    at SD size (512 px) several GB more memory, as the reference warns; 0: off."""


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
LORA_PRESETS = ("sdpipe", "attn-only", "attn-mlp", "full-lin", "full")


class LoraParams(MethodParams):
    """LoRA and its LyCORIS relatives (LoCon, DoRA, LoHa, LoKr): small trained adapters beside frozen weights, saved
    as a kohya/A1111 `.safetensors` LoRA."""

    datasets: list[DatasetName] | None = Field(default_factory=lambda: ["star"])
    """Datasets (of `base.datasets`) to train on; null: all of them."""

    max_steps: int = Field(default=600, ge=1)
    """Optimizer steps to train."""

    learning_rate: float = Field(default=3e-3, gt=0.0)
    """The UNet adapters' peak learning rate (after warmup). Adapters take larger rates than full fine-tuning
    (kohya's usual 1e-4 is for SD-sized models with alpha far below the rank). The tiny-world defaults (LoCon rank 8,
    text encoder on, 3e-3, 500 steps, class images at prior_loss_weight 1) draw the held-out star: fidelity 1.000,
    prior preservation 1.000; attention-only LoRA at 1e-3 for 300 steps never did (fidelity 0)."""

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

    preset: Literal[LORA_PRESETS] = "sdpipe"  # type: ignore[valid-type]
    """Which layers get adapters, by the names of the reference trainers (LyCORIS's `preset` network argument):

    - `attn-only`: the attention projections, to_q/to_k/to_v/to_out.0 of the UNet and q/k/v/out_proj of the text
      encoder: diffusers' `train_dreambooth_lora.py` / `train_text_to_image_lora.py` (which also set alpha = rank)
      and LyCORIS `attn-only`;
    - `attn-mlp`: every linear (and 1x1 conv) layer of the UNet's transformer blocks (attention, proj_in/proj_out,
      feed-forward) and the text encoder's attention and MLP (fc1/fc2): kohya `networks.lora` (its
      `Transformer2DModel`, `CLIPAttention` and `CLIPMLP` targets) and LyCORIS `attn-mlp`;
    - `full-lin`: `attn-mlp` plus the other linear and 1x1 conv layers of the UNet: the ResNet blocks'
      time_emb_proj and conv_shortcut and the time embedding (LyCORIS `full-lin`);
    - `full`: `full-lin` plus every 3x3 convolution: the ResNet blocks, down/upsamplers, conv_in and conv_out
      (LyCORIS `full`, its default); needs `conv` on (or null);
    - `sdpipe` (the default, tuned on the tiny world): `attn-mlp`'s UNet layers and `attn-only`'s text encoder
      layers.

    `conv` adds LoCon's convolutions to any of them; the text encoder is adapted only with `train_text_encoder`."""

    conv: bool | None = None
    """Also adapt the UNet's ResNet blocks and down/upsamplers (LoCon, kohya `conv_dim`; LyCORIS does so for LoHa and
    LoKr too): their 3x3 convolutions at `conv_rank` and `conv_alpha`, their linear and 1x1 layers (time_emb_proj,
    conv_shortcut) at `rank`, as kohya does (the `sdpipe` preset, as sdpipe always has: every one of their
    convolutions at `conv_rank`, no time_emb_proj). More capacity for shape and texture, a larger file. Null: the
    preset's choice (on for `sdpipe` and `full`, off for `attn-only`, `attn-mlp` and `full-lin`, as in the reference
    trainers). `attn-mlp` with conv on is kohya's LoCon (`networks.lora` with `conv_dim`)."""

    conv_rank: int = Field(default=8, ge=1)
    """The rank of the 3x3 conv layers' adapters, when convs are adapted (kohya `conv_dim`)."""

    conv_alpha: float = Field(default=8.0, gt=0.0)
    """The alpha of the 3x3 conv layers' adapters, when convs are adapted (kohya `conv_alpha`)."""

    train_text_encoder: bool = True
    """Also put adapters on the CLIP text encoder (the layers `preset` names; kohya `lora_te_` keys), trained at
    `text_encoder_learning_rate`: the trigger word is learnt in the text encoder too. Off is LyCORIS's
    `unet-transformer-only` (with `attn-mlp`) and kohya's `network_train_unet_only`."""

    text_encoder_learning_rate: float = Field(default=5e-4, gt=0.0)
    """The text encoder adapters' peak learning rate, when `train_text_encoder` is on (kohya `text_encoder_lr`;
    usually half the UNet's or less)."""

    prior_loss_weight: float = Field(default=0.0, ge=0.0)
    """Weight of the class images' loss (kohya's regularization images and `prior_loss_weight`): loss = concept
    loss + this × class loss. The class images are the `class_images` stage's, made by
    `train.dreambooth.class_images` (shared with DreamBooth); 0 trains on the concept images alone."""

    @model_validator(mode="after")
    def _conv_fits_the_preset(self) -> LoraParams:
        if self.preset == "full" and self.conv is False:
            raise ValueError(
                "train.lora.conv is false but train.lora.preset full adapts the convolutions (LyCORIS full); "
                "use preset full-lin for every linear layer without them"
            )
        return self

    @property
    def adapts_convs(self) -> bool:
        """Whether the UNet's convolutions get adapters: `conv`, or the preset's choice when it is null."""
        return self.conv if self.conv is not None else self.preset in ("sdpipe", "full")


HYPERNETWORK_ACTIVATIONS = ("linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid", "softsign", "mish")
"""The activations that both A1111 and ComfyUI load. ComfyUI's hypernetwork loader knows only these names (a file
with another one loads as nothing: it logs an error and the model samples unchanged); A1111 takes these and every
torch.nn activation lowercased. `swish` is Hardswish in both (not SiLU)."""
HYPERNETWORK_INITIALIZATIONS = ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")


class HypernetworkParams(MethodParams):
    """A1111 hypernetworks: per context width, a pair of MLPs that transform what the UNet's attention keys and values
    come from (context + mlp(context) × strength: the text context of cross-attention, with `self_attention` the
    image features of self-attention too); the UNet and text encoder stay frozen. Saved as an A1111 hypernetwork
    `.pt`, the one file, which A1111 and ComfyUI load from `models/hypernetworks/`."""

    datasets: list[DatasetName] | None = Field(default_factory=lambda: ["outlined"])
    """Datasets (of `base.datasets`) to train on; null: all of them. Hypernetworks suit styles: every prompt gets
    the datasets' look, no trigger word needed."""

    max_steps: int = Field(default=300, ge=1)
    """Optimizer steps to train."""

    learning_rate: float = Field(default=1e-3, gt=0.0)
    """The MLPs' peak learning rate (after warmup). On the tiny world 2e-3 and 5e-3 lost much of the prompts' colors
    (A1111's usual 5e-6 is for SD-sized models)."""

    layer_structure: list[float] = Field(default_factory=lambda: [1.0, 2.0, 1.0], min_length=2)
    """Width of each MLP layer as a multiple of the context width (A1111's `layer_structure`): [1, 2, 1] is one hidden
    layer twice as wide; it must start and end with 1."""

    activation_func: str = "linear"
    """Activation after each hidden layer, one that both A1111 and ComfyUI load: `linear` (none), `relu`,
    `leakyrelu`, `elu`, `swish` (Hardswish, as both tools name it), `tanh`, `sigmoid`, `softsign` or `mish`. (A1111
    also takes the other torch.nn activations, `gelu`, `silu`, ...; ComfyUI ignores a file with one of them.)"""

    add_layer_norm: bool = False
    """A LayerNorm after every layer (A1111's `is_layer_norm`). With an activation other than `linear` it needs
    `activate_output`: ComfyUI rebuilds such a file with the activation on the output layer either way."""

    activate_output: bool = False
    """Also apply `activation_func` to the output layer."""

    use_dropout: bool = False
    """Dropout after the layers that `dropout_structure` names (training only; but ComfyUI's loader, which rebuilds
    the dropout from `use_dropout` and `last_layer_dropout` at p=0.3, leaves it on when sampling)."""

    dropout_structure: list[float] | None = None
    """Dropout probability after each layer, one per `layer_structure` entry, first and last 0 (A1111: `0, 0.05, 0`);
    only with `use_dropout`. Null: 0.3 after every hidden layer (A1111's older default)."""

    weight_initialization: Literal[HYPERNETWORK_INITIALIZATIONS] = "Normal"  # type: ignore[valid-type]
    """How the linear weights start (biases at 0): `Normal` (N(0, 0.01): the hypernetwork starts as almost the
    identity), `XavierUniform`, `XavierNormal`, `KaimingUniform` or `KaimingNormal` (A1111 recommends Kaiming for
    relu-like activations, Xavier for sigmoid-like)."""

    self_attention: bool = True
    """Also train MLPs for the widths of the UNet's self-attention layers (A1111's `Modules` 320, 640 and 1280 on
    SD 1.x, checked by default there), which transform the image features their keys and values come from; false:
    only the text context's width (768 on SD 1.x). As in A1111, a layer gets the MLPs of its context width, self- or
    cross-attention: a self-attention layer as wide as the text context gets the text context's MLPs either way. On
    the tiny world they raised the outlined style from 0.30 to 0.55 (300 steps)."""

    caption_dropout: float | None = Field(default=0.1, ge=0.0, lt=1.0)
    """Share of this method's captions replaced by the empty caption, instead of
    `train.common.caption_ops.caption_dropout` (null: that one). The MLPs transform the empty prompt's context too,
    which classifier-free guidance subtracts: dropping captions trains the style into both."""

    strength: float = Field(default=1.0, ge=0.0)
    """Sampling strength (A1111's hypernetwork strength): the MLPs' output is scaled by it; 0 gives the base model.
    Training always uses 1."""

    @field_validator("activation_func")
    @classmethod
    def _activation_loads_everywhere(cls, name: str) -> str:
        if name not in HYPERNETWORK_ACTIVATIONS:
            hint = " (A1111 and ComfyUI call Hardswish `swish`)" if name.lower() == "hardswish" else ""
            raise ValueError(
                f"{name!r} is not an activation that both A1111 and ComfyUI load{hint}; "
                f"use one of {', '.join(HYPERNETWORK_ACTIVATIONS)}"
            )
        return name

    @model_validator(mode="after")
    def _structures_fit(self) -> HypernetworkParams:
        if self.add_layer_norm and self.activation_func != "linear" and not self.activate_output:
            raise ValueError(
                f"train.hypernetwork.add_layer_norm with activation_func {self.activation_func!r} needs "
                "activate_output: true (ComfyUI's loader puts the activation after the output layer of such a file "
                "either way, so it would sample differently there than in A1111); or turn add_layer_norm off, or "
                "use activation_func: linear"
            )
        layers = self.layer_structure
        if layers[0] != 1 or layers[-1] != 1 or any(size <= 0 for size in layers):
            raise ValueError(
                f"train.hypernetwork.layer_structure {layers} must start and end with 1 and have positive sizes"
            )
        dropout = self.dropout_structure
        if dropout is not None and not self.use_dropout:
            raise ValueError(
                "train.hypernetwork.dropout_structure is set but use_dropout is false; turn dropout on or remove it"
            )
        if dropout is not None:
            if len(dropout) != len(layers):
                raise ValueError(
                    f"train.hypernetwork.dropout_structure has {len(dropout)} values; layer_structure has {len(layers)}"
                )
            if dropout[0] != 0 or dropout[-1] != 0 or any(not 0 <= p < 1 for p in dropout):
                raise ValueError(
                    f"train.hypernetwork.dropout_structure {dropout} must start and end with 0, each value in [0, 1)"
                )
        return self


class AestheticGradientParams(Section):
    """Aesthetic gradients (Gallego 2022, A1111's aesthetic-gradients extension): the mean CLIP image embedding of
    a dataset, which steers the text encoder toward its style at sampling time. Nothing is trained by the stage
    (no optimizer steps): it computes the embedding; the `aesthetic_*` settings apply when sampling."""

    datasets: list[DatasetName] | None = Field(default_factory=lambda: ["outlined"])
    """Datasets (of `base.datasets`) whose prepared images make the aesthetic embedding; null: all of them."""

    embedding_name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    """File name (without suffix) of the embedding, `<name>.pt` and `<name>.safetensors` (A1111 lists it under this
    name); null: the dataset names joined by `-`."""

    clip_model: str | list[str] | None = None
    """A CLIP model folder (transformers `CLIPModel`) whose text tower is the base model's text encoder (for SD 1.x:
    openai/clip-vit-large-patch14); null: the CLIP beside the base model, `<base_model>/clip/`, with the base's
    `feature_extractor/` for the images (the tiny world ships both). An SDXL base takes a list, one CLIP per text
    encoder in order (SDXL 1.0: openai/clip-vit-large-patch14 and laion/CLIP-ViT-bigG-14-laion2B-39B-b160k)."""

    aesthetic_weight: float = Field(default=0.9, ge=0.0, le=1.0)
    """How much of the steered conditioning replaces the prompt's own: (1 - weight) × original + weight × steered
    (A1111's `Aesthetic weight`); 0: no steering."""

    aesthetic_steps: int = Field(default=5, ge=0)
    """Adam steps that fine-tune a copy of the text encoder on each prompt (A1111's `Aesthetic steps`); 0: none."""

    aesthetic_lr: float = Field(default=1e-4, gt=0.0)
    """Learning rate of those steps (A1111's `Aesthetic learning rate`)."""

    aesthetic_slerp: bool = False
    """Blend by spherical interpolation of each token vector instead of linearly (A1111's `Slerp interpolation`)."""


class NullTextInversionParams(Section):
    """Null-text inversion (Mokady et al. 2022): per image, DDIM inversion of its latent, then per-timestep
    unconditional embeddings optimized so that guided sampling from the inverted noise retraces the inversion: an
    exact reconstruction that prompt edits start from. Optimization per image, not a trained model."""

    datasets: list[DatasetName] | None = Field(default_factory=lambda: ["star"])
    """Datasets (of `base.datasets`) whose images are inverted; null: all of them."""

    max_images: int = Field(default=4, ge=1)
    """Invert at most this many images (the first ones of the datasets, in caption-file order)."""

    num_inference_steps: int = Field(default=25, ge=2)
    """DDIM steps of the inversion and of the reconstruction (one null embedding each)."""

    guidance_scale: float = Field(default=7.5, ge=1.0)
    """Classifier-free guidance scale of the reconstruction (and of edits); the inversion itself runs unguided."""

    inner_steps: int = Field(default=10, ge=1)
    """Adam steps on the null embedding at each timestep (the paper's N)."""

    learning_rate: float = Field(default=0.1, gt=0.0)
    """Adam's learning rate on the null embeddings, decaying by 1% per timestep (the paper uses 1e-2 on SD; on the tiny
    world 0.1 brings 4 star images to 27.9 dB, against 15.6 dB for plain DDIM inversion and 28.1 dB for the VAE alone)."""

    early_stop_epsilon: float = Field(default=1e-5, ge=0.0)
    """Stop a timestep's inner steps once the latent error falls below this plus a little more at each timestep
    (the paper's ε + i·2e-5); 0: always run every inner step."""


CUSTOM_DIFFUSION_LAYERS = ("crossattn_kv", "crossattn")


class CustomDiffusionConcept(Section):
    """One concept of Custom Diffusion (an entry of `train.custom_diffusion.concepts`): the dataset that shows it and
    the modifier token that names it."""

    dataset: DatasetName = "star"
    """The dataset (of `base.datasets`) whose images show the concept."""

    modifier_token: str = "<new1>"
    """The new token that names the concept in prompts (`a red <new1> shape`): a new row of the text encoder's token
    embeddings, trained with the cross-attention (the reference's `--modifier_token`)."""

    initializer_word: str = Field(default="shape", min_length=1)
    """Word whose embedding starts the modifier token's (the first of its tokens, when it has several)."""

    replace_word: str | None = "sks"
    """The concept's trigger word in the dataset's captions, replaced by the modifier token (`a red sks shape` →
    `a red <new1> shape`). Null (one concept only): the modifier token is put before every caption without it."""

    @field_validator("modifier_token")
    @classmethod
    def _token_is_one_word(cls, token: str) -> str:
        if not token or token != token.strip() or any(c.isspace() for c in token):
            raise ValueError("modifier_token must be one word without spaces, e.g. <new1>")
        return token


class CustomDiffusionParams(MethodParams):
    """Custom Diffusion (Kumari et al. 2023): trains the cross-attention key/value projections of the UNet and a
    modifier token per concept, with a prior-preservation loss on class images. Saves diffusers' custom-diffusion
    weights (`unet.load_attn_procs`) and one textual-inversion embedding per modifier token."""

    datasets: list[DatasetName] | None = None
    """Leave null: Custom Diffusion trains the datasets of its `concepts`, each with its own modifier token."""

    max_steps: int = Field(default=300, ge=1)
    """Optimizer steps to train (each on `train.common.batch_size` concept images and as many class images)."""

    learning_rate: float = Field(default=1e-3, gt=0.0)
    """The cross-attention weights' peak learning rate (after warmup). The reference's 1e-5 suits SD-sized models;
    on the tiny world 2e-4–3e-3 all moved K/V by 20–60% of their norm."""

    token_learning_rate: float = Field(default=5e-3, gt=0.0)
    """The modifier tokens' peak learning rate: embeddings take larger rates than weights (textual inversion's)."""

    freeze_model: Literal[CUSTOM_DIFFUSION_LAYERS] = "crossattn_kv"  # type: ignore[valid-type]
    """What trains in every cross-attention layer (the reference's `--freeze_model`): `crossattn_kv`, the key and
    value projections of the text features (the paper's choice: 5% of the UNet on SD); `crossattn`, also the query
    and output projections."""

    caption_dropout: float | None = Field(default=None, ge=0.0, lt=1.0)
    """Share of the concept captions replaced by the empty caption, instead of
    `train.common.caption_ops.caption_dropout` (null: that one). The trained K/V also compute the unconditional
    prediction that classifier-free guidance subtracts; dropping captions trains it on the concept images (on the
    tiny world 0.1 lowered prior preservation from 0.60 to 0.46 and did not help fidelity)."""

    prior_loss_weight: float = Field(default=1.0, ge=0.0)
    """Weight of the class images' loss: loss = concept loss + this × class loss (the reference's 1.0). The class
    images are the `class_images` stage's, made by `train.dreambooth.class_images` (shared with DreamBooth); 0 turns
    prior preservation off (no class images are read)."""

    concepts: list[CustomDiffusionConcept] = Field(default_factory=lambda: [CustomDiffusionConcept()], min_length=1)
    """The concepts trained together (multi-concept Custom Diffusion), each a dataset with its own modifier token."""

    @model_validator(mode="after")
    def _concepts_are_distinct(self) -> CustomDiffusionParams:
        key = "train.custom_diffusion"
        if self.datasets is not None:
            raise ValueError(
                f"{key}.datasets must stay null: list each dataset as a concept (concepts[].dataset) with its "
                "modifier token"
            )
        for field in ("dataset", "modifier_token", "replace_word"):
            values = [getattr(concept, field) for concept in self.concepts if getattr(concept, field) is not None]
            repeated = sorted({value for value in values if values.count(value) > 1})
            if repeated:
                raise ValueError(f"{key}.concepts: two concepts have the {field} {repeated[0]!r}; each needs its own")
        if len(self.concepts) > 1 and any(concept.replace_word is None for concept in self.concepts):
            raise ValueError(
                f"{key}.concepts: with several concepts each needs a replace_word (the trigger word of its "
                "captions), which tells whose modifier token a caption gets"
            )
        return self


class ClipInversionParams(MethodParams):
    """CLIP inversion: one concept vector in CLIP image-embedding space, optimized through a model conditioned on
    CLIP image embeddings (an image-variations model) so that it draws the concept; the models stay frozen."""

    datasets: list[DatasetName] | None = Field(default_factory=lambda: ["star"])
    """Datasets (of `base.datasets`) to train on; null: all of them."""

    max_steps: int = Field(default=300, ge=1)
    """Optimizer steps to train."""

    learning_rate: float = Field(default=1e-2, gt=0.0)
    """The peak learning rate (after warmup); like an embedding's, much larger than a weight's."""

    variations_model: str = "artifacts/pretrain/tinyworld_variations"
    """The image-variations model (a diffusers `StableDiffusionImageVariationPipeline` folder, e.g. the tiny
    world's, or `lambdalabs/sd-image-variations-diffusers` for SD 1.x) whose UNet takes the vector as its context.
    It must share `base.base_model`'s VAE latent space (the latents come from the `encode` stage)."""

    init: Literal["dataset_mean", "zeros"] = "dataset_mean"
    """Where the vector starts: the mean CLIP image embedding of the training images (what plain image variations
    of the dataset would use), or zeros (the unconditional input)."""

    trigger_word: str = Field(default="sks", min_length=1)
    """The word that names the concept in prompts (`sdpipe sample --method clip_inversion --prompt "a sks"`): the
    model has no text input, so a prompt either names the concept or is refused."""


class TrainSettings(Section):
    """What the `train` section holds besides the methods' own subsections (`TrainParams` adds those)."""

    methods: list[Literal[tuple(METHODS)]] = Field(default_factory=list)  # type: ignore[valid-type]
    """Methods to train, each as its own `train@<method>` stage writing `artifacts/train/<method>/`."""

    common: TrainCommon = Field(default_factory=TrainCommon)
    """Settings every method shares."""

    @field_validator("methods")
    @classmethod
    def _methods_are_listed_once(cls, methods: list[str]) -> list[str]:
        if len(set(methods)) != len(methods):
            raise ValueError("a method is listed twice")
        return methods


def method_field(method):
    """The field `train.<name>` of a registered method: its params class (defined above, named by the registry)
    with its defaults, documented by the method's summary."""
    params_class = globals()[method.params]
    return params_class, Field(default_factory=params_class, description=method.summary)


TrainParams = create_model(
    "TrainParams",
    __base__=TrainSettings,
    __module__=__name__,
    __doc__="`train`: `methods`, `common`, and one subsection per method of the registry (`train.<method>`).",
    **{name: method_field(method) for name, method in METHODS.items()},
)
