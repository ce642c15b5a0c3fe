"""How layer 2 weighs its encoders' terms into one loss (paper Eq. 10 and a balanced variant).

``fixed`` is the paper's weighted sum of cosines, L_id = Σ_k w_k cos_k / Σ_k w_k (Eq. 10). With
recognizers of different margins one of them takes the whole budget: dlib's cosine stays near
0.8 past its Euclidean threshold (its descriptors are not centred), SFace's drops fast.

``normalized`` puts every encoder on its own decision scale first:

    s_k = (cos_k − t_k) / (1 − t_k)            cosine encoders (same person when cos > t_k)
    s_k = (t_k − ‖e_k − e_k^clean‖) / t_k      Euclidean encoders (dlib: distance < 0.6)

so s_k = 1 for the clean face, 0 at the encoder's own threshold and < 0 past it. With a hinge
margin m ≥ 0 each term is max(s_k + m, 0): an encoder already past its threshold by m stops
pulling the perturbation, and the budget goes to the others. The attack stops when every encoder
is past its threshold (by the margin when hinged).

Shapes: embeddings ``(N, D)`` (N alignment samples), the clean embedding ``(D,)``; scores ``(N,)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Weighting = Literal["fixed", "normalized"]


def cosine(embeddings: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Cosine similarity ``(N,)`` of each embedding to the clean one."""
    return F.cosine_similarity(embeddings, clean[None], dim=1)


def distance(embeddings: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Euclidean distance ``(N,)`` to the clean embedding (differentiable at 0)."""
    return ((embeddings - clean[None]) ** 2).sum(1).add(1e-12).sqrt()


def margin_score(embeddings: torch.Tensor, clean: torch.Tensor, threshold: float, kind: str) -> torch.Tensor:
    """s ``(N,)``: 1 at the clean face, 0 at the encoder's threshold, negative past it (its own metric)."""
    if kind == "euclidean":
        return (threshold - distance(embeddings, clean)) / threshold
    return (cosine(embeddings, clean) - threshold) / (1.0 - threshold)


@dataclass(frozen=True)
class Ensemble:
    """The weighting of Eq. 10's terms: ``fixed`` (the paper) or ``normalized`` with a hinge ``margin``.

    ``margin`` is in normalized units (fraction of the clean-to-threshold gap); a negative margin
    turns the hinge off (plain normalized sum).
    """

    weights: dict[str, float]
    weighting: Weighting = "normalized"
    margin: float = 0.3

    def score(self, embeddings: torch.Tensor, clean: torch.Tensor, threshold: float, kind: str) -> torch.Tensor:
        """One encoder's per-sample term ``(N,)`` before weighting: cosine (fixed) or hinged margin score."""
        if self.weighting == "fixed":
            return cosine(embeddings, clean)
        score = margin_score(embeddings, clean, threshold, kind)
        return score if self.margin < 0 else (score + self.margin).clamp_min(0.0)

    def saturated(self, embeddings: torch.Tensor, clean: torch.Tensor, threshold: float, kind: str) -> bool:
        """Whether every sample's hinge is shut (s + m < 0): the term is 0 with a zero gradient, so its encoder needs
        no backward pass. Always False for ``fixed`` weighting and without a hinge."""
        if self.weighting == "fixed" or self.margin < 0:
            return False
        with torch.no_grad():
            return bool((margin_score(embeddings, clean, threshold, kind) + self.margin < 0).all())

    def combine(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """Σ_k w_k · term_k / Σ_k w_k over the encoders of ``terms`` (scalars)."""
        total = sum(self.weights[name] for name in terms) or 1.0
        return sum(self.weights[name] * term for name, term in terms.items()) / total

    def done(self, terms: dict[str, float], tau: float) -> bool:
        """Stop PGD: fixed, once the weighted cosine is below τ (Eq. 11); normalized, once every encoder is
        past its own threshold (hinged: by the margin, every term 0). A weighted mean of normalized scores
        would stop with one encoder far past and another not past at all."""
        if self.weighting == "fixed":
            return float(self.combine({n: torch.tensor(v) for n, v in terms.items()})) < tau
        if self.margin < 0:
            return all(value < 0.0 for value in terms.values())
        return all(value <= 0.0 for value in terms.values())
