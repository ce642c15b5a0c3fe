"""The paper's plain weighted PGD for layer 2 (DLADiff §4.2, Eqs. 10-11).

Everything else layer 2 does (momentum, input diversity, gradient smoothing, EOT, alignment
diversity, feature losses, the balanced ensemble) plugs into this loop from outside: the
objective decides what δ2 is scored on, ``direction`` what gradient gets signed
(:mod:`dladiff.layer2.transforms`, assembled in :mod:`dladiff.layer2.attack`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dladiff.pgd import pgd_update


@dataclass
class Evaluation:
    """What the objective says about one δ2: the loss to descend, the value to report, whether to stop."""

    loss: torch.Tensor  # scalar, differentiable in δ2
    value: float  # L_id / Σ_k w_k (Eq. 10), the figure reported as ``final_similarity``
    done: bool  # the stop rule (Eq. 11: value < τ for the paper's fixed weights)


Objective = Callable[[torch.Tensor], Evaluation]
GradientTransform = Callable[[torch.Tensor], torch.Tensor]


def sign_pgd(objective: Objective, reference: torch.Tensor, epsilon: float | torch.Tensor, step_size: float,
             steps: int, direction: GradientTransform | None = None) -> tuple[torch.Tensor, int, float]:
    """L∞ sign-gradient descent from δ2 = 0 (Madry et al. 2018; DLADiff Eqs. 10-11).

    Per step: score δ2 (``objective``), stop if it says so, else
    δ2 ← Π(δ2 − α2 · sign(direction(∇δ2 L))), Π clipping δ2 to [−η2, η2] and ``reference`` + δ2 to
    [−1, 1]. With ``direction=None`` and the fixed ensemble this is the paper's loop exactly.

    Args:
        objective: δ2 ↦ :class:`Evaluation`; the paper's is Σ_k w_k cos(E_k(A(x1 ⊕ δ2)), E_k(A(x))) / Σ w_k.
        reference: ``(1, 3, H, W)`` in [−1, 1], the pixels δ2 is added to (x1's aligned face, or its patch).
        epsilon: η2, the L∞ bound in [−1, 1] units (default config 0.063 ≈ 8/255).
        step_size: α2 in [−1, 1] units (default 0.01 ≈ 1.3/255).
        steps: the most steps (default 50).
        direction: gradient transform before the sign (momentum, smoothing); None = the raw gradient.

    Returns: (δ2 ``(1, 3, H, W)``, steps taken, the objective's last value).
    """
    delta = torch.zeros_like(reference)
    taken, value = 0, math.nan
    for taken in range(1, steps + 1):
        variable = delta.clone().requires_grad_(True)
        evaluation = objective(variable)
        value = evaluation.value
        if evaluation.done:
            taken -= 1
            break
        (grad,) = torch.autograd.grad(evaluation.loss, variable)
        step = grad if direction is None else direction(grad)
        delta = pgd_update(delta, step, reference, step_size, epsilon, ascent=False)
    return delta, taken, value
