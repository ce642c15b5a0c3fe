"""ASPL — Alternating Surrogate and Perturbation Learning (Van Le et al., "Anti-DreamBooth: Protecting
users from personalized text-to-image synthesis", ICCV 2023, Algorithm 1).

Each epoch: PGD ascent on the denoising loss (Eq. 3) of a surrogate, then DreamBooth steps of the
surrogate on x + δ. On our engine that is the paper's "w/o DSUR" ablation (Table 5): no stage 1,
all n1 + n2 PGD steps in stage 2, stage 3 as configured — a configuration, not new code.

Kept: the alternation, the loss, the budget of the official script (η = 0.05, α = 0.005, 6 PGD and
3 surrogate steps per epoch, 50 epochs; here taken from ``layer1``).
Changed: the official code attacks a copy f' of the surrogate that is first trained 3 steps on clean
photos (f' = f.clone(), Algorithm 1 line 3); we attack θd directly, as the paper's ablation does.
Only the UNet is trained (the official code also trains the text encoder), with fp32 master weights,
and without the prior-preservation term.
"""

from __future__ import annotations

from dladiff.config import Config
from dladiff.methods.base import MethodProtector, pgd_with_training


class ASPLProtector(MethodProtector):
    """ADFT without stage 1: n1 + n2 PGD steps on θd's denoising loss, then n3 steps of θd on x + δ."""

    name = "aspl"

    @classmethod
    def engine_config(cls, cfg: Config) -> Config:
        return pgd_with_training(cfg)
