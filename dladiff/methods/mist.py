"""MIST (Liang & Wu, "Mist: Towards improved adversarial examples for diffusion models", 2023; built on
Liang et al., "Adversarial example does good: preventing painting imitation from diffusion models via
adversarial examples", ICML 2023).

Fused loss on the pretrained model, PGD ascent on

    L = w_sem · L_denoise(x + δ) − w_tex · mean‖z(x + δ) − z(y)‖²

with z = E(·)·s the scaled VAE latent and y a target texture: the semantic term (AdvDM, Eq. 3 of
this paper) pushes the noise prediction off, the textural term pulls the latent towards the
target's, so a model fine-tuned on the photos learns the pattern.

Kept: the two terms and their fusion by a weight; the pretrained model is not trained.
Changed: the target is generated in code (a black-and-white checkerboard of period
``method.mist.target_period`` pixels) instead of Mist's bundled "MIST" texture image; the textural
distance is a mean (Mist sums over the latent and weights the semantic term by 1e4: at 512 px,
4×64×64 latents, that ratio is w_sem ≈ 0.61 in mean units, our default); the target latent is the
posterior mean, not a sample; the budget is the shared E·(n1 + n2) steps with η and α from ``layer1``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dladiff.config import Config
from dladiff.diffusion.finetune import encode_images
from dladiff.diffusion.loss import denoising_loss
from dladiff.methods.base import MethodProtector, pgd_only
from dladiff.runtime import autocast


def target_pattern(resolution: int, period: int) -> torch.Tensor:
    """Checkerboard ``(1, 3, R, R)`` in {−1, 1} with squares of side ``period // 2`` pixels."""
    half = max(1, period // 2)
    cells = torch.arange(resolution) // half
    board = (cells[:, None] + cells[None, :]) % 2
    return (board.float() * 2 - 1).expand(1, 3, resolution, resolution).contiguous()


class MISTProtector(MethodProtector):
    """E·(n1 + n2) PGD ascent steps on the fused semantic + textural loss of the pretrained model."""

    name = "mist"

    def __init__(self, x, components, static_unet, cfg: Config, device, method=None, eot=None):
        super().__init__(x, components, None, cfg, device, method, eot)
        target = target_pattern(self.cfg.model.resolution, self.settings.mist.target_period).to(device)
        posterior = encode_images(self.vae, target, self.text, 1, device, self.precision)
        self.target_latent = posterior.mean * self.vae.config.scaling_factor

    @classmethod
    def engine_config(cls, cfg: Config) -> Config:
        return pgd_only(cfg)

    def fused_loss_on(self, idx: torch.Tensor, delta: torch.Tensor, draw) -> torch.Tensor:
        """w_sem·L_denoise − w_tex·mean‖z(x+δ) − z(y)‖² of the chunk ``idx`` (differentiable in delta)."""
        weights = self.settings.mist
        with autocast(self.device, self.precision):
            latents = self._perturbed_latents(delta, idx, draw.latent_noise)
            semantic = denoising_loss(self.unet_d, self.scheduler, latents, self.text, draw)
        textural = F.mse_loss(latents.float(), self.target_latent.expand_as(latents).float())
        return weights.semantic_weight * semantic - weights.textural_weight * textural

    def fused_step(self) -> float:
        """δ ← Π(δ + α·sign(∇ L_fused)); returns the loss before the step."""
        return self._pgd_step(self.fused_loss_on)

    def pgd_phases(self):
        return [("fused", self.l1.stage2_steps, self.fused_step)]
