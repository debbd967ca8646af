"""DVC stage `encode`: cache the VAE latents of every prepared image (and its mirror image), once per dataset."""

from pathlib import Path

from sdpipe.encode import encode_dataset
from sdpipe.models.loading import load_vae, resolve_device, resolve_dtype
from sdpipe.stage import run_stage


def main(params) -> None:
    device = resolve_device(params.base.device)
    dtype = resolve_dtype(params.base.precision, device)
    vae = load_vae(params.base.base_model, params.base.base_model_config, dtype=dtype, device=device)
    for name in params.base.datasets:
        encode_dataset(
            prepared_dir=Path(params.paths.prepared) / name,
            out_path=Path(params.paths.latents) / f"{name}.safetensors",
            vae=vae,
            params=params.encode,
            seed=params.base.seed,
            device=device,
            base_model=params.base.base_model,
        )


if __name__ == "__main__":
    run_stage("encode", main)
