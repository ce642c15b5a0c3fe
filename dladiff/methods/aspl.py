"""ASPL — Alternating Surrogate and Perturbation Learning (Van Le et al., "Anti-DreamBooth: Protecting
users from personalized text-to-image synthesis", ICCV 2023, Algorithm 1).

Each epoch: PGD ascent on the denoising loss (Eq. 3) of a surrogate θd on x + δ ``(N, 3, R, R)``,
then DreamBooth steps of θd on x + δ. It is the paper's "w/o DSUR" ablation (Table 5). No settings
of its own: n1 + n2 PGD steps (6) and n3 surrogate steps (3, lr 5e-6) per epoch, η = 0.05, α = 0.005
([-1, 1] units), E = 50, all from ``layer1``; no stage 3 when ``layer1.adft`` is false.

Kept: the alternation, the loss, the budget of the official script (η = 0.05, α = 0.005, 6 PGD and
3 surrogate steps per epoch, 50 epochs).
Changed: the official code attacks a copy f' of the surrogate that is first trained 3 steps on clean
photos (f' = f.clone(), Algorithm 1 line 3); we attack θd directly, as the paper's ablation does.
Only the UNet is trained (the official code also trains the text encoder), with fp32 master weights,
and without the prior-preservation term.
"""

from __future__ import annotations

from dladiff.layer1.phases import PGD, Method, Train
from dladiff.methods.registry import register


@register
class ASPL(Method):
    """n1 + n2 PGD steps on θd's denoising loss, then n3 steps of θd on x + δ."""

    name = "aspl"
    trains_surrogate = True

    def epoch(self, state):
        from dladiff.layer1.stages import denoising_loss

        return [PGD("denoise", denoising_loss, self.pgd_budget), Train(self.train_steps)]
