"""FSMG — Fully-trained Surrogate Model Guidance (Van Le et al., "Anti-DreamBooth", ICCV 2023, §4.2).

PGD ascent on the denoising loss (Eq. 3) of a fixed model DreamBooth-tuned on clean photos of the
identity. Our static surrogate θs (Eq. 7) is exactly such a model, so FSMG is stage 2 of the engine
with θs in the place of θd and no stage 1 or 3. The pretrained UNet is not used, so ``protect``
frees it before the attack (:meth:`uses_pretrained_unet`).

Kept: the fixed clean-data DreamBooth model and the untargeted denoising loss.
Changed: the budget is the shared one, E·(n1 + n2) PGD steps (300 with the default config) with
η and α from ``layer1``; θs is UNet-only DreamBooth without prior preservation (``surrogate`` config),
where Anti-DreamBooth's model also tunes the text encoder with prior preservation.
"""

from __future__ import annotations

from dataclasses import replace

from dladiff.config import Config
from dladiff.errors import DladiffError
from dladiff.methods.base import MethodProtector, pgd_only


class FSMGProtector(MethodProtector):
    """E·(n1 + n2) PGD ascent steps on the denoising loss of the fixed static surrogate θs."""

    name = "fsmg"

    def __init__(self, x, components, static_unet, cfg: Config, device, method=None, eot=None):
        if static_unet is None:
            raise DladiffError("fsmg attacks the static surrogate: give --surrogate or let protect train one")
        super().__init__(x, replace(components, unet=static_unet), None, cfg, device, method, eot)

    @classmethod
    def engine_config(cls, cfg: Config) -> Config:
        return pgd_only(cfg)

    @classmethod
    def needs_static_surrogate(cls, cfg: Config) -> bool:
        return True

    @classmethod
    def uses_pretrained_unet(cls, cfg: Config) -> bool:
        return False
