"""DLADiff layer 1: DSUR + ADFT (this paper, §4.1, Eqs. 7-9) through the shared method interface.

The engine itself (:class:`~dladiff.layer1.ADFTProtector`) with its own config: n1 PGD steps on L_attn
(stage 1, when ``layer1.dsur``), n2 on θd's denoising loss (stage 2), n3 steps of θd (stage 3, when
``layer1.adft``): exactly the steps and random draws of ``run_layer1``.
"""

from __future__ import annotations

from dladiff.config import Config
from dladiff.methods.base import MethodProtector


class DLADiffProtector(MethodProtector):
    """Stage 1 (L_attn, Eq. 8) and stage 2 (L_denoise, Eq. 3) PGD, then stage 3 training (Eq. 9)."""

    name = "dladiff"

    @classmethod
    def needs_static_surrogate(cls, cfg: Config) -> bool:
        return cfg.layer1.dsur and cfg.layer1.stage1_steps > 0
