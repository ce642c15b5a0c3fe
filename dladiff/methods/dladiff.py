"""DLADiff layer 1: DSUR + ADFT (this paper, §4.1, Eqs. 7-9).

Paper: "DLADiff: a dual-layer defense framework against fine-tuning and zero-shot customization of
diffusion models", §4.1. Per epoch, for photos x ``(N, 3, R, R)`` in [-1, 1] and δ1 of the same shape:

    δ1 ← Π(δ1 + α1·sign(∇ L_attn(θs, θd; x, x + δ1)))   n1 times   (stage 1, Eq. 8; DSUR)
    δ1 ← Π(δ1 + α1·sign(∇ L_denoise(θd; x + δ1)))        n2 times   (stage 2, Eq. 3)
    θd ← AdamW step on L_denoise(θd; x + δ1)              n3 times   (stage 3; ADFT)

θs is the static surrogate, DreamBooth-tuned on the clean photos (Eq. 7, :mod:`dladiff.surrogate`);
θd starts at the pretrained UNet. Defaults (``layer1``): η1 = 0.05 and α1 = 0.005 ([-1, 1] units),
E = 50 epochs, n1 = n2 = n3 = 3, stage-3 lr 5e-6, maps at latent sides 16 and 32.
``layer1.dsur: false`` gives stage 1's n1 steps to stage 2 (n1 + n2 PGD steps on L_denoise: the
paper's "w/o DSUR" = ASPL at the same budget); ``layer1.adft: false`` drops stage 3 ("w/o ADFT").
Kept: everything of §4.1. Changed: nothing (the paper does not say which layers' maps L_attn
compares; ``layer1.attention`` chooses them).
"""

from __future__ import annotations

from functools import partial

from dladiff.config import Config
from dladiff.layer1.phases import PGD, Method, Train
from dladiff.methods.registry import register


@register
class DLADiff(Method):
    """Stage 1 (L_attn) and stage 2 (L_denoise) PGD, then stage 3 training of θd (Eq. 9)."""

    name = "dladiff"
    trains_surrogate = True

    @classmethod
    def needs_static_surrogate(cls, cfg: Config) -> bool:
        return cfg.layer1.dsur and cfg.layer1.stage1_steps > 0

    @property
    def pgd_steps(self) -> tuple[int, int]:
        """(stage-1, stage-2) PGD steps per epoch: (n1, n2), or (0, n1 + n2) with ``layer1.dsur: false``."""
        n1 = self.l1.stage1_steps if self.l1.dsur else 0
        return n1, self.pgd_budget - n1

    def setup(self, models, state, components) -> None:
        from dladiff.layer1.stages import install_attention_capture

        self.stores = (models.static_store, models.dynamic_store)
        if self.needs_static_surrogate(self.cfg):
            install_attention_capture(models, components.tokenizer, self.cfg)

    def epoch(self, state):
        from dladiff.layer1.stages import attention_loss, denoising_loss

        att, (n1, n2) = self.l1.attention, self.pgd_steps
        return [
            PGD("attn", partial(attention_loss, cross_weight=att.cross_weight, self_weight=att.self_weight), n1,
                stores=self.stores),
            PGD("denoise", denoising_loss, n2),
            Train(self.train_steps),
        ]
