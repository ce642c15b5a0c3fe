"""Transfer techniques for layer 2's identity PGD: perturbations that also fool recognizers not in the loop.

Each is a pure function (or a small hook helper) that :class:`dladiff.layer2.IdentityAttack` switches
on from :class:`dladiff.config.Layer2Config`:

* momentum (MI-FGSM, Dong et al. 2018): :func:`momentum_direction`;
* input diversity (DI-FGSM, Xie et al. 2019): :func:`diverse_inputs`, random resize and pad;
* translation invariance (TI-FGSM, Dong et al. 2019): :func:`smooth_gradient`, a Gaussian filter
  over the gradient;
* diversity of alignment: :func:`template_variants`, the same face aligned with other pipelines'
  landmark templates (and, in the attack, several jittered draws per step);
* intermediate features (feature-level losses as in Zhou et al. 2018 "TAP" and Huang et al. 2019
  "ILA"): :class:`FeatureTap` records chosen layers' outputs during the encoder's forward pass.

Tensors are ``(N, C, H, W)`` in [-1, 1] pixel units unless said otherwise.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from dladiff.faces.align import estimate_similarity, transform_points


def momentum_direction(velocity: torch.Tensor | None, grad: torch.Tensor, decay: float) -> torch.Tensor:
    """MI-FGSM's accumulated gradient g ← μ·g + ∇ / ‖∇‖₁ (per sample, mean-absolute normalized).

    ``velocity`` is the previous g (None at the first step), ``decay`` is μ; PGD then steps along
    sign(g). Shapes: ``grad`` and the result ``(N, ...)``.
    """
    scale = grad.abs().flatten(1).mean(1).clamp_min(1e-12).view(-1, *([1] * (grad.dim() - 1)))
    normalized = grad / scale
    return normalized if velocity is None else decay * velocity + normalized


def gaussian_kernel_2d(size: int) -> torch.Tensor:
    """TI-FGSM's ``size``² Gaussian (σ = (size − 1)/6, i.e. radius 3σ as in Dong et al.'s ``gkern``), sums to 1."""
    sigma = max((size - 1) / 6.0, 1e-6)
    k = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(k**2) / (2 * sigma**2))
    return (torch.outer(g, g) / g.sum() ** 2).float()


def smooth_gradient(grad: torch.Tensor, size: int) -> torch.Tensor:
    """TI-FGSM: ``grad`` ``(N, C, H, W)`` convolved per channel with a ``size``² Gaussian (zero padding).

    ``size <= 1`` returns ``grad`` unchanged. Equivalent to averaging the gradient over small
    translations of the input, which makes the perturbation less specific to the surrogate.
    """
    if size <= 1:
        return grad
    channels = grad.shape[1]
    kernel = gaussian_kernel_2d(size).to(grad).expand(channels, 1, size, size)
    pad = size // 2
    return F.conv2d(F.pad(grad, (pad, size - 1 - pad, pad, size - 1 - pad)), kernel, groups=channels)


def diverse_inputs(crops: torch.Tensor, generator: torch.Generator, probability: float, max_shrink: float,
                   fill: float = -1.0) -> torch.Tensor:
    """DI-FGSM: with ``probability`` per crop, shrink it to a random side in [S/max_shrink, S] and pad back to S.

    ``crops`` ``(N, C, S, S)``; each selected crop is resized (bilinear, differentiable) to side r
    and placed at a random offset in an S² canvas of value ``fill`` (-1 = black). Xie et al. resize
    299 → [299, 330) and pad to 330; recognizers take one fixed side, so the canvas here stays S.
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
        side = round(size / max_shrink + draws[1] * (size - size / max_shrink))
        side = min(max(side, 1), size)
        small = F.interpolate(crop[None], size=(side, side), mode="bilinear", align_corners=False, antialias=False)[0]
        slack = size - side
        top = int(draws[2] * (slack + 1)) if slack else 0
        left = int(torch.rand(1, generator=generator).item() * (slack + 1)) if slack else 0
        out.append(F.pad(small - fill, (left, slack - left, top, slack - top)) + fill)
    return torch.stack(out)


def template_variants(own: np.ndarray, others: list[np.ndarray]) -> list[np.ndarray]:
    """``own`` (5, 2) followed by each other template moved onto ``own`` by a least-squares similarity.

    Aligning the same landmarks to a variant gives the crop another pipeline would make (same
    place and size in the encoder's input on average, a different landmark geometry: dlib's chip
    and insightface's template disagree on eye-to-mouth proportions).
    """
    variants = [np.asarray(own, dtype=np.float64)]
    for other in others:
        other = np.asarray(other, dtype=np.float64)
        variants.append(transform_points(estimate_similarity(other, own), other))
    return variants


class FeatureTap:
    """Records the outputs of a network's convolutions at relative depths during forward passes.

    ``depths`` in (0, 1]: 0.5 is the convolution halfway through the network's list of
    ``Conv2d`` modules (registration order, which is execution order for dlib's port and for
    onnx2torch graphs). Use as a context manager; :meth:`collect` gives the maps ``(N, C, h, w)``
    of the last forward pass, in ``depths`` order.
    """

    def __init__(self, net: torch.nn.Module, depths: tuple[float, ...]):
        convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
        if not convs:
            raise ValueError("FeatureTap needs a network with Conv2d layers")
        self.modules = [convs[min(len(convs) - 1, max(0, math.ceil(d * len(convs)) - 1))] for d in depths]
        self._slots: dict[int, torch.Tensor] = {}
        self._handles = []

    def __enter__(self) -> "FeatureTap":
        def hook(index):
            def record(_module, _inputs, output):
                self._slots[index] = output

            return record

        self._handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(self.modules)]
        return self

    def collect(self) -> list[torch.Tensor]:
        """The recorded maps of the last forward pass, in ``depths`` order."""
        return [self._slots[i] for i in range(len(self.modules))]

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def feature_similarity(perturbed: list[torch.Tensor], reference: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layers and samples of the cosine between flattened feature maps ``(N, C, h, w)``."""
    cosines = [F.cosine_similarity(p.flatten(1), r.flatten(1), dim=1).mean() for p, r in zip(perturbed, reference)]
    return torch.stack(cosines).mean()
