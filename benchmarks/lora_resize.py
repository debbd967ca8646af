"""Time of `lora_resize` on an SD 1.5 LoCon: the SVD taken from each layer's factors against the dense SVD.

A kohya LoCon with random weights is built for every layer that a kohya LoCon of SD 1.5 adapts (every linear and
conv layer of the UNet and the CLIP text encoder, 3x3 convs included: `sdpipe.merge.lora.model_layers` of SD 1.5's
configs, built on the meta device), at rank 8, then resized to rank 4 by `resize_lora`, which takes each layer's
SVD from its factors (QR of up and down, SVD of the 8x8 core). The baseline is what `resize_lora` did before: the
full SVD of each dense update (`low_rank(lora.delta(...))`, up to 1280x11520 for the 3x3 convs). It is timed on
every `--baseline-stride`-th layer (sorted by name) and scaled to all layers, or on all of them with
`--baseline-stride 1`; the two results are compared on those layers (relative difference of the resized
updates: about 1e-5, up to 1e-3 on a layer whose 4th and 5th singular values nearly tie, where against a float64
SVD the factored result is the closer of the two).

On this machine (2 shared cores, 354 layers, 52 of them 3x3 convs): factored 5.1 s; dense 2914 s scaled from 36
layers (296 s), with other jobs running.

    python benchmarks/lora_resize.py [--rank 8] [--new-rank 4] [--baseline-stride 10] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def write_sd15_configs(folder: Path) -> Path:
    """A folder with SD 1.5's unet, vae and text_encoder configs (no weights): what `model_layers` reads."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    from sdpipe.models.sd15 import SD15_TEXT, SD15_UNET, SD15_VAE

    with init_empty_weights():
        UNet2DConditionModel(**SD15_UNET).save_config(folder / "unet")
        AutoencoderKL(**SD15_VAE).save_config(folder / "vae")
    CLIPTextConfig(**SD15_TEXT).save_pretrained(folder / "text_encoder")
    return folder


def random_locon(layers, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """Kohya LoCon tensors (fp16, as trainers save them) of `rank` for every layer, alpha = rank / 2."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, layer in sorted(layers.items()):
        out, inner, kernel = layer.shape[0], layer.shape[1], layer.shape[2:]
        tensors[f"{name}.lora_down.weight"] = (0.05 * torch.randn(rank, inner, *kernel, generator=generator)).half()
        up = 0.05 * torch.randn(out, rank, *[1] * len(kernel), generator=generator)
        tensors[f"{name}.lora_up.weight"] = up.half()
        tensors[f"{name}.alpha"] = torch.tensor(rank / 2, dtype=torch.float16)
    return tensors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--new-rank", type=int, default=4)
    parser.add_argument("--baseline-stride", type=int, default=10, help="time the dense SVD on every n-th layer")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    from sdpipe.formats import kohya
    from sdpipe.merge.lora import load_lora, low_rank, model_layers, resize_lora

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        folder = write_sd15_configs(Path(tmp) / "sd15")
        layers = model_layers(folder, "bench")
        path = Path(tmp) / "locon.safetensors"
        kohya.save_kohya_lora(random_locon(layers, args.rank, seed=0), path, {"ss_network_dim": str(args.rank)})
        lora = load_lora("lora", "bench", path, "bench")
        convs = sum(layer.is_spatial_conv for layer in layers.values())
        print(f"SD 1.5 LoCon: {len(lora.layers)} layers ({convs} 3x3 convs), rank {args.rank} -> {args.new_rank}, "
              f"{torch.get_num_threads()} threads")

        start = time.perf_counter()
        resized, report = resize_lora(
            lora, layers, rank=args.new_rank, conv_rank=args.new_rank, dtype=torch.float32, key="bench"
        )
        factored_s = time.perf_counter() - start
        print(f"factored SVD (resize_lora): {factored_s:.1f} s for {len(report)} layers")

        sample = sorted(lora.layers)[:: args.baseline_stride]
        dense_s, worst = 0.0, 0.0
        for name in sample:
            layer = layers[name]
            start = time.perf_counter()
            parts, _ = low_rank(lora.delta(name, layer.shape, "bench"), args.new_rank, torch.float32)
            dense_s += time.perf_counter() - start
            dense = kohya.delta_weights({f"{name}.{part}": tensor for part, tensor in parts.items()})[name]
            factored = kohya.delta_weights({f"{name}.{part}": resized[f"{name}.{part}"] for part in parts})[name]
            worst = max(worst, ((factored - dense).norm() / dense.norm()).item())
        estimate = dense_s * len(lora.layers) / len(sample)
        scaled = "" if len(sample) == len(lora.layers) else f", scaled from {len(sample)} layers ({dense_s:.1f} s)"
        print(f"dense SVD (before): {estimate:.0f} s for {len(lora.layers)} layers{scaled}")
        print(f"speed-up: {estimate / factored_s:.0f}x; largest relative difference of a resized update: {worst:.1e}")


if __name__ == "__main__":
    main()
