"""Layer 2's objective on one face: Eq. 10 through the encoders, with the optional input transforms and feature loss.

    L_id(δ2) = Σ_k w_k · term_k(E_k(A_k(T(x1 ⊕ δ2))), E_k(A_k(x))) / Σ_k w_k           (Eq. 10)

term_k is the cosine (``weighting: fixed``, the paper) or the hinged margin score of
:class:`dladiff.faces.ensemble.Ensemble`; A_k an alignment drawn by the
:class:`~dladiff.layer2.transforms.AlignmentSampler`; T the optional EOT transform of the patch; DI
(``diverse``) acts on each crop. With ``features`` the loss adds λ_f times the cosine between
intermediate feature maps of the perturbed crop and of x1's crop (Zhou et al. 2018 "TAP", Huang et
al. 2019 "ILA"); the reported value and the stop rule use the embedding terms alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dladiff.faces.align import warp_to_crop
from dladiff.faces.encoders import IdentityEncoder
from dladiff.faces.ensemble import Ensemble
from dladiff.layer2.pgd import Evaluation
from dladiff.layer2.problem import FaceProblem, PatchWarp
from dladiff.layer2.transforms import AlignmentSampler

Transform = Callable[[torch.Tensor], torch.Tensor]


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

    def __enter__(self) -> FeatureTap:
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


@dataclass(frozen=True)
class FeatureLoss:
    """λ_f (``layer2.feature_weight``) and the relative depths of the compared convolutions (``feature_depths``)."""

    weight: float
    depths: tuple[float, ...]


class IdentityObjective:
    """δ2 ↦ :class:`~dladiff.layer2.pgd.Evaluation` for one face: the objective :func:`~dladiff.layer2.pgd.sign_pgd` descends.

    Args:
        problem: the face (patch, alignments, clean embeddings ``(D,)`` per encoder).
        warp: x1 ⊕ δ2, δ2 ``(1, 3, S, S)`` → perturbed patch ``(1, 3, h, w)``.
        encoders, ensemble: the E_k and how their terms are weighted; ``threshold`` τ for the fixed stop rule.
        sampler: the alignment draws, ``(n, 2, 3)`` per encoder and step.
        eot: optional transform of the perturbed patch (EOT); ``diverse``: optional transform of the
            crops ``(n, C, s, s)`` (DI), applied alike to a crop and its feature reference.
        features: optional intermediate-feature loss.
    """

    def __init__(self, problem: FaceProblem, warp: PatchWarp, encoders: dict[str, IdentityEncoder], ensemble: Ensemble,
                 threshold: float, sampler: AlignmentSampler, eot: Transform | None = None,
                 diverse: Transform | None = None, features: FeatureLoss | None = None):
        self.problem, self.warp, self.encoders, self.ensemble = problem, warp, encoders, ensemble
        self.threshold, self.sampler, self.eot, self.diverse, self.features = threshold, sampler, eot, diverse, features

    def crops(self, perturbed: torch.Tensor, matrices: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The encoder's crops ``(n, 3, size, size)`` of the perturbed patch and, with features, of x1's (no grad)."""
        n = matrices.shape[0]
        crops = warp_to_crop(perturbed.expand(n, -1, -1, -1), matrices, size)
        reference = None
        if self.features is not None:
            with torch.no_grad():
                reference = warp_to_crop(self.problem.patch.expand(n, -1, -1, -1), matrices, size)
        if self.diverse is not None:
            stacked = self.diverse(crops if reference is None else torch.cat([crops, reference], dim=1))
            crops, reference = stacked[:, :3], None if reference is None else stacked[:, 3:].detach()
        return crops, reference

    def encoder_loss(self, name: str, encoder: IdentityEncoder, perturbed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(term, loss) of one encoder: its weighted-ensemble term (mean over samples), plus λ_f · feature cosine."""
        crops, reference = self.crops(perturbed, self.sampler(name, encoder.crop_size), encoder.crop_size)
        if self.features is None:
            term = self.term(name, encoder, encoder(crops))
            return term, term
        with FeatureTap(encoder, self.features.depths) as tap:
            with torch.no_grad():
                encoder(reference)
                reference_features = tap.collect()
            term = self.term(name, encoder, encoder(crops))
            similarity = feature_similarity(tap.collect(), reference_features)
        return term, term + self.features.weight * similarity

    def term(self, name: str, encoder: IdentityEncoder, embeddings: torch.Tensor) -> torch.Tensor:
        """The encoder's ensemble term (mean over samples); detached when its hinge is shut (zero gradient, no backward)."""
        clean, threshold, kind = self.problem.clean_embeddings[name], encoder.threshold, encoder.threshold_kind
        term = self.ensemble.score(embeddings, clean, threshold, kind).mean()
        return term.detach() if self.ensemble.saturated(embeddings, clean, threshold, kind) else term

    def __call__(self, delta: torch.Tensor) -> Evaluation:
        perturbed = self.warp(delta)
        if self.eot is not None:
            perturbed = self.eot(perturbed)
        terms, losses = {}, {}
        for name, encoder in self.encoders.items():
            terms[name], losses[name] = self.encoder_loss(name, encoder, perturbed)
        parts = {name: float(term.detach()) for name, term in terms.items()}
        value = float(self.ensemble.combine(terms).detach())
        return Evaluation(self.ensemble.combine(losses), value, self.ensemble.done(parts, self.threshold))
