"""Layer 2's attack on one face, assembled from the config: the plain loop plus the pieces switched on.

Piece (where it lives): on in ``configs/default.yaml`` / ``configs/layer2_paper.yaml``

* sign PGD, Eqs. 10-11 (:func:`dladiff.layer2.pgd.sign_pgd`): both;
* weighting of the terms (:class:`dladiff.faces.ensemble.Ensemble`): normalized + hinge 0.3 / fixed;
* alignment jitter (:class:`~dladiff.layer2.transforms.AlignmentSampler`): 1 px, 1°, 1 % / the same;
* landmark sources (:mod:`dladiff.faces.landmarks`, :mod:`~dladiff.layer2.problem`): dlib68 + dlib5 / none;
* momentum, MI (:class:`~dladiff.layer2.transforms.Momentum`): μ = 1 / off;
* input diversity, DI (:func:`~dladiff.layer2.transforms.diverse_input`): p = 0.5 / off;
* gradient smoothing, TI (:func:`~dladiff.layer2.transforms.smooth_gradient`): 7 px / off;
* EOT (:func:`dladiff.eot.eot_transform`): off / off (``eot.enabled`` with 2 in ``eot.layers``);
* feature loss (:class:`~dladiff.layer2.objective.FeatureLoss`): off / off.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from dladiff.config import EOTConfig, Layer2Config
from dladiff.faces.ensemble import Ensemble
from dladiff.layer2.models import Layer2Models
from dladiff.layer2.objective import FeatureLoss, IdentityObjective
from dladiff.layer2.pgd import GradientTransform, sign_pgd
from dladiff.layer2.problem import FaceProblem, PatchWarp
from dladiff.layer2.transforms import (
    AlignmentSampler,
    Jitter,
    Momentum,
    chain,
    diverse_input,
    gaussian_kernel,
    smooth_gradient,
)
from dladiff.eot import eot_transform


@dataclass
class FaceRun:
    """The result of PGD on one face: δ2 on the face's patch grid and what to report."""

    patch_delta: torch.Tensor  # (1, 3, h, w), [-1, 1] units
    report: dict


def gradient_direction(cfg: Layer2Config) -> GradientTransform | None:
    """TI smoothing (``ti_kernel`` > 1) then MI momentum (``momentum`` > 0); None when both are off."""
    pieces = []
    if cfg.ti_kernel > 1:
        pieces.append(partial(smooth_gradient, kernel=gaussian_kernel(cfg.ti_kernel)))
    if cfg.momentum > 0:
        pieces.append(Momentum(cfg.momentum))
    return chain(*pieces)


def identity_objective(problem: FaceProblem, warp: PatchWarp, models: Layer2Models, cfg: Layer2Config,
                       rng: np.random.Generator, eot: EOTConfig | None = None) -> IdentityObjective:
    """The objective of one face with the input transforms and losses the config switches on.

    A torch generator for EOT and DI is seeded from ``rng`` only when one of them is on.
    """
    eot = eot if eot is not None and eot.on(2) else None
    needs_generator = eot is not None or cfg.diversity_probability > 0
    generator = torch.Generator().manual_seed(int(rng.integers(2**31))) if needs_generator else None
    jitter = Jitter(cfg.jitter_translation, cfg.jitter_rotation, cfg.jitter_scale)
    diverse = None
    if cfg.diversity_probability > 0:
        diverse = partial(diverse_input, generator=generator, probability=cfg.diversity_probability,
                          max_shrink=cfg.diversity_shrink)
    return IdentityObjective(
        problem, warp, models.encoders, Ensemble(models.weights, cfg.weighting, cfg.hinge_margin), cfg.threshold,
        AlignmentSampler(problem.alignments, rng, cfg.align_samples, jitter),
        eot=None if eot is None else partial(eot_transform, generator=generator, cfg=eot),
        diverse=diverse,
        features=FeatureLoss(cfg.feature_weight, cfg.feature_depths) if cfg.feature_weight > 0 else None)


def attack_face(problem: FaceProblem, models: Layer2Models, cfg: Layer2Config, scale: float, rng: np.random.Generator,
                eot: EOTConfig | None = None) -> FaceRun:
    """PGD on one face with the bound η2 and step α2 scaled by ``scale`` (retries of a lost face)."""
    if scale != 1.0:
        cfg = dataclasses.replace(cfg, epsilon=cfg.epsilon * scale, step_size=cfg.step_size * scale)
    warp = PatchWarp(problem, cfg.crop_size, cfg.full_resolution)
    objective = identity_objective(problem, warp, models, cfg, rng, eot)
    delta, steps, value = sign_pgd(objective, warp.reference, cfg.epsilon, cfg.step_size, cfg.steps,
                                   gradient_direction(cfg))
    with torch.no_grad():
        patch_delta = warp(delta) - problem.patch
    box = [round(float(v), 1) for v in problem.face_bbox]
    return FaceRun(patch_delta, {"bbox": box, "steps": steps, "final_similarity": value})
