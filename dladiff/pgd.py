"""Projected gradient arithmetic shared by both layers (Madry et al. 2018; paper Eqs. 9 and 11).

All tensors are in [-1, 1] pixel units. ``x`` is the clean image, ``delta`` the perturbation,
both ``(N, C, H, W)`` (any shape works as long as they match).
"""

from __future__ import annotations

import torch


def project(delta: torch.Tensor, x: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Π: clip δ to [-ε, ε] and x + δ to [-1, 1]; returns the projected δ."""
    delta = delta.clamp(-epsilon, epsilon)
    return (x + delta).clamp(-1.0, 1.0) - x


def sign_step(delta: torch.Tensor, grad: torch.Tensor, step_size: float, ascent: bool = True) -> torch.Tensor:
    """One signed-gradient step δ ± α·sign(∇), ascent (maximize) or descent (minimize)."""
    direction = grad.sign() if ascent else -grad.sign()
    return delta + step_size * direction


def pgd_update(delta: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, step_size: float, epsilon: float, ascent: bool = True) -> torch.Tensor:
    """δ ← Π_ε(δ ± α·sign(∇δ L)): a full PGD step, detached from the graph."""
    with torch.no_grad():
        return project(sign_step(delta, grad, step_size, ascent), x, epsilon)


def random_start(x: torch.Tensor, epsilon: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A uniform random δ in [-ε, ε], projected so that x + δ stays in [-1, 1]."""
    noise = torch.rand(x.shape, generator=generator, device="cpu", dtype=torch.float32).to(x.device)
    return project((noise * 2 - 1) * epsilon, x, epsilon)


def linf(delta: torch.Tensor) -> float:
    """‖δ‖∞ as a Python float."""
    return float(delta.detach().abs().max()) if delta.numel() else 0.0
