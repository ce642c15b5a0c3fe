"""FSMG — Fully-trained Surrogate Model Guidance (Van Le et al., "Anti-DreamBooth", ICCV 2023, §4.2).

PGD ascent on the denoising loss (Eq. 3) of a fixed model DreamBooth-tuned on clean photos of the
identity, for x + δ ``(N, 3, R, R)`` in [-1, 1]. Our static surrogate θs (Eq. 7) is exactly such a
model: FSMG attacks θs; it never reads the pretrained UNet, so ``protect`` frees it before the attack
(:meth:`uses_pretrained_unet`). No settings of its own: E·(n1 + n2) PGD steps (300 with the
default config), η = 0.05, α = 0.005 ([-1, 1] units), from ``layer1``.

Kept: the fixed clean-data DreamBooth model and the untargeted denoising loss.
Changed: the budget is the shared one; θs is UNet-only DreamBooth without prior preservation
(``surrogate`` config), where Anti-DreamBooth's model also tunes the text encoder with prior preservation.
"""

from __future__ import annotations

from dladiff.config import Config
from dladiff.layer1.phases import PGD, Method
from dladiff.methods.registry import register


def static_denoising_loss(models, state, chunk):
    """The denoising loss of the static surrogate θs on x + δ of ``chunk``."""
    from dladiff.layer1.stages import denoising_loss

    return denoising_loss(models, state, chunk, unet=models.static)


@register
class FSMG(Method):
    """n1 + n2 PGD ascent steps per epoch on the denoising loss of the fixed static surrogate θs."""

    name = "fsmg"

    @classmethod
    def needs_static_surrogate(cls, cfg: Config) -> bool:
        return True

    @classmethod
    def uses_pretrained_unet(cls, cfg: Config) -> bool:
        return False

    def epoch(self, state):
        return [PGD("denoise", static_denoising_loss, self.pgd_budget)]
