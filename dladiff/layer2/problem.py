"""One face as layer 2's optimization problem: its patch, its alignments, its clean embeddings, the warp.

For a face of the layer-1 output x1 (landmarks detected on x1) and of the clean photo x:

* the **patch**: the smallest box of x1 holding every crop the attack cuts (``crop_box``);
* the **master alignment** ``A``: patch → the ``crop_size``² aligned face on ArcFace's template, the
  paper's grid for δ2;
* per encoder, its **alignments** (patch → its crop): its own template first, then other templates
  (``align_templates``) and other landmark sources' faces (``landmark_sources``), the pool
  :class:`~dladiff.layer2.transforms.AlignmentSampler` draws from;
* the **warp** x1 ⊕ δ2 (:class:`PatchWarp`): δ2 on the aligned face, brought back with the inverse
  of ``A`` (paper), or δ2 in the patch's own pixels (``full_resolution``); only pixels inside the
  aligned face's footprint change, scaled by the budget map when one is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dladiff.config import Layer2Config
from dladiff.faces.align import (
    ARCFACE_TEMPLATE_112,
    alignment_matrix,
    estimate_similarity,
    inverse_warp_to_image,
    transform_points,
    warp_to_crop,
)
from dladiff.faces.detect import Face
from dladiff.faces.encoders import IdentityEncoder, embed_face, named_template
from dladiff.faces.landmarks import SourceFace, nearest, source_alignments


@dataclass
class FaceProblem:
    """One face, ready for PGD: its patch of x1, alignment matrices and clean embeddings."""

    face_bbox: np.ndarray  # (4,) of the clean face, photo pixels
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) of the patch in the photo
    patch: torch.Tensor  # (1, 3, h, w) of x1 in [-1, 1]
    master: np.ndarray  # (2, 3) patch → aligned face (crop_size²)
    alignments: dict[str, list[np.ndarray]]  # per encoder, patch → its crop (landmarks of x1): own template first, then variants
    clean_embeddings: dict[str, torch.Tensor]  # per encoder, (D,) of the clean face
    weight: torch.Tensor | None = None  # (1, 1, h, w) in [0, 1]: the budget map over η on the patch (None = uniform η)


class PatchWarp:
    """x1 ⊕ δ2 on a face's patch: δ2's grid (``reference``) and the map back into the patch.

    Paper mode: δ2 ``(1, 3, crop_size, crop_size)`` on the aligned face, warped back with the
    inverse alignment (a convex combination of crop pixels, so |δ| ≤ η2 holds in the photo).
    ``full_resolution``: δ2 ``(1, 3, h, w)`` on the patch itself, masked to the aligned face's footprint.
    """

    def __init__(self, problem: FaceProblem, crop_size: int, full_resolution: bool):
        self.problem, self.full_resolution = problem, full_resolution
        patch = problem.patch
        if full_resolution:
            self.reference = patch
            empty = torch.zeros(1, 1, crop_size, crop_size)
            self.footprint = inverse_warp_to_image(empty, problem.master, patch.shape[-2:])[1]
        else:
            self.reference = warp_to_crop(patch, torch.as_tensor(problem.master, dtype=torch.float32), crop_size)

    def __call__(self, delta: torch.Tensor) -> torch.Tensor:
        """The perturbed patch ``(1, 3, h, w)``, clamped to [-1, 1]; differentiable in ``delta``."""
        patch, weight = self.problem.patch, self.problem.weight
        if self.full_resolution:
            image_delta = delta * self.footprint
        else:
            image_delta, _ = inverse_warp_to_image(delta, self.problem.master, patch.shape[-2:])
        return (patch + (image_delta if weight is None else image_delta * weight)).clamp(-1, 1)


def shift_matrix(M: np.ndarray, x0: int, y0: int) -> np.ndarray:
    """The matrix acting on a patch whose top-left corner is (x0, y0) in the photo."""
    out = np.array(M, dtype=np.float64)
    out[:, 2] += out[:, :2] @ np.array([x0, y0], dtype=np.float64)
    return out


def crop_box(matrices: list[tuple[np.ndarray, int]], height: int, width: int, margin: int = 2) -> tuple[int, int, int, int]:
    """Smallest photo box (x0, y0, x1, y1) holding every crop's footprint, plus a margin, clipped."""
    corners = []
    for M, size in matrices:
        inverse = np.linalg.inv(np.vstack([M, [0.0, 0.0, 1.0]]))[:2]
        square = np.array([[0, 0], [size, 0], [0, size], [size, size]], dtype=np.float64) - 0.5
        corners.append(square @ inverse[:, :2].T + inverse[:, 2])
    points = np.concatenate(corners)
    x0, y0 = np.floor(points.min(0)).astype(int) - margin
    x1, y1 = np.ceil(points.max(0)).astype(int) + margin
    return max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)


def master_template(crop_size: int) -> np.ndarray:
    """ArcFace's 5-point template scaled to a ``crop_size``² aligned face (the paper's δ2 grid)."""
    return ARCFACE_TEMPLATE_112 * (crop_size / 112.0)


def match_face(face: Face, candidates: list[Face]) -> Face:
    """The candidate whose landmarks are closest to ``face``'s (itself if there is none close)."""
    if not candidates:
        return face
    distances = [np.linalg.norm(c.landmarks.mean(0) - face.landmarks.mean(0)) for c in candidates]
    best = int(np.argmin(distances))
    eye_gap = np.linalg.norm(face.landmarks[0] - face.landmarks[1])
    return candidates[best] if distances[best] < eye_gap else face


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


def encoder_templates(encoder: IdentityEncoder, others: tuple[str, ...]) -> list[np.ndarray]:
    """The encoder's own template, then each named template (``arcface``, ``dlib``) fitted onto it."""
    return template_variants(encoder.template, [named_template(name, encoder.crop_size) for name in others])


def encoder_alignments(face: Face, encoders: dict[str, IdentityEncoder], templates: tuple[str, ...],
                       source_faces: dict[str, list[SourceFace]] | None) -> dict[str, list[np.ndarray]]:
    """Per encoder, photo → crop matrices: its templates on ``face``'s landmarks, then each matched source's face.

    A source face matched to ``face`` adds its alignment to every encoder's list (dlib's own chip
    matrix for the dlib encoder).
    """
    per_encoder = {n: [alignment_matrix(face.landmarks, t) for t in encoder_templates(e, templates)]
                   for n, e in encoders.items()}
    matched = [found for faces in (source_faces or {}).values() if (found := nearest(face, faces))]
    for name, encoder in encoders.items():
        per_encoder[name] += [source_alignments(found, encoder.template, encoder.crop_size, name == "dlib")
                              for found in matched]
    return per_encoder


def build_problem(clean_face: Face, protected_face: Face, x1: torch.Tensor, clean: torch.Tensor,
                  encoders: dict[str, IdentityEncoder], cfg: Layer2Config,
                  source_faces: dict[str, list[SourceFace]] | None = None) -> FaceProblem:
    """The face's patch of x1 ``(1, 3, H, W)``, its alignments (landmarks of x1) and clean embeddings (landmarks of x).

    ``source_faces``: faces of x1 by other landmark sources (alignment diversity).
    """
    height, width = x1.shape[-2:]
    master = alignment_matrix(protected_face.landmarks, master_template(cfg.crop_size))
    per_encoder = encoder_alignments(protected_face, encoders, cfg.align_templates, source_faces)
    sized = [(master, cfg.crop_size)] + [(M, encoders[n].crop_size) for n, Ms in per_encoder.items() for M in Ms]
    x0, y0, x1_, y1_ = crop_box(sized, height, width)
    return FaceProblem(
        face_bbox=clean_face.bbox,
        box=(x0, y0, x1_, y1_),
        patch=x1[..., y0:y1_, x0:x1_].clone(),
        master=shift_matrix(master, x0, y0),
        alignments={n: [shift_matrix(M, x0, y0) for M in Ms] for n, Ms in per_encoder.items()},
        clean_embeddings={n: embed_face(e, clean, clean_face.landmarks) for n, e in encoders.items()},
    )
