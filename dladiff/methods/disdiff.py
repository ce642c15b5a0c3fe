"""DisDiff (Liu et al., "Disrupting Diffusion: Token-level attention erasure attack against
diffusion-based customization", ACM MM 2024).

ASPL (see :mod:`dladiff.methods.aspl`) with two additions:

* Cross-Attention Erasure (CAE): the PGD loss gains w·L_CAE, where, with Ā the cross-attention map
  averaged over the layers at the coarsest captured resolution and the heads, restricted to the
  prompt's word tokens and sharpened by a token softmax P = softmax(s·Ā), the energy loss is
  L_CAE = (1 − Σ_q P[q, sks]² / Σ_q,k P[q, k]²)². Ascent lowers the trigger token's share of the
  attention energy: the "sks" token is erased from the image's cross-attention.
* Merit Sampling Scheduler (MSS): the step of image i is α·(1 + cos(π t_i / (T − 1)))/2 for its
  sampled timestep t_i — large steps where the timestep carries detail (small t), small ones near noise.

Kept: the loss (energy form, w = 0.1, s = 100, trigger token only), the cosine MSS, ASPL's alternation.
Changed: the ASPL base is ours (θd attacked directly, UNet-only training, no prior preservation);
the energy is computed per image and averaged (the official code uses the first image of the batch);
the SimAC adaptive timestep search that the official script also enables is not used; the budget is
the shared one (η, α, E, n1 + n2 PGD and n3 training steps from ``layer1``).
"""

from __future__ import annotations

import math

import torch

from dladiff.config import Config
from dladiff.diffusion.attention import AttentionStore, install_capture
from dladiff.diffusion.loading import token_positions
from dladiff.methods.base import MethodProtector, mean_cross_maps, pgd_with_training
from dladiff.runtime import autocast


def word_positions(tokenizer, prompt: str) -> list[int]:
    """Positions of the prompt's own tokens in its padded tokenization (start and end tokens excluded)."""
    return list(range(1, len(tokenizer(prompt).input_ids) - 1))


def erasure_energy(store: AttentionStore, words: list[int], trigger: list[int], sharpness: float) -> torch.Tensor:
    """L_CAE = mean over images of (1 − Σ P[:, trigger]² / Σ P²)², P = softmax over ``words`` of sharpness·Ā."""
    probs = torch.softmax(mean_cross_maps(store)[..., words] * sharpness, dim=-1)
    columns = [words.index(p) for p in trigger]
    share = probs[..., columns].pow(2).sum(dim=(1, 2)) / probs.pow(2).sum(dim=(1, 2))
    return (1 - share).pow(2).mean()


def merit_step_sizes(timesteps: torch.Tensor, num_train_timesteps: int, step_size: float) -> torch.Tensor:
    """MSS: α·(1 + cos(π t / (T − 1)))/2 per image, shaped ``(B, 1, 1, 1)``."""
    t = timesteps.float() / (num_train_timesteps - 1)
    return (step_size * 0.5 * (1 + torch.cos(math.pi * t))).view(-1, 1, 1, 1)


class DisDiffProtector(MethodProtector):
    """ASPL with PGD on L_denoise + w·L_CAE and the merit-scheduled step size, then n3 steps of θd."""

    name = "disdiff"

    def __init__(self, x, components, static_unet, cfg: Config, device, method=None, eot=None):
        super().__init__(x, components, None, cfg, device, method, eot)
        prompt = self.cfg.prompt
        self.words = word_positions(components.tokenizer, prompt.instance)
        self.trigger = token_positions(components.tokenizer, prompt.instance, prompt.trigger)
        self.store = AttentionStore(enabled=False)
        install_capture(self.unet_d, self.store, (min(self.l1.attention.resolutions),), self.latent_side)

    @classmethod
    def engine_config(cls, cfg: Config) -> Config:
        return pgd_with_training(cfg)

    def cae_loss_on(self, idx: torch.Tensor, delta: torch.Tensor, draw) -> torch.Tensor:
        """L_denoise(x + δ) + w·L_CAE of the chunk ``idx`` (differentiable in delta)."""
        settings = self.settings.disdiff
        with self.capturing(self.store), autocast(self.device, self.precision):
            denoise = self.denoising_loss_on(idx, delta, draw)
            return denoise + settings.attention_weight * erasure_energy(self.store, self.words, self.trigger, settings.sharpness)

    def cae_step(self) -> float:
        """δ_i ← Π(δ_i + α_i·sign(∇ L)) with the MSS step α_i; returns the loss before the step."""
        return self._pgd_step(self.cae_loss_on, (self.store,))

    def step_size(self, draw) -> float | torch.Tensor:
        if self.settings.disdiff.step_schedule == "constant":
            return self.l1.step_size
        sizes = merit_step_sizes(draw.timesteps, self.scheduler.config.num_train_timesteps, self.l1.step_size)
        return sizes.to(self.delta.device, self.delta.dtype)

    def pgd_phases(self):
        return [("cae", self.l1.stage2_steps, self.cae_step)]
