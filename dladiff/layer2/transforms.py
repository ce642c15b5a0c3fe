"""Pieces around layer 2's plain PGD loop: gradient transforms and input transforms.

Gradient transforms (what :func:`dladiff.layer2.pgd.sign_pgd` signs), ``grad`` ``(N, C, H, W)``:

* :func:`momentum` / :class:`Momentum`: MI-FGSM (Dong et al. 2018), g ← μ·g + ∇/mean|∇|;
* :func:`gaussian_kernel`, :func:`smooth_gradient`: TI-FGSM (Dong et al. 2019), a Gaussian over ∇.

Input transforms (what the encoders see), tensors in [-1, 1]:

* :func:`diverse_input`: DI-FGSM (Xie et al. 2019), random shrink-and-pad of each crop;
* :class:`AlignmentSampler`: alignment diversity, jittered draws among a face's alignments
  (own template, other templates, other landmark sources; built in :mod:`dladiff.layer2.problem`);
* EOT: the differentiable JPEG / resize / blur of :func:`dladiff.eot.eot_transform`, used as is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dladiff.faces.align import jitter_matrix


def momentum(grad: torch.Tensor, velocity: torch.Tensor | None, mu: float) -> torch.Tensor:
    """MI-FGSM's accumulated gradient g ← μ·g + ∇ / mean|∇| (per sample); ``velocity`` = previous g, None at first.

    Shapes: ``grad``, ``velocity`` and the result ``(N, ...)``. μ (``layer2.momentum``, default 1.0) is the decay.
    """
    scale = grad.abs().flatten(1).mean(1).clamp_min(1e-12).view(-1, *([1] * (grad.dim() - 1)))
    normalized = grad / scale
    return normalized if velocity is None else mu * velocity + normalized


class Momentum:
    """:func:`momentum` with its state: call it on each step's gradient, get the direction to sign."""

    def __init__(self, mu: float):
        self.mu, self.velocity = mu, None

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        self.velocity = momentum(grad, self.velocity, self.mu)
        return self.velocity


def gaussian_kernel(size: int) -> torch.Tensor:
    """TI-FGSM's ``(size, size)`` Gaussian, σ = (size − 1)/6 (radius 3σ as Dong et al.'s ``gkern``), sums to 1."""
    sigma = max((size - 1) / 6.0, 1e-6)
    k = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(k**2) / (2 * sigma**2))
    return (torch.outer(g, g) / g.sum() ** 2).float()


def smooth_gradient(grad: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """TI-FGSM: ``grad`` ``(N, C, H, W)`` convolved per channel with ``kernel`` ``(k, k)`` (zero padding, same size).

    Equivalent to averaging the gradient over small translations of the input, which makes the
    perturbation less specific to the surrogate.
    """
    size, channels = kernel.shape[-1], grad.shape[1]
    weight = kernel.to(grad).expand(channels, 1, size, size)
    pad = size // 2
    return F.conv2d(F.pad(grad, (pad, size - 1 - pad, pad, size - 1 - pad)), weight, groups=channels)


def chain(*transforms: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The transforms applied left to right (None when there is none: PGD signs the raw gradient)."""
    if not transforms:
        return None

    def apply(grad: torch.Tensor) -> torch.Tensor:
        for transform in transforms:
            grad = transform(grad)
        return grad

    return apply


def diverse_input(crops: torch.Tensor, generator: torch.Generator, probability: float, max_shrink: float,
                  fill: float = -1.0) -> torch.Tensor:
    """DI-FGSM: with ``probability`` per crop, shrink it to a random side in [S/max_shrink, S] and pad back to S.

    ``crops`` ``(N, C, S, S)`` → ``(N, C, S, S)``; each selected crop is resized (bilinear,
    differentiable) to side r and placed at a random offset in an S² canvas of value ``fill`` (-1 =
    black). Xie et al. resize 299 → [299, 330) and pad to 330; recognizers take one fixed side, so
    the canvas here stays S. Defaults: ``layer2.diversity_probability`` 0.5, ``diversity_shrink`` 1.15.
    """
    if probability <= 0 or max_shrink <= 1:
        return crops
    size = crops.shape[-1]
    out = []
    for crop in crops:
        draws = torch.rand(3, generator=generator).tolist()
        if draws[0] >= probability:
            out.append(crop)
            continue
        side = min(max(round(size / max_shrink + draws[1] * (size - size / max_shrink)), 1), size)
        small = F.interpolate(crop[None], size=(side, side), mode="bilinear", align_corners=False, antialias=False)[0]
        slack = size - side
        top = int(draws[2] * (slack + 1)) if slack else 0
        left = int(torch.rand(1, generator=generator).item() * (slack + 1)) if slack else 0
        out.append(F.pad(small - fill, (left, slack - left, top, slack - top)) + fill)
    return torch.stack(out)


@dataclass(frozen=True)
class Jitter:
    """Standard deviations of the random similarity added to an alignment each step."""

    translation: float = 1.0  # crop pixels
    rotation: float = 1.0  # degrees
    scale: float = 0.01  # relative


class AlignmentSampler:
    """Alignment diversity: per step and encoder, ``samples`` jittered matrices drawn among its alignments.

    ``alignments``: per encoder name, (2, 3) patch → crop matrices, its own template first. Each
    call takes a random starting variant (when there are several) and the next ``samples``
    variants cyclically, each with its own jitter draw from ``rng``.
    """

    def __init__(self, alignments: dict[str, list[np.ndarray]], rng: np.random.Generator, samples: int, jitter: Jitter):
        self.alignments, self.rng, self.samples, self.jitter = alignments, rng, samples, jitter

    def __call__(self, name: str, crop_size: int) -> torch.Tensor:
        """``(samples, 2, 3)`` float32 matrices for encoder ``name`` (crops of side ``crop_size``)."""
        variants, j = self.alignments[name], self.jitter
        offset = int(self.rng.integers(len(variants))) if len(variants) > 1 else 0
        matrices = [jitter_matrix(variants[(offset + i) % len(variants)], self.rng, j.translation, j.rotation,
                                  j.scale, crop_size=crop_size)
                    for i in range(self.samples)]
        return torch.as_tensor(np.stack(matrices), dtype=torch.float32)
