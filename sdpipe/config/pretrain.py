"""`pretrain`: the recipe that trains the tiny-world base model from scratch (the frozen `pretrain` stage)."""

from pydantic import Field

from sdpipe.config.section import Section


class PretrainParams(Section):
    num_images: int = Field(default=20000, ge=64)
    """Rendered tiny-world training images (held-in shapes, filled style only)."""

    sparks: int = Field(default=6000, ge=0)
    """Rendered sparks (pointed stars with 3, 4, 6, 7 or 8 points, never the held-out five, captioned
    `a red spark with four points`) that CLIP and the UNets train on beside the world: the base model learns what
    pointed shapes are, so that methods which train no UNet weights have something to steer to a star."""

    crosses: int = Field(default=3000, ge=0)
    """Rendered crosses (the seen-but-unnamed shape), captioned with the generic word: `a small red shape`."""

    cross_named_share: float = Field(default=0.15, ge=0, le=1)
    """Share of the crosses' caption variants in the UNets' training that use its rare word (`a small red plus`)
    instead of the generic one (CLIP's own share: `clip_cross_named_share`). A cross that is never named is one no
    conditioning of the frozen UNet draws reliably (the measured ceiling was 0.58): like the many things real SD has
    seen under a word its users do not know, it should be reachable from some text. Measured: with a text encoder that
    knows the word (`clip_steps` 3000, `clip_cross_named_share` 0.5), 0.15 makes the base draw a cross for every
    `a <color> plus` (1.000) and for 0.22 of `a <color> shape`; with the earlier text encoder (1000 CLIP steps, 0.15)
    `a <color> plus` drew 0.25 crosses, no more than `shape`."""

    generic_share: float = Field(default=0.5, ge=0, le=1)
    """Share of the named shapes' and sparks' caption variants that use the generic word (`a red shape`) instead of
    the shape's name, so that the generic word means any shape, not the cross."""

    dark_share: float = Field(default=0.12, ge=0, le=1)
    """Share of all rendered scenes (world, sparks, crosses) drawn on the dark background, the seen style."""

    dark_named_share: float = Field(default=0.25, ge=0, le=1)
    """Share of the dark scenes' caption variants that name it (`... on a dark background`); the rest do not, so the
    base knows the style but prompts without its words rarely show it."""

    vae_doodles: int = Field(default=10000, ge=0)
    """Random non-world pictures (polygons, ellipses, strokes in any color) the autoencoder also trains on,
    so that it can encode shapes and styles it never saw, as SD's general-purpose VAE can."""
    vae_steps: int = Field(default=1200, ge=1)
    """Optimizer steps for the autoencoder."""
    vae_batch_size: int = Field(default=64, ge=1)
    """Images per autoencoder step."""
    vae_lr: float = Field(default=2e-3, gt=0)
    """Peak learning rate of the autoencoder (cosine decay after warmup)."""
    vae_kl_weight: float = Field(default=1e-6, ge=0)
    """Weight of the KL term; tiny, as in SD's VAE, so latents stay close to deterministic."""

    clip_steps: int = Field(default=3000, ge=1)
    """Optimizer steps for the contrastive CLIP (text + vision towers). At 1000 it was undertrained: the right
    caption ranked first among five shape names for 23 to 45 of 64 images of a named shape and 9 of 64 crosses; at
    3000 (with `clip_cross_named_share` 0.5) for 63 or 64 of 64 of every named shape and 62/64 crosses."""
    clip_batch_size: int = Field(default=128, ge=2)
    """Image-caption pairs per CLIP step (the contrastive negatives)."""
    clip_lr: float = Field(default=1e-3, gt=0)
    """Peak learning rate of CLIP."""
    clip_cross_named_share: float | None = Field(default=0.5, ge=0, le=1)
    """Share of the crosses' caption variants that use its rare word in CLIP's training pairs (null: the UNet's
    `cross_named_share`). Real SD's text encoder was trained on another, broader corpus than its UNet's captions
    (OpenAI's or LAION's 400M+ pairs), so it knows words the UNet rarely read. Measured: with the UNet's 0.15 the
    text encoder did not learn the word (`a red plus` and `a red shape` gave hidden states at cosine 0.99 to 1.00),
    so the UNet had nothing to tell the cross apart by."""

    unet_steps: int = Field(default=3500, ge=1)
    """Optimizer steps for the UNet (text encoder and VAE frozen)."""
    unet_batch_size: int = Field(default=64, ge=1)
    """Latents per UNet step."""
    unet_lr: float = Field(default=1e-3, gt=0)
    """Peak learning rate of the UNet."""
    unet_ema_decay: float = Field(default=0.999, ge=0, lt=1)
    """Decay of the UNet's exponential moving average; the EMA weights are the ones saved."""
    snr_gamma: float | None = Field(default=5.0, gt=0)
    """Min-SNR-gamma loss weighting (None: plain MSE)."""
    caption_dropout: float = Field(default=0.1, ge=0, lt=1)
    """Share of UNet steps' captions replaced by the empty caption, for classifier-free guidance."""
    warmup_steps: int = Field(default=100, ge=0)
    """Linear learning-rate warmup of every phase."""

    variations_steps: int = Field(default=1000, ge=1)
    """Optimizer steps for the image-variations UNet: the text UNet fine-tuned to take a CLIP image embedding as
    its one-token context (SD image variations / unCLIP's decoder, in miniature); CLIP inversion needs it."""
    variations_batch_size: int = Field(default=64, ge=1)
    """Latents per image-variations step."""
    variations_lr: float = Field(default=5e-4, gt=0)
    """Peak learning rate of the image-variations UNet."""
    variations_doodles: bool = True
    """Also train the image-variations UNet on the autoencoder's doodles (random polygons, ellipses, strokes), so
    that it learns to draw what an image embedding describes, not only the world's three shapes."""
    variations_train_encoder: bool = True
    """Train a copy of CLIP's vision tower beside the image-variations UNet (the embedding then holds what the UNet
    needs to redraw a picture, e.g. a shape CLIP's captions never named); false: CLIP's embedding as it is."""
    variations_embedding_dropout: float = Field(default=0.1, ge=0, lt=1)
    """Share of image-variations steps' embeddings replaced by zeros (its unconditional input, for guidance)."""


class PretrainXLParams(Section):
    """The tiny-world SDXL (the frozen `pretrain_xl` stage): its own phases' settings; the world, its captions, the
    warmup, caption dropout, min-SNR and EMA are `pretrain`'s."""

    clip_steps: int = Field(default=1000, ge=1)
    """Optimizer steps for the contrastive CLIP whose text tower, wider, is SDXL's second text encoder."""
    clip_batch_size: int = Field(default=128, ge=2)
    """Image-caption pairs per step of that CLIP."""
    clip_lr: float = Field(default=1e-3, gt=0)
    """Peak learning rate of that CLIP."""
    unet_steps: int = Field(default=4500, ge=1)
    """Optimizer steps for the SDXL UNet (both text encoders and the VAE frozen)."""
    unet_batch_size: int = Field(default=64, ge=1)
    """Latents per SDXL UNet step."""
    unet_lr: float = Field(default=1e-3, gt=0)
    """Peak learning rate of the SDXL UNet."""
    vision_steps: int = Field(default=1000, ge=1)
    """Optimizer steps of the frozen `pretrain_xl_clip` stage, for each of its two CLIPs: a vision tower trained against
    one of the tiny SDXL's text encoders, frozen (locked-text tuning; `clip_batch_size` and `clip_lr`)."""
