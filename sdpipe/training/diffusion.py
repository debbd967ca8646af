"""The diffusion training objective: noise, timesteps, the prediction target and the min-SNR-γ weighted loss.

All random draws take an explicit CPU generator (see `sdpipe.training.rng`), so they are the same on every
device and at every resume.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sdpipe.errors import SdpipeError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def sample_noise(shape: torch.Size, generator: torch.Generator, noise_offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise of `shape` [B, C, h, w], plus `noise_offset` × per-(image, channel) constant noise."""
    noise = torch.randn(shape, generator=generator)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(shape[0], shape[1], 1, 1, generator=generator)
    return noise


def sample_timesteps(batch_size: int, low: int, high: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform integer timesteps in [low, high)."""
    return torch.randint(low, high, (batch_size,), generator=generator)


def prediction_type(noise_scheduler) -> str:
    kind = noise_scheduler.config.prediction_type
    if kind not in PREDICTION_TYPES:
        raise SdpipeError(
            f"the base model's scheduler config has prediction_type {kind!r}; training supports "
            f"{', '.join(PREDICTION_TYPES)}"
        )
    return kind


def prediction_target(
    noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet must predict: the noise (epsilon), the velocity (v-prediction) or the clean latents (sample)."""
    kind = prediction_type(noise_scheduler)
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    return latents


def predicted_latents(
    noise_scheduler, noisy_latents: torch.Tensor, prediction: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """The clean latents a prediction implies (x0), for each prediction type."""
    kind = prediction_type(noise_scheduler)
    if kind == "sample":
        return prediction
    alphas = noise_scheduler.alphas_cumprod.to(noisy_latents.device)[timesteps].float()
    alpha = alphas.sqrt().reshape(-1, *[1] * (noisy_latents.ndim - 1))
    sigma = (1 - alphas).sqrt().reshape(alpha.shape)
    if kind == "v_prediction":
        return alpha * noisy_latents - sigma * prediction
    return (noisy_latents - sigma * prediction) / alpha


def compute_snr(noise_scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """The signal-to-noise ratio ᾱ_t / (1 - ᾱ_t) of each timestep."""
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return alphas_cumprod / (1.0 - alphas_cumprod)


def min_snr_weights(snr: torch.Tensor, gamma: float, kind: str) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023) for a loss on `kind` predictions.

    The paper's weight on the x0 loss is min(SNR, γ); expressed on the epsilon loss it becomes min(SNR, γ) / SNR,
    on the v loss min(SNR, γ) / (SNR + 1). At SNR = 0 (zero-terminal-SNR schedules) the epsilon weight is its
    limit, 1.
    """
    clipped = torch.clamp(snr, max=gamma)
    if kind == "epsilon":
        return torch.where(snr > 0, clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr))
    if kind == "v_prediction":
        return clipped / (snr + 1.0)
    return clipped


def diffusion_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    noise_scheduler,
    snr_gamma: float | None,
) -> torch.Tensor:
    """The mean squared error, each image's term weighted by min-SNR-γ when `snr_gamma` is set."""
    prediction, target = prediction.float(), target.float()
    if snr_gamma is None:
        return F.mse_loss(prediction, target)
    per_image = F.mse_loss(prediction, target, reduction="none").mean(dim=list(range(1, prediction.ndim)))
    weights = min_snr_weights(compute_snr(noise_scheduler, timesteps), snr_gamma, prediction_type(noise_scheduler))
    return (per_image * weights).mean()
