"""One DreamBooth optimizer step of a UNet (paper Eq. 4), shared by every fine-tuning loop.

The static surrogate (Eq. 7), ADFT's stage 3 (Eq. 9) and the evaluation's DreamBooth attack all
call :class:`DreamBoothTrainer`. The UNet keeps fp32 master weights; on CUDA the forward runs
under autocast. Images enter as cached VAE posteriors (mean, std), sampled anew at every step, so
the VAE encoder never runs inside the loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dladiff.diffusion.loss import denoising_loss, draw_noise, sample_latents
from dladiff.runtime import autocast


@dataclass
class LatentSet:
    """VAE posteriors ``(N, 4, h, w)`` of a set of images and the text states of their prompt."""

    mean: torch.Tensor
    std: torch.Tensor
    text: torch.Tensor

    def __len__(self) -> int:
        return self.mean.shape[0]


class DreamBoothTrainer:
    """AdamW steps on ``unet`` minimizing the denoising loss (+ λ·prior loss)."""

    def __init__(self, unet, vae, scheduler, learning_rate: float, weight_decay: float = 1e-2, max_grad_norm: float = 1.0,
                 device: torch.device = torch.device("cpu"), precision: str = "fp32", gradient_checkpointing: bool = False,
                 parameters=None):
        self.unet, self.vae, self.scheduler = unet, vae, scheduler
        self.device, self.precision, self.max_grad_norm = device, precision, max_grad_norm
        unet.train()
        if parameters is None:
            unet.requires_grad_(True)
            parameters = unet.parameters()
        if gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.params = [p for p in parameters if p.requires_grad]
        if any(p.dtype != torch.float32 for p in self.params):
            raise ValueError("trained weights must be fp32 masters (low-precision weights do not learn at DreamBooth learning rates)")
        self.optimizer = torch.optim.AdamW(self.params, lr=learning_rate, weight_decay=weight_decay, fused=True)

    def _batch_loss(self, data: LatentSet, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        mean, std = data.mean[index], data.std[index]
        draw = draw_noise(len(index), tuple(mean.shape[1:]), self.scheduler.config.num_train_timesteps, generator, self.device)
        latents = sample_latents(self.vae, mean, std, draw.latent_noise)
        return denoising_loss(self.unet, self.scheduler, latents, data.text, draw)

    def step(self, instance: LatentSet, batch_size: int, generator: torch.Generator,
             prior: LatentSet | None = None, prior_weight: float = 1.0) -> float:
        """One optimizer step on a random batch of ``instance`` (and of ``prior``); returns the loss."""
        index = torch.randperm(len(instance), generator=generator)[:batch_size].to(self.device)
        with autocast(self.device, self.precision):
            loss = self._batch_loss(instance, index, generator)
            if prior is not None:
                prior_index = torch.randperm(len(prior), generator=generator)[:batch_size].to(self.device)
                loss = loss + prior_weight * self._batch_loss(prior, prior_index, generator)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        return float(loss.detach())


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, text: torch.Tensor, batch_size: int, device, precision: str) -> LatentSet:
    """VAE posteriors of ``images`` ``(N, 3, R, R)`` in [-1, 1], encoded once without grad."""
    means, stds = [], []
    for chunk in images.split(batch_size):
        with autocast(device, precision):
            dist = vae.encode(chunk.to(device, dtype=next(vae.parameters()).dtype)).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    return LatentSet(torch.cat(means), torch.cat(stds), text)
