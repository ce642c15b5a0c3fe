"""The denoising loss shared by every fine-tuning loop and PGD stage (paper Eqs. 2-4, 7).

``L = ‖target − εθ(z_t, t, c)‖²`` with ``z_t = scheduler.add_noise(z0, ε, t)``, ``z0 = E(x)·s``
and target ε (or the velocity for v-prediction models). Random draws come from a CPU
``torch.Generator`` so runs are reproducible on any device and resumable from its state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class NoiseDraw:
    """One draw of timesteps ``t`` (B,), noise ``ε`` and latent-sampling noise ``ξ`` (B, 4, h, w)."""

    timesteps: torch.Tensor
    noise: torch.Tensor
    latent_noise: torch.Tensor


def draw_noise(batch: int, latent_shape: tuple[int, int, int], num_train_timesteps: int, generator: torch.Generator, device) -> NoiseDraw:
    """t ~ U{0..T-1}, ε ~ N(0, I), ξ ~ N(0, I), drawn on the CPU generator then moved to ``device``."""
    t = torch.randint(0, num_train_timesteps, (batch,), generator=generator)
    noise = torch.randn((batch, *latent_shape), generator=generator)
    xi = torch.randn((batch, *latent_shape), generator=generator)
    return NoiseDraw(t.to(device), noise.to(device), xi.to(device))


def latent_distribution(vae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std ``(N, 4, h, w)`` of the VAE posterior of ``x`` in [-1, 1] (differentiable)."""
    dist = vae.encode(x).latent_dist
    return dist.mean, dist.std


def sample_latents(vae, mean: torch.Tensor, std: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
    """z0 = (μ + σ·ξ)·s: a posterior sample (as DreamBooth's ``latent_dist.sample()``), scaled."""
    return (mean + std * xi.to(mean.dtype)) * vae.config.scaling_factor


def denoising_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """ε for epsilon-prediction models, the velocity for v-prediction models."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction type {kind}")


def denoising_loss(unet, scheduler, latents: torch.Tensor, text: torch.Tensor, draw: NoiseDraw) -> torch.Tensor:
    """Mean-squared denoising loss of ``unet`` on latents ``z0`` (Eq. 3), using ``draw``'s t and ε."""
    noisy = scheduler.add_noise(latents, draw.noise.to(latents.dtype), draw.timesteps)
    pred = unet(noisy, draw.timesteps, encoder_hidden_states=text.expand(latents.shape[0], -1, -1)).sample
    target = denoising_target(scheduler, latents, draw.noise.to(latents.dtype), draw.timesteps)
    return F.mse_loss(pred.float(), target.float())
