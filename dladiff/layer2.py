"""Layer 2: weighted multi-encoder identity PGD with jittered face alignment (paper §4.2).

For every face of the layer-1 output x1 (landmarks detected on x1) and its clean counterpart x
(landmarks detected on x), with encoders E_k and weights w_k:

    L_id(δ2) = Σ_k w_k · cos(E_k(Align_k(x1 ⊕ δ2)), E_k(Align_k(x)))            (Eq. 10)
    δ2 ← Π_η2(δ2 − α2 · sign(∇δ2 L_id)), stopping once L_id / Σ w_k < τ        (Eq. 11)

``x1 ⊕ δ2`` puts δ2 into the photo: in the paper's mode δ2 lives on the aligned face (ArcFace
template, ``crop_size``²) and is warped back with the inverse alignment; with
``full_resolution: true`` δ2 lives in the photo's own pixel grid around the face. Each step
jitters every alignment matrix a little (robustness to landmark shifts). Only pixels inside the
aligned face's footprint change; the bound holds in the photo because the inverse warp is a
convex combination of crop pixels, and it is enforced again after quantization.

Switches for transfer to recognizers that are not in the loop (:mod:`dladiff.faces.transfer`,
measured in docs/transfer.md): momentum (MI-FGSM), input diversity (DI-FGSM), gradient smoothing
(TI-FGSM), several alignments per step (templates, jitter draws), intermediate-feature losses.
With an :class:`EOTConfig` enabled, the perturbed face patch goes through a random differentiable
JPEG / resize / blur (:func:`dladiff.purify.eot_transform`) before the encoders crop it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dladiff.budget import layer2_bound
from dladiff.config import BudgetConfig, Config, EOTConfig, Layer2Config
from dladiff.data import Portrait
from dladiff.faces.align import (
    ARCFACE_TEMPLATE_112,
    alignment_matrix,
    inverse_warp_to_image,
    jitter_matrix,
    warp_to_crop,
)
from dladiff.faces.detect import Face, FaceDetector, make_detector
from dladiff.faces.ensemble import Ensemble
from dladiff.faces.landmarks import SourceFace, make_sources, nearest, source_alignments
from dladiff.faces.encoders import (
    IdentityEncoder,
    load_encoder,
    named_template,
    resolve_encoder_weights,
)
from dladiff.faces.verdicts import Judge, judge_all, native_judge, native_verdicts, undetected
from dladiff.faces.transfer import (
    FeatureTap,
    diverse_inputs,
    feature_similarity,
    momentum_direction,
    smooth_gradient,
    template_variants,
)
from dladiff.layer2_resume import Layer2Checkpoints, photo_key
from dladiff.pgd import pgd_update, project
from dladiff.purify import eot_transform
from dladiff.runtime import Interrupted, StopRequest, progress

log = logging.getLogger("dladiff")


@dataclass
class Layer2Models:
    """The detector and the weighted encoders, loaded once before any work (missing files fail early)."""

    detector: FaceDetector
    encoders: dict[str, IdentityEncoder]
    weights: dict[str, float]
    judges: dict[str, Judge] = dataclasses.field(default_factory=dict)  # native pipelines of the encoders that have one
    seconds: dict[str, float] = dataclasses.field(default_factory=lambda: defaultdict(float))  # wall time per phase
    sources: list = dataclasses.field(default_factory=list)  # extra landmark sources (alignment diversity)

    @contextlib.contextmanager
    def phase(self, name: str):
        """Add the wall time of the block to ``seconds[name]`` (detection, alignment, pgd, inverse_warp, retries, verdicts)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start


def prepare_layer2(cfg: Layer2Config) -> Layer2Models:
    """Load the face detector and the encoders named by the config (or the default ones)."""
    weights = resolve_encoder_weights(cfg.encoders, cfg.model_root)
    log.info("layer 2 encoders: %s", ", ".join(f"{name} (weight {w:g})" for name, w in weights.items()))
    encoders = {name: load_encoder(name, cfg.model_root) for name in weights}
    detector = make_detector(cfg.detector, cfg.model_root, cfg.det_size)
    judges = {}
    if cfg.native_verdicts:
        judges = {name: judge for name in weights if (judge := native_judge(name, cfg.model_root, cfg.det_size))}
    log.info("layer 2 face detector: %s; native verdicts by: %s", detector.name, ", ".join(judges) or "none")
    sources = make_sources(cfg.landmark_sources, cfg.model_root, cfg.det_size, skip=detector.name)
    return Layer2Models(detector, encoders, weights, judges, sources=sources)


def to_unit(pixels: np.ndarray) -> torch.Tensor:
    """``(H, W, 3) uint8`` → ``(1, 3, H, W)`` float32 in [-1, 1]."""
    return torch.from_numpy(np.array(pixels, dtype=np.float32)).permute(2, 0, 1).unsqueeze(0) / 127.5 - 1.0


def from_unit(x: torch.Tensor) -> np.ndarray:
    """``(1, 3, H, W)`` in [-1, 1] → ``(H, W, 3) float64`` in 0..255 (not rounded)."""
    return ((x[0].permute(1, 2, 0).double() + 1.0) * 127.5).numpy()


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


@dataclass
class FaceProblem:
    """One face, ready for PGD: its patch of x1, alignment matrices and clean embeddings."""

    face_bbox: np.ndarray  # (4,) of the clean face, photo pixels
    box: tuple[int, int, int, int]
    patch: torch.Tensor  # (1, 3, h, w) of x1 in [-1, 1]
    master: np.ndarray  # (2, 3) patch → aligned face (crop_size²)
    alignments: dict[str, list[np.ndarray]]  # per encoder, patch → its crop (landmarks of x1): own template first, then variants
    clean_embeddings: dict[str, torch.Tensor]  # per encoder, (D,) of the clean face
    weight: torch.Tensor | None = None  # (1, 1, h, w) in [0, 1]: the budget map over η on the patch (None = uniform η)


def match_face(face: Face, candidates: list[Face]) -> Face:
    """The candidate whose landmarks are closest to ``face``'s (itself if there is none close)."""
    if not candidates:
        return face
    distances = [np.linalg.norm(c.landmarks.mean(0) - face.landmarks.mean(0)) for c in candidates]
    best = int(np.argmin(distances))
    eye_gap = np.linalg.norm(face.landmarks[0] - face.landmarks[1])
    return candidates[best] if distances[best] < eye_gap else face


@torch.no_grad()
def embed_face(encoder: IdentityEncoder, image: torch.Tensor, landmarks: np.ndarray) -> torch.Tensor:
    """Embedding ``(D,)`` of the face with ``landmarks`` in ``image`` ``(1, 3, H, W)`` [-1, 1]."""
    M = alignment_matrix(landmarks, encoder.template)
    crop = warp_to_crop(image, torch.as_tensor(M, dtype=torch.float32), encoder.crop_size)
    return encoder(crop)[0]


def encoder_templates(encoder: IdentityEncoder, others: tuple[str, ...]) -> list[np.ndarray]:
    """The encoder's own template, then each named template (``arcface``, ``dlib``) fitted onto it."""
    return template_variants(encoder.template, [named_template(name, encoder.crop_size) for name in others])


def build_problem(clean_face: Face, protected_face: Face, x1: torch.Tensor, clean: torch.Tensor,
                  models: Layer2Models, cfg: Layer2Config,
                  source_faces: dict[str, list[SourceFace]] | None = None) -> FaceProblem:
    """Alignments of the face on x1 for each encoder and the master grid, and clean embeddings.

    ``source_faces``: faces of x1 by other landmark sources; each one matched to this face adds
    its alignment to every encoder's list (dlib's own chip matrix for the dlib encoder).
    """
    height, width = x1.shape[-2:]
    master = alignment_matrix(protected_face.landmarks, master_template(cfg.crop_size))
    per_encoder = {n: [alignment_matrix(protected_face.landmarks, t) for t in encoder_templates(e, cfg.align_templates)]
                   for n, e in models.encoders.items()}
    matched = [found for faces in (source_faces or {}).values() if (found := nearest(protected_face, faces))]
    for name, encoder in models.encoders.items():
        per_encoder[name] += [source_alignments(found, encoder.template, encoder.crop_size, name == "dlib")
                              for found in matched]
    sized = [(master, cfg.crop_size)] + [(M, models.encoders[n].crop_size) for n, Ms in per_encoder.items() for M in Ms]
    x0, y0, x1_, y1_ = crop_box(sized, height, width)
    return FaceProblem(
        face_bbox=clean_face.bbox,
        box=(x0, y0, x1_, y1_),
        patch=x1[..., y0:y1_, x0:x1_].clone(),
        master=shift_matrix(master, x0, y0),
        alignments={n: [shift_matrix(M, x0, y0) for M in Ms] for n, Ms in per_encoder.items()},
        clean_embeddings={n: embed_face(e, clean, clean_face.landmarks) for n, e in models.encoders.items()},
    )


class IdentityAttack:
    """PGD on one face (Eqs. 10-11), in the aligned-face grid or the photo's own grid.

    Per step and encoder k: ``align_samples`` crops of x1 ⊕ δ2 (jittered alignments, templates
    drawn among ``align_templates`` variants), optionally through EOT (on the patch) and DI (on
    each crop); the loss is Σ_k w_k [cos_k + λ_f · feature cos_k] / Σ w_k, and δ2 moves along
    −sign of the gradient after TI smoothing and MI momentum.
    """

    def __init__(self, problem: FaceProblem, models: Layer2Models, cfg: Layer2Config, rng: np.random.Generator,
                 eot: EOTConfig | None = None):
        self.problem, self.models, self.cfg, self.rng = problem, models, cfg, rng
        self.eot = eot if eot is not None and eot.enabled else None
        self.ensemble = Ensemble(models.weights, cfg.weighting, cfg.hinge_margin)
        needs_torch_rng = self.eot is not None or cfg.diversity_probability > 0
        self.generator = torch.Generator().manual_seed(int(rng.integers(2**31))) if needs_torch_rng else None
        patch = problem.patch
        if cfg.full_resolution:
            self.reference = patch
            self.footprint = inverse_warp_to_image(torch.zeros(1, 1, cfg.crop_size, cfg.crop_size), problem.master, patch.shape[-2:])[1]
        else:
            self.reference = warp_to_crop(patch, torch.as_tensor(problem.master, dtype=torch.float32), cfg.crop_size)
        self.delta = torch.zeros_like(self.reference)
        self.velocity: torch.Tensor | None = None

    def perturbed_patch(self, delta: torch.Tensor) -> torch.Tensor:
        """x1 ⊕ δ2 on the face's patch, clamped to [-1, 1]."""
        patch, weight = self.problem.patch, self.problem.weight
        if self.cfg.full_resolution:
            image_delta = delta * self.footprint
        else:
            image_delta, _ = inverse_warp_to_image(delta, self.problem.master, patch.shape[-2:])
        return (patch + (image_delta if weight is None else image_delta * weight)).clamp(-1, 1)

    def sample_alignments(self, name: str, encoder: IdentityEncoder, jitter: bool) -> torch.Tensor:
        """(n, 2, 3) patch → crop matrices: n = align_samples draws when optimizing (own template alone otherwise)."""
        variants = self.problem.alignments[name]
        if not jitter:
            return torch.as_tensor(variants[0], dtype=torch.float32)[None]
        offset = int(self.rng.integers(len(variants))) if len(variants) > 1 else 0
        cfg = self.cfg
        matrices = [jitter_matrix(variants[(offset + i) % len(variants)], self.rng, cfg.jitter_translation,
                                  cfg.jitter_rotation, cfg.jitter_scale, crop_size=encoder.crop_size)
                    for i in range(cfg.align_samples)]
        return torch.as_tensor(np.stack(matrices), dtype=torch.float32)

    def encoder_crops(self, perturbed: torch.Tensor, matrices: torch.Tensor, size: int, diverse: bool,
                      with_reference: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Crops (n, 3, size, size) of the perturbed patch and (if asked) the same crops of x1's patch, no grad.

        ``diverse``: apply DI, with the same random shrink-and-pad to a crop and its reference.
        """
        n = matrices.shape[0]
        crops = warp_to_crop(perturbed.expand(n, -1, -1, -1), matrices, size)
        reference = None
        if with_reference:
            with torch.no_grad():
                reference = warp_to_crop(self.problem.patch.expand(n, -1, -1, -1), matrices, size)
        if diverse and self.cfg.diversity_probability > 0:
            stacked = crops if reference is None else torch.cat([crops, reference], dim=1)
            stacked = diverse_inputs(stacked, self.generator, self.cfg.diversity_probability, self.cfg.diversity_shrink)
            crops, reference = stacked[:, :3], None if reference is None else stacked[:, 3:].detach()
        return crops, reference

    def encoder_term(self, encoder: IdentityEncoder, crops: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        """One encoder's term of Eq. 10 on its crops (mean over alignment samples), weighted as the ensemble says."""
        return self.ensemble.score(encoder(crops), clean, encoder.threshold, encoder.threshold_kind).mean()

    def encoder_loss(self, name: str, encoder: IdentityEncoder, perturbed: torch.Tensor, jitter: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(term, loss) of one encoder: the loss adds λ_f · feature cosine when optimizing."""
        with_features = jitter and self.cfg.feature_weight > 0
        crops, reference = self.encoder_crops(perturbed, self.sample_alignments(name, encoder, jitter),
                                              encoder.crop_size, diverse=jitter, with_reference=with_features)
        clean = self.problem.clean_embeddings[name]
        if not with_features:
            term = self.encoder_term(encoder, crops, clean)
            return term, term
        with FeatureTap(encoder, self.cfg.feature_depths) as tap:
            with torch.no_grad():
                encoder(reference)
                reference_features = tap.collect()
            term = self.encoder_term(encoder, crops, clean)
            features = feature_similarity(tap.collect(), reference_features)
        return term, term + self.cfg.feature_weight * features

    def similarity(self, delta: torch.Tensor, jitter: bool) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """(weighted terms L_id / Σw, the loss to descend, per-encoder terms); differentiable in δ2.

        Terms are cosines (``weighting: fixed``, Eq. 10) or hinged margin scores (``normalized``,
        :mod:`dladiff.faces.ensemble`). ``jitter`` marks an optimization step: random alignments,
        EOT, DI and feature terms apply.
        """
        perturbed = self.perturbed_patch(delta)
        if jitter and self.eot is not None:
            perturbed = eot_transform(perturbed, self.generator, self.eot)
        terms, losses = {}, {}
        for name, encoder in self.models.encoders.items():
            terms[name], losses[name] = self.encoder_loss(name, encoder, perturbed, jitter)
        parts = {name: float(term.detach()) for name, term in terms.items()}
        return self.ensemble.combine(terms), self.ensemble.combine(losses), parts

    def direction(self, grad: torch.Tensor) -> torch.Tensor:
        """The gradient PGD signs: TI-smoothed, then accumulated with MI momentum when enabled."""
        grad = smooth_gradient(grad, self.cfg.ti_kernel)
        if self.cfg.momentum > 0:
            self.velocity = momentum_direction(self.velocity, grad, self.cfg.momentum)
            return self.velocity
        return grad

    def run(self) -> tuple[torch.Tensor, int, float]:
        """PGD descent; returns (δ2 on the patch grid in [-1,1] units, steps taken, last similarity)."""
        eps, alpha = self.cfg.epsilon, self.cfg.step_size
        steps, value = 0, float("nan")
        for steps in range(1, self.cfg.steps + 1):
            delta = self.delta.clone().requires_grad_(True)
            similarity, loss, parts = self.similarity(delta, jitter=True)
            value = float(similarity.detach())
            if self.ensemble.done(parts, self.cfg.threshold):
                steps -= 1
                break
            (grad,) = torch.autograd.grad(loss, delta)
            self.delta = pgd_update(self.delta, self.direction(grad), self.reference, alpha, eps, ascent=False)
        with torch.no_grad():
            patch_delta = self.perturbed_patch(self.delta) - self.problem.patch
        return patch_delta, steps, value


def protect_image(x1_pixels: np.ndarray, clean_pixels: np.ndarray, models: Layer2Models, cfg: Layer2Config,
                  seed: int, eot: EOTConfig | None = None,
                  budget: BudgetConfig | None = None) -> tuple[np.ndarray, list[dict]]:
    """Layer 2 on every face of one photo; returns the uint8 photo and a report per face.

    ``budget``: the face region and perceptual bound (:mod:`dladiff.budget`, measured on the
    clean photo); None = the paper's uniform η over each face's warped-back crop. Each face's
    perturbation is scaled by the bound map over η inside PGD, so the bound holds per pixel.

    ``eot``: when given and enabled, every PGD step sees the perturbed face through a random
    differentiable JPEG / resize / blur (expectation over transformations).

    A face that the perturbation hides from the detector, or from any native pipeline in
    ``models.judges`` (YuNet for sface, dlib's HOG for dlib), is optimized again with its bound
    scaled by ``detect_backoff`` (at most ``detect_retries`` times): the aim is a face that is
    read as someone else, not a face that vanishes. Each face report holds the attack's own
    measurement (``encoders``) and the native pipelines' verdicts (``native``, on the returned
    pixels and after JPEG 75).
    """
    x1, clean = to_unit(x1_pixels), to_unit(clean_pixels)
    with models.phase("detection"):
        clean_faces = models.detector.detect(clean_pixels)
        protected_faces = models.detector.detect(x1_pixels) if clean_faces else []
    if not clean_faces:
        return x1_pixels.copy(), []
    rng = np.random.default_rng(seed)
    with models.phase("alignment"):
        source_faces = {source.name: source.faces(x1_pixels) for source in models.sources}
        problems = [build_problem(face, match_face(face, protected_faces), x1, clean, models, cfg, source_faces)
                    for face in clean_faces]
        bound, regions = layer2_bound(clean_pixels, clean_faces, cfg.epsilon, budget)
        for problem in problems:
            x0, y0, x1_, y1_ = problem.box
            problem.weight = None if bound is None else torch.from_numpy(bound[y0:y1_, x0:x1_] / cfg.epsilon)[None, None]
    epsilon = cfg.epsilon if bound is None else torch.from_numpy(bound)[None, None]
    bound_255 = cfg.epsilon * 127.5 if bound is None else bound[..., None] * 127.5
    scales = [1.0] * len(problems)
    with models.phase("pgd"):
        runs = [attack_face(problem, models, cfg, 1.0, rng, eot) for problem in problems]
    boxes = [face.bbox for face in clean_faces]
    with models.phase("verdicts"):
        clean_seen = judge_all(models.judges, clean_pixels)
    for attempt in range(cfg.detect_retries + 1):
        with models.phase("inverse_warp"):
            delta = compose_deltas(x1, problems, runs, epsilon)
            out = quantize(x1_pixels, from_unit(x1 + delta) - x1_pixels.astype(np.float64), bound_255)
        with models.phase("detection"):
            found = models.detector.detect(out)
        with models.phase("verdicts"):
            seen = judge_all(models.judges, out)
        lost = sorted({i for i, face in enumerate(clean_faces) if match_face(face, found) is face}
                      | undetected(clean_seen, seen, boxes))
        if not lost or attempt == cfg.detect_retries:
            break
        with models.phase("retries"):
            for i in lost:
                scales[i] *= cfg.detect_backoff
                runs[i] = attack_face(problems[i], models, cfg, scales[i], rng, eot)
    if lost:
        log.warning("%d face(s) no longer detected after %d retries", len(lost), cfg.detect_retries)
    with models.phase("verdicts"):
        native = native_verdicts(clean_pixels, out, models.judges, boxes,
                                 seen={name: (clean_seen[name], seen[name]) for name in models.judges})
        own = [measure_identity(clean_pixels, out, face, found, models, problem.clean_embeddings)
               for face, problem in zip(clean_faces, problems)]
    return out, [dict(run.report, bound_scale=scale, native=verdict, **measured,
                      **({"region": np.round(region, 1).tolist()} if region is not None else {}))
                 for run, scale, verdict, measured, region in zip(runs, scales, native, own, regions)]


@dataclass
class FaceRun:
    """The result of PGD on one face: δ2 on the face's patch grid and what to report."""

    patch_delta: torch.Tensor
    report: dict


def attack_face(problem: FaceProblem, models: Layer2Models, cfg: Layer2Config, scale: float, rng,
                eot: EOTConfig | None = None) -> FaceRun:
    """PGD on one face with the bound and step scaled by ``scale``."""
    scaled = dataclasses.replace(cfg, epsilon=cfg.epsilon * scale, step_size=cfg.step_size * scale) if scale != 1.0 else cfg
    patch_delta, steps, value = IdentityAttack(problem, models, scaled, rng, eot).run()
    box = [round(float(v), 1) for v in problem.face_bbox]
    return FaceRun(patch_delta, {"bbox": box, "steps": steps, "final_similarity": value})


def compose_deltas(x1: torch.Tensor, problems: list[FaceProblem], runs: list[FaceRun],
                   epsilon: float | torch.Tensor) -> torch.Tensor:
    """Sum of the faces' patch perturbations, projected to the bound where two faces overlap.

    ``epsilon``: a number, or a per-pixel bound ``(1, 1, H, W)`` over the photo.
    """
    total = torch.zeros_like(x1)
    for problem, run in zip(problems, runs):
        x0, y0, x1_, y1_ = problem.box
        region = total[..., y0:y1_, x0:x1_]
        bound = epsilon[..., y0:y1_, x0:x1_] if torch.is_tensor(epsilon) else epsilon
        total[..., y0:y1_, x0:x1_] = project(region + run.patch_delta, x1[..., y0:y1_, x0:x1_], bound)
    return total


def quantize(base: np.ndarray, delta_255: np.ndarray, bound_255: float) -> np.ndarray:
    """Round ``base + delta`` to uint8 while keeping ``|out − base| ≤ floor(bound)``."""
    limit = np.floor(bound_255 + 1e-6)
    base = base.astype(np.float64)
    out = np.clip(np.round(base + np.clip(delta_255, -limit, limit)), 0, 255)
    return np.clip(out, base - limit, base + limit).astype(np.uint8)


def measure_identity(clean_pixels: np.ndarray, protected_pixels: np.ndarray, clean_face: Face,
                     candidates: list[Face], models: Layer2Models,
                     clean_embeddings: dict[str, torch.Tensor] | None = None) -> dict:
    """ISM_pro per encoder (paper Table 4) on the final pixels: the attack's own measurement (our ports, our alignment).

    The face is re-detected with layer 2's detector; the independent verdicts of each encoder's
    native pipeline are in the face report's ``native`` field (:mod:`dladiff.faces.verdicts`).

    ``candidates``: faces detected on ``protected_pixels``; ``clean_embeddings``: the clean face's
    embeddings when already computed. Returns ``{"redetected": bool, "encoders": {name:
    {"ism_pro": cos, "same_person": bool, ...}}}``.
    """
    protected_face = match_face(clean_face, candidates)
    protected = to_unit(protected_pixels)
    if clean_embeddings is None:
        clean = to_unit(clean_pixels)
        clean_embeddings = {n: embed_face(e, clean, clean_face.landmarks) for n, e in models.encoders.items()}
    result = {}
    for name, encoder in models.encoders.items():
        a = clean_embeddings[name]
        b = embed_face(encoder, protected, protected_face.landmarks)
        entry = {"ism_pro": round(float(F.cosine_similarity(a, b, dim=0)), 4),
                 "same_person": bool(encoder.same_person(a, b)),
                 "threshold": encoder.threshold, "threshold_kind": encoder.threshold_kind}
        if encoder.threshold_kind == "euclidean":
            entry["distance"] = round(float(torch.linalg.vector_norm(a - b)), 4)
        result[name] = entry
    return {"redetected": protected_face is not clean_face, "encoders": result}


def protect_photos(portraits: list[Portrait], inputs: list[np.ndarray], cfg: Config, quiet: bool,
                   models: Layer2Models | None = None, checkpoints: Layer2Checkpoints | None = None,
                   stop: StopRequest | None = None) -> tuple[list[np.ndarray], list[dict]]:
    """Layer 2 on each photo (``inputs`` = layer-1 outputs, or the clean photos for ``--layers 2``).

    Returns the photos and, per photo, ``{"faces": [...]}`` reports; a photo without a face keeps
    its input and its report says so. With ``checkpoints`` each finished photo is stored at once
    and a photo already stored is not redone; when ``stop`` is requested (first Ctrl-C) the
    current photo finishes and :class:`~dladiff.runtime.Interrupted` is raised before the next.
    """
    models = models or prepare_layer2(cfg.layer2)
    outputs, reports = [], []
    bar = progress(len(portraits), "layer 2 (faces)", quiet)
    try:
        for index, (portrait, pixels) in enumerate(zip(portraits, inputs)):
            if stop is not None and stop.requested:
                where = f"; finished photos are kept in {checkpoints.folder}" if checkpoints else ""
                raise Interrupted(f"stopped after layer 2 finished {index}/{len(portraits)} photo(s){where}; "
                                  "rerun the same command with --resume to continue")
            seed = cfg.runtime.seed + index
            key = photo_key(portrait.sha256, pixels, cfg, models.weights, seed) if checkpoints else None
            done = checkpoints.load(key, pixels.shape) if checkpoints else None
            if done is None:
                out, faces = protect_image(pixels, portrait.pixels, models, cfg.layer2, seed, cfg.eot, cfg.budget)
                report = {"encoders": models.weights, "weighting": cfg.layer2.weighting, "faces": faces,
                          "no_face": not faces}
                if checkpoints:
                    checkpoints.save(key, out, report)
            else:
                out, report = done
            if report["no_face"]:
                log.warning("%s: no face found; layer 2 left this photo as it was", portrait.name)
            outputs.append(out)
            reports.append(report)
            bar.set_postfix(faces=len(report["faces"]))
            bar.update(1)
    finally:
        bar.close()
    return outputs, reports
