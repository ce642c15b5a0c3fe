"""Layer 2: weighted multi-encoder identity PGD with jittered face alignment (paper §4.2, Eqs. 10-11).

For every face of the layer-1 output x1 (landmarks detected on x1) and its clean counterpart x
(landmarks detected on x), with encoders E_k and weights w_k:

    L_id(δ2) = Σ_k w_k · cos(E_k(Align_k(x1 ⊕ δ2)), E_k(Align_k(x)))            (Eq. 10)
    δ2 ← Π_η2(δ2 − α2 · sign(∇δ2 L_id)), stopping once L_id / Σ w_k < τ        (Eq. 11)

Where each piece lives:

* :mod:`~dladiff.layer2.pgd`: the plain loop (Eq. 11), :func:`sign_pgd`;
* :mod:`~dladiff.layer2.objective`: Eq. 10 on one face (crops, encoders, feature loss), weighted by
  :class:`dladiff.faces.ensemble.Ensemble` (fixed as in the paper, or normalized with a hinge);
* :mod:`~dladiff.layer2.transforms`: momentum (MI), gradient smoothing (TI), input diversity (DI),
  alignment jitter; EOT is :func:`dladiff.eot.eot_transform`;
* :mod:`~dladiff.layer2.problem`: one face's patch, alignments (templates, landmark sources), clean
  embeddings, and the warp x1 ⊕ δ2 (aligned-face grid + inverse warp, or the photo's own grid);
* :mod:`~dladiff.layer2.attack`: the pieces assembled from :class:`~dladiff.config.Layer2Config`;
* :mod:`~dladiff.layer2.photos`: whole photos (compose, round, retries of lost faces, reports);
* :mod:`~dladiff.layer2.models`: the detector, encoders, judges and landmark sources, loaded once.
"""

from dladiff.layer2.models import Layer2Models, prepare_layer2
from dladiff.layer2.photos import measure_identity, protect_image, protect_photos

__all__ = ["Layer2Models", "measure_identity", "prepare_layer2", "protect_image", "protect_photos"]
