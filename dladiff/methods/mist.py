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

Settings (``method.mist``): ``semantic_weight`` w_sem = 0.61, ``textural_weight`` w_tex = 1.0 (both
unitless), ``target_period`` = 32 pixels at the model resolution. Shapes: x, δ, y ``(N, 3, R, R)``
in [-1, 1]; z ``(N, 4, R/8, R/8)``. The UNet is the pretrained one (θd of the engine, never trained here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dladiff.layer1.phases import PGD, Method
from dladiff.methods.registry import register

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class MistSettings:
    """MIST's fused loss w_sem·L_denoise − w_tex·mean‖z(x+δ) − z(target)‖² (ascent)."""

    semantic_weight: float = 0.61  # w_sem: Mist's rate 1e4 vs its sum-reduced textural loss over 4x64x64 latents
    textural_weight: float = 1.0  # w_tex
    target_period: int = 32  # pixels at the model resolution: one period of the checkerboard target

    def checks(self) -> list[tuple[bool, str]]:
        return [(self.target_period >= 2, "method.mist.target_period must be >= 2")]


def target_pattern(resolution: int, period: int) -> torch.Tensor:
    """Checkerboard ``(1, 3, R, R)`` in {−1, 1} with squares of side ``period // 2`` pixels."""
    import torch

    half = max(1, period // 2)
    cells = torch.arange(resolution) // half
    board = (cells[:, None] + cells[None, :]) % 2
    return (board.float() * 2 - 1).expand(1, 3, resolution, resolution).contiguous()


@register
class MIST(Method):
    """n1 + n2 PGD ascent steps per epoch on the fused semantic + textural loss of the pretrained model."""

    name = "mist"
    Settings = MistSettings

    def setup(self, models, state, components) -> None:
        target = target_pattern(self.cfg.model.resolution, self.settings.target_period).to(models.device)
        self.target_latent = models.encode(target, state.text, 1).mean * models.vae.config.scaling_factor

    def fused_loss(self, models, state, chunk) -> torch.Tensor:
        """w_sem·L_denoise − w_tex·mean‖z(x+δ) − z(y)‖² of ``chunk`` (differentiable in δ)."""
        import torch.nn.functional as F

        from dladiff.diffusion import loss
        from dladiff.runtime import autocast

        with autocast(models.device, models.precision):
            latents = models.perturbed_latents(chunk, state.generator)
            semantic = loss.denoising_loss(models.dynamic, models.scheduler, latents, state.text, chunk.draw)
        textural = F.mse_loss(latents.float(), self.target_latent.expand_as(latents).float())
        return self.settings.semantic_weight * semantic - self.settings.textural_weight * textural

    def epoch(self, state):
        return [PGD("fused", self.fused_loss, self.pgd_budget)]
