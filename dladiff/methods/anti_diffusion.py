"""Anti-Diffusion (Zheng et al., "Anti-Diffusion: Preventing abuse of modifications of diffusion-based
models", AAAI 2025).

1. Prompt tuning (PT): the text conditioning e is optimized (AdamW) to minimize the denoising loss
   on the clean photos, so the surrogate sees a conditioning that describes them.
2. Each epoch: PGD ascent on L_denoise(x + δ; e) − w·SDL, where the semantic disturbance loss
   SDL = mean(clamp(s·Ā, 0, 1)²) and Ā is the cross-attention map of x + δ averaged over the
   layers at the coarsest captured resolution and the heads (minimizing SDL flattens the maps);
   then UNet tuning of θd on x + δ (our stage 3, conditioned on e); then PT again on x + δ,
   starting from the current e.

Kept: PT → (PGD on SDL + denoising loss → UNet tuning → PT) alternation, the SDL form (×100, clamp,
squared mean), 30 PT steps at lr 1e-3 (``method.anti_diffusion``).
Changed: PT starts from the instance prompt's hidden states (``prompt_init: instance``; the official
code starts from the empty prompt's, ``prompt_init: empty``); the maps are those of
``layer1.attention.resolutions``' coarsest level (16² at 512 px, as the official code); the budget
is the shared n1 + n2 PGD and n3 UNet steps per epoch with η, α and the stage-3 learning rate from
``layer1`` (the official code also runs one PGD epoch before the first UNet tuning).

Settings (``method.anti_diffusion``): ``prompt_steps`` 30 AdamW steps, ``prompt_learning_rate`` 1e-3,
``prompt_init`` instance, ``attention_weight`` w = 1.0 and ``attention_scale`` s = 100 (unitless).
Shapes: x, δ ``(N, 3, R, R)`` in [-1, 1]; e ``(1, 77, D)``; Ā ``(N, Q, 77)``, Q = (coarsest latent side)².
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from dladiff.layer1.phases import PGD, Method, Train, Work
from dladiff.methods.registry import register
from dladiff.methods.shared import capture_coarsest_maps, mean_cross_maps

if TYPE_CHECKING:
    import torch

    from dladiff.diffusion.attention import AttentionStore
    from dladiff.diffusion.finetune import LatentSet


@dataclass(frozen=True)
class AntiDiffusionSettings:
    """Anti-Diffusion: prompt tuning (PT) + semantic disturbance loss (SDL) + UNet tuning."""

    prompt_steps: int = 30  # AdamW steps of PT on clean images first, then on x + δ after every epoch
    prompt_learning_rate: float = 1.0e-3
    prompt_init: Literal["instance", "empty"] = "instance"  # start PT from c's hidden states or from ""'s
    attention_weight: float = 1.0  # weight of the SDL term
    attention_scale: float = 100.0  # SDL = mean(clamp(scale·Ā, 0, 1)²)

    def checks(self) -> list[tuple[bool, str]]:
        return [(self.prompt_steps >= 0, "method.anti_diffusion.prompt_steps must be >= 0")]


def semantic_disturbance(store: AttentionStore, scale: float) -> torch.Tensor:
    """SDL = mean(clamp(scale·Ā, 0, 1)²) of the captured cross-attention maps (layers and heads averaged)."""
    return (mean_cross_maps(store) * scale).clamp(0, 1).pow(2).mean()


@register
class AntiDiffusion(Method):
    """Prompt tuning, then per epoch: PGD on L_denoise − w·SDL, UNet tuning on x + δ, prompt re-tuning."""

    name = "anti-diffusion"
    Settings = AntiDiffusionSettings
    trains_surrogate = True

    def setup(self, models, state, components) -> None:
        from dladiff.diffusion.loading import encode_prompt

        if self.settings.prompt_init == "empty":
            state.text = encode_prompt(components, "", models.device)
        self.store = capture_coarsest_maps(models, self.l1.attention.resolutions)

    def _prompt_step(self, models, state, batch, embedding, optimizer, data: LatentSet) -> float:
        """One AdamW step of e on the mean denoising loss of all of ``data``; returns that loss."""
        import torch

        from dladiff.diffusion.loss import denoising_loss, sample_latents
        from dladiff.runtime import autocast

        grad, total = torch.zeros_like(embedding), 0.0
        for idx in batch.chunks():
            draw = models.draw(len(idx), state.generator)
            with autocast(models.device, models.precision):
                latents = sample_latents(models.vae, data.mean[idx], data.std[idx], draw.latent_noise)
                value = denoising_loss(models.dynamic, models.scheduler, latents, embedding, draw) * len(idx) / len(data)
            grad += torch.autograd.grad(value, embedding)[0]
            total += float(value.detach())
        embedding.grad = grad
        optimizer.step()
        return total

    def tune_prompt(self, models, state, batch, data: LatentSet) -> float:
        """PT: ``prompt_steps`` AdamW steps on e minimizing the denoising loss of ``data``; returns the last loss.

        θd's weights are frozen meanwhile: only e gets a gradient.
        """
        import torch

        embedding = state.text.detach().clone().requires_grad_(True)
        optimizer = torch.optim.AdamW([embedding], lr=self.settings.prompt_learning_rate)
        with models.dynamic_frozen():
            losses = [self._prompt_step(models, state, batch, embedding, optimizer, data)
                      for _ in range(self.settings.prompt_steps)]
        state.text = embedding.detach()
        return losses[-1] if losses else math.nan

    def sdl_loss(self, models, state, chunk) -> torch.Tensor:
        """L_denoise(x + δ; e) − w·SDL of ``chunk`` (differentiable in δ)."""
        from dladiff.layer1.models import capturing
        from dladiff.layer1.stages import denoising_loss as stage2_loss
        from dladiff.runtime import autocast

        with capturing(self.store), autocast(models.device, models.precision):
            denoise = stage2_loss(models, state, chunk)
            return denoise - self.settings.attention_weight * semantic_disturbance(self.store, self.settings.attention_scale)

    def epoch(self, state):
        from dladiff.layer1.stages import perturbed_latent_set

        tune = self.settings.prompt_steps > 0
        clean = [Work("prompt_clean", lambda m, s, b: self.tune_prompt(m, s, b, m.clean))] if tune and state.epoch == 0 else []
        again = [Work("prompt", lambda m, s, b: self.tune_prompt(m, s, b, perturbed_latent_set(m, s, b)))] if tune else []
        return [*clean, PGD("sdl", self.sdl_loss, self.pgd_budget, stores=(self.store,)), Train(self.train_steps), *again]
