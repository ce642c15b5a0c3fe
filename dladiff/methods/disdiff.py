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

Settings (``method.disdiff``): ``attention_weight`` w = 0.1 and ``sharpness`` s = 100 (unitless),
``step_schedule`` cosine (or constant α). Shapes: x, δ ``(N, 3, R, R)`` in [-1, 1]; Ā and P
``(N, Q, words)``, Q = (coarsest latent side)²; the MSS step ``(N, 1, 1, 1)`` in [-1, 1] units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from dladiff.layer1.phases import PGD, Method, Train
from dladiff.methods.registry import register
from dladiff.methods.shared import capture_coarsest_maps, mean_cross_maps

if TYPE_CHECKING:
    import torch

    from dladiff.diffusion.attention import AttentionStore


@dataclass(frozen=True)
class DisDiffSettings:
    """DisDiff: cross-attention erasure (CAE) of the trigger token + merit sampling scheduler (MSS)."""

    attention_weight: float = 0.1  # weight of the CAE energy term (DisDiff's att_param)
    sharpness: float = 100.0  # the token softmax of the maps runs on sharpness·Ā
    step_schedule: Literal["cosine", "constant"] = "cosine"  # MSS: α·(1 + cos(π t/(T−1)))/2, or α


def word_positions(tokenizer, prompt: str) -> list[int]:
    """Positions of the prompt's own tokens in its padded tokenization (start and end tokens excluded)."""
    return list(range(1, len(tokenizer(prompt).input_ids) - 1))


def erasure_energy(store: AttentionStore, words: list[int], trigger: list[int], sharpness: float) -> torch.Tensor:
    """L_CAE = mean over images of (1 − Σ P[:, trigger]² / Σ P²)², P = softmax over ``words`` of sharpness·Ā."""
    import torch

    probs = torch.softmax(mean_cross_maps(store)[..., words] * sharpness, dim=-1)
    columns = [words.index(p) for p in trigger]
    share = probs[..., columns].pow(2).sum(dim=(1, 2)) / probs.pow(2).sum(dim=(1, 2))
    return (1 - share).pow(2).mean()


def merit_step_sizes(timesteps: torch.Tensor, num_train_timesteps: int, step_size: float) -> torch.Tensor:
    """MSS: α·(1 + cos(π t / (T − 1)))/2 per image, shaped ``(B, 1, 1, 1)``."""
    import torch

    t = timesteps.float() / (num_train_timesteps - 1)
    return (step_size * 0.5 * (1 + torch.cos(math.pi * t))).view(-1, 1, 1, 1)


@register
class DisDiff(Method):
    """ASPL with PGD on L_denoise + w·L_CAE and the merit-scheduled step size, then n3 steps of θd."""

    name = "disdiff"
    Settings = DisDiffSettings
    trains_surrogate = True

    def setup(self, models, state, components) -> None:
        from dladiff.diffusion.loading import token_positions

        prompt = self.cfg.prompt
        self.words = word_positions(components.tokenizer, prompt.instance)
        self.trigger = token_positions(components.tokenizer, prompt.instance, prompt.trigger)
        self.store = capture_coarsest_maps(models, self.l1.attention.resolutions)

    def cae_loss(self, models, state, chunk) -> torch.Tensor:
        """L_denoise(x + δ) + w·L_CAE of ``chunk`` (differentiable in δ)."""
        from dladiff.layer1.models import capturing
        from dladiff.layer1.stages import denoising_loss
        from dladiff.runtime import autocast

        settings = self.settings
        with capturing(self.store), autocast(models.device, models.precision):
            denoise = denoising_loss(models, state, chunk)
            return denoise + settings.attention_weight * erasure_energy(self.store, self.words, self.trigger, settings.sharpness)

    def merit_step(self, models, state, chunk) -> torch.Tensor:
        """The MSS step α_i of each image of ``chunk`` for its timestep."""
        sizes = merit_step_sizes(chunk.draw.timesteps, models.scheduler.config.num_train_timesteps, self.l1.step_size)
        return sizes.to(state.delta.device, state.delta.dtype)

    def epoch(self, state):
        rule = self.merit_step if self.settings.step_schedule == "cosine" else None
        return [PGD("cae", self.cae_loss, self.pgd_budget, step_size=rule, stores=(self.store,)), Train(self.train_steps)]
