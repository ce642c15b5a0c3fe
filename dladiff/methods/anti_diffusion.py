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
"""

from __future__ import annotations

import logging

import torch

from dladiff.config import Config
from dladiff.diffusion.attention import AttentionStore, install_capture
from dladiff.diffusion.finetune import LatentSet
from dladiff.diffusion.loading import encode_prompt
from dladiff.diffusion.loss import denoising_loss, sample_latents
from dladiff.methods.base import MethodProtector, mean_cross_maps, pgd_with_training
from dladiff.runtime import autocast

log = logging.getLogger("dladiff")


def semantic_disturbance(store: AttentionStore, scale: float) -> torch.Tensor:
    """SDL = mean(clamp(scale·Ā, 0, 1)²) of the captured cross-attention maps (layers and heads averaged)."""
    return (mean_cross_maps(store) * scale).clamp(0, 1).pow(2).mean()


class AntiDiffusionProtector(MethodProtector):
    """Prompt tuning, then per epoch: PGD on L_denoise − w·SDL, UNet tuning on x + δ, prompt re-tuning."""

    name = "anti-diffusion"

    def __init__(self, x, components, static_unet, cfg: Config, device, method=None, eot=None):
        super().__init__(x, components, None, cfg, device, method, eot)
        if self.settings.anti_diffusion.prompt_init == "empty":
            self.text = encode_prompt(components, "", device)
        self.prompt_tuned = False
        self.store = AttentionStore(enabled=False)
        install_capture(self.unet_d, self.store, (min(self.l1.attention.resolutions),), self.latent_side)

    @classmethod
    def engine_config(cls, cfg: Config) -> Config:
        return pgd_with_training(cfg)

    def _prompt_step(self, embedding: torch.Tensor, optimizer, data: LatentSet) -> float:
        """One AdamW step of e on the mean denoising loss of all of ``data``; returns that loss."""
        grad, total = torch.zeros_like(embedding), 0.0
        for idx in self._chunks():
            draw = self._draw(len(idx))
            with autocast(self.device, self.precision):
                latents = sample_latents(self.vae, data.mean[idx], data.std[idx], draw.latent_noise)
                loss = denoising_loss(self.unet_d, self.scheduler, latents, embedding, draw) * len(idx) / len(data)
            grad += torch.autograd.grad(loss, embedding)[0]
            total += float(loss.detach())
        embedding.grad = grad
        optimizer.step()
        return total

    def tune_prompt(self, data: LatentSet) -> float:
        """PT: ``prompt_steps`` AdamW steps on e minimizing the denoising loss of ``data``; returns the last loss.

        θd's weights are frozen meanwhile: only e gets a gradient.
        """
        settings = self.settings.anti_diffusion
        embedding = self.text.detach().clone().requires_grad_(True)
        optimizer = torch.optim.AdamW([embedding], lr=settings.prompt_learning_rate)
        with self.weights_frozen():
            losses = [self._prompt_step(embedding, optimizer, data) for _ in range(settings.prompt_steps)]
        self.text = embedding.detach()
        return losses[-1] if losses else float("nan")

    def sdl_loss_on(self, idx: torch.Tensor, delta: torch.Tensor, draw) -> torch.Tensor:
        """L_denoise(x + δ; e) − w·SDL of the chunk ``idx`` (differentiable in delta)."""
        settings = self.settings.anti_diffusion
        with self.capturing(self.store), autocast(self.device, self.precision):
            denoise = self.denoising_loss_on(idx, delta, draw)
            return denoise - settings.attention_weight * semantic_disturbance(self.store, settings.attention_scale)

    def sdl_step(self) -> float:
        """δ ← Π(δ + α·sign(∇(L_denoise − w·SDL))); returns the loss before the step."""
        return self._pgd_step(self.sdl_loss_on, (self.store,))

    def pgd_phases(self):
        return [("sdl", self.l1.stage2_steps, self.sdl_step)]

    def before_epoch(self) -> dict:
        """PT on the clean photos, once, before the first epoch."""
        if self.prompt_tuned or not self.settings.anti_diffusion.prompt_steps:
            return {}
        self.prompt_tuned = True
        return {"prompt_clean": self.tune_prompt(self.clean)}

    def after_training(self) -> dict:
        """PT again on x + δ, from the current e."""
        if not self.settings.anti_diffusion.prompt_steps:
            return {}
        return {"prompt": self.tune_prompt(self.perturbed_latent_set())}

    def extra_state(self) -> dict:
        return {"text": self.text.cpu(), "prompt_tuned": self.prompt_tuned}

    def load_extra_state(self, state: dict) -> None:
        self.text = state["text"].to(self.device)
        self.prompt_tuned = state["prompt_tuned"]
