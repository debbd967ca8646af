"""Stable Diffusion XL's architecture (stabilityai/stable-diffusion-xl-base-1.0's configs): keyword arguments of
diffusers' `UNet2DConditionModel` and `AutoencoderKL` and transformers' `CLIPTextConfig` for its two text encoders.
Benchmarks and tests build full-size models from them with random weights (nothing is downloaded)."""

from sdpipe.models.sd15 import SD15_TEXT, SD15_VAE

SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    cross_attention_dim=2048,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)
SDXL_VAE = dict(SD15_VAE, sample_size=1024, scaling_factor=0.13025)
SDXL_TEXT = SD15_TEXT  # CLIP ViT-L/14's text tower, the one SD 1.x conditions on
SDXL_TEXT_2 = dict(  # OpenCLIP ViT-bigG/14's text tower, with its projection
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=1280,
)
