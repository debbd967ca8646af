"""Training throughput at Stable Diffusion 1.5 size on a GPU: LoRA and full fine-tuning, 512x512, bf16.

Builds the SD 1.5 UNet, VAE and CLIP text encoder from their configs (written below; random weights, nothing
downloaded) and times training steps the way sdpipe's training core and diffusers' examples take them: bf16
autocast over fp32 trained weights, the min-SNR-free epsilon MSE loss, gradient clipping, AdamW (fused on CUDA), no
host sync inside the timed steps. For each mode (`lora`: peft adapters of rank 16 on the attention projections
to_q/to_k/to_v/to_out.0, the frozen UNet in bf16; `full`: every UNet weight), variant and batch size it prints:

- s/step and images/s (mean over the timed steps, after warmup steps);
- peak CUDA memory (`max_memory_allocated`);
- model FLOPs per step, counted with `torch.utils.flop_counter.FlopCounterMode` on one eager step (the UNet
  forward and backward; for `uncached` also the frozen VAE encoder and text encoder forwards), the achieved
  TFLOP/s, and the model FLOPs utilization (MFU) against the bf16 matmul rate measured on the same GPU
  (an 8192^3 matmul), printed first as the baseline.

Variants: `cached` trains on latents and text embeddings computed beforehand (what sdpipe's `encode` stage and
text cache give); `uncached` also encodes the 512x512 images with the VAE and the captions with the text encoder
at every step (diffusers' examples). Images and token ids are random tensors already on the GPU: data loading
is not measured.

    python benchmarks/gpu_throughput.py [--modes lora,full] [--variants cached,uncached] [--batch-sizes 1,4,8]
        [--steps 20] [--warmup 5] [--channels-last] [--compile]
    python benchmarks/gpu_throughput.py --cpu-smoke    # a tiny config, 2 steps, on the CPU: checks the code path

Without CUDA (and without --cpu-smoke) it prints "no CUDA device: skipped" and exits with status 0.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sdpipe.models.sd15 import SD15_TEXT, SD15_UNET, SD15_VAE

# Stable Diffusion 1.5's architecture, and the same code path in miniature for --cpu-smoke.
TINY_UNET = dict(
    SD15_UNET,
    sample_size=8,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
)
TINY_VAE = dict(
    SD15_VAE,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(32, 64),
    layers_per_block=1,
    sample_size=16,
)
TINY_TEXT = dict(
    SD15_TEXT, vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    projection_dim=32, pad_token_id=1, bos_token_id=0, eos_token_id=2,
)
LORA_RANK = 16
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
MATMUL_SIZE = 8192
LEARNING_RATE = {"lora": 1e-4, "full": 1e-5}


@dataclass
class Result:
    mode: str
    variant: str
    batch_size: int
    seconds_per_step: float
    peak_memory_gib: float | None
    flops_per_step: float


def bf16_matmul_tflops(device: torch.device, size: int, repeats: int = 20) -> float:
    """The measured rate of a `size`^3 bf16 matmul, in TFLOP/s: the baseline of the MFU."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def frozen_models(configs: dict, device: torch.device):
    """The VAE and text encoder, frozen, in bf16 (only the uncached variant runs them)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device(device):
        vae = AutoencoderKL(**configs["vae"])
        text_encoder = CLIPTextModel._from_config(CLIPTextConfig(**configs["text"]), attn_implementation="sdpa")
    for model in (vae, text_encoder):
        model.requires_grad_(False).eval().to(dtype=torch.bfloat16)
    return vae, text_encoder


def trained_unet(mode: str, config: dict, device: torch.device, channels_last: bool):
    """A fresh UNet with SDPA attention: every weight trains (`full`, fp32 master weights), or rank-16 LoRA adapters
    (fp32) on a frozen bf16 UNet (`lora`, as diffusers' train_text_to_image_lora.py)."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**config)
    unet.set_attn_processor(AttnProcessor2_0())
    if mode == "lora":
        from peft import LoraConfig

        unet.requires_grad_(False).to(dtype=torch.bfloat16)
        unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian",
                                    target_modules=LORA_TARGETS))
        for parameter in unet.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    unet.train()
    return unet


def make_step(unet, vae, text_encoder, optimizer, scheduler, inputs: dict, variant: str, device: torch.device):
    """One training step as a function: (uncached: encode images and captions), noise, predict, loss, backward,
    clip, update. No `.item()`: nothing waits for the GPU."""
    parameters = [p for p in unet.parameters() if p.requires_grad]

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            if variant == "uncached":
                with torch.no_grad():
                    latents = vae.encode(inputs["pixels"]).latent_dist.sample() * vae.config.scaling_factor
                    encoder_hidden_states = text_encoder(inputs["input_ids"])[0]
            else:
                latents, encoder_hidden_states = inputs["latents"], inputs["encoder_hidden_states"]
            latents = latents.float()
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), device=device)
            noisy_latents = scheduler.add_noise(latents, noise, timesteps)
            if inputs["channels_last"]:
                noisy_latents = noisy_latents.contiguous(memory_format=torch.channels_last)
            prediction = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
        loss = F.mse_loss(prediction.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def step_inputs(configs: dict, batch_size: int, device: torch.device, channels_last: bool) -> dict:
    """Random inputs already on the device: 512x512 images and token ids (uncached), latents and embeddings (cached)."""
    generator = torch.Generator(device).manual_seed(0)
    unet, text, vae = configs["unet"], configs["text"], configs["vae"]
    size = unet["sample_size"]
    resolution = size * 2 ** (len(vae["block_out_channels"]) - 1)
    return {
        "pixels": torch.rand(batch_size, 3, resolution, resolution, generator=generator, device=device)
        .mul(2).sub(1).to(torch.bfloat16),
        "input_ids": torch.randint(0, text["vocab_size"], (batch_size, text["max_position_embeddings"]),
                                   generator=generator, device=device),
        "latents": torch.randn(batch_size, unet["in_channels"], size, size, generator=generator, device=device),
        "encoder_hidden_states": torch.randn(batch_size, text["max_position_embeddings"], text["hidden_size"],
                                             generator=generator, device=device, dtype=torch.bfloat16),
        "channels_last": channels_last,
        "resolution": resolution,
    }


def measure(mode: str, variant: str, batch_size: int, configs: dict, frozen, device: torch.device, args) -> Result:
    from diffusers import DDPMScheduler
    from torch.utils.flop_counter import FlopCounterMode

    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    unet = trained_unet(mode, configs["unet"], device, args.channels_last)
    parameters = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=LEARNING_RATE[mode], fused=device.type == "cuda")
    inputs = step_inputs(configs, batch_size, device, args.channels_last)
    vae, text_encoder = frozen
    step = make_step(unet, vae, text_encoder, optimizer, scheduler, inputs, variant, device)

    with FlopCounterMode(display=False) as counter:  # one eager step (also creates the optimizer state)
        step()
    flops = counter.get_total_flops()
    if args.compile:
        unet.forward = torch.compile(unet.forward)  # the module stays the same object for the optimizer and peft
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - start) / args.steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del step, optimizer, unet, parameters, inputs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Result(mode, variant, batch_size, seconds, peak, flops)


def print_table(results: list[Result], matmul_tflops: float, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("mode", "variant", "batch", "s/step", "it/s", "images/s", "peak GiB", "GFLOP/step",
                   "TFLOP/s", "MFU"):
        table.add_column(column, justify="left" if column in ("mode", "variant") else "right")
    for r in results:
        achieved = r.flops_per_step / r.seconds_per_step / 1e12
        table.add_row(
            r.mode, r.variant, str(r.batch_size), f"{r.seconds_per_step:.4f}", f"{1 / r.seconds_per_step:.2f}",
            f"{r.batch_size / r.seconds_per_step:.1f}",
            f"{r.peak_memory_gib:.1f}" if r.peak_memory_gib is not None else "-",
            f"{r.flops_per_step / 1e9:.1f}", f"{achieved:.2f}", f"{achieved / matmul_tflops:.1%}",
        )
    Console(width=150).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="lora,full", help="comma-separated: lora, full")
    parser.add_argument("--variants", default="cached,uncached", help="comma-separated: cached, uncached")
    parser.add_argument("--batch-sizes", default="1,4,8")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (and compilation)")
    parser.add_argument("--channels-last", action="store_true", help="UNet weights and inputs in channels_last")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet forward")
    parser.add_argument("--cpu-smoke", action="store_true", help="a tiny config, 2 steps, on the CPU")
    args = parser.parse_args()
    modes, variants = args.modes.split(","), args.variants.split(",")
    batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    if set(modes) - {"lora", "full"} or set(variants) - {"cached", "uncached"}:
        parser.error("--modes takes lora, full; --variants takes cached, uncached")

    if args.cpu_smoke:
        device, configs = torch.device("cpu"), {"unet": TINY_UNET, "vae": TINY_VAE, "text": TINY_TEXT}
        args.steps, args.warmup, batch_sizes, matmul_size = 2, 1, [1, 2], 512
    elif torch.cuda.is_available():
        device, configs = torch.device("cuda"), {"unet": SD15_UNET, "vae": SD15_VAE, "text": SD15_TEXT}
        matmul_size = MATMUL_SIZE
        torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 leftovers (loss, optimizer) as a trainer runs them
        torch.backends.cudnn.allow_tf32 = True
    else:
        print("no CUDA device: skipped")
        return
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32: []" for every bf16 cast

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke test: tiny config)"
    matmul_tflops = bf16_matmul_tflops(device, matmul_size)
    print(f"{name}: bf16 matmul {matmul_size}^3: {matmul_tflops:.2f} TFLOP/s (the MFU baseline)")
    frozen = frozen_models(configs, device) if "uncached" in variants else (None, None)
    results = []
    for mode in modes:
        for variant in variants:
            for batch_size in batch_sizes:
                results.append(measure(mode, variant, batch_size, configs, frozen, device, args))
    resolution = step_inputs(configs, 1, device, False)["resolution"]
    options = ", ".join(o for o, on in (("channels_last", args.channels_last), ("torch.compile", args.compile)) if on)
    title = (f"{'SD 1.5' if not args.cpu_smoke else 'tiny'} UNet training, {resolution}x{resolution}, bf16 autocast, "
             f"{args.warmup} warmup + {args.steps} timed steps{', ' + options if options else ''}")
    print_table(results, matmul_tflops, title)


if __name__ == "__main__":
    main()
