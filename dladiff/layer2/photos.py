"""Layer 2 on whole photos: every face attacked, composed back, rounded, checked by the detectors, reported."""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from dladiff.budget import layer2_bound
from dladiff.config import BudgetConfig, Config, EOTConfig, Layer2Config
from dladiff.data import Portrait, to_tensor
from dladiff.faces.detect import Face
from dladiff.faces.encoders import embed_face
from dladiff.faces.verdicts import judge_all, native_verdicts, undetected
from dladiff.layer2.attack import FaceRun, attack_face
from dladiff.layer2.models import Layer2Models, prepare_layer2
from dladiff.layer2.problem import FaceProblem, build_problem, match_face
from dladiff.layer2_resume import Layer2Checkpoints, photo_key
from dladiff.pgd import project
from dladiff.runtime import Interrupted, StopRequest, progress

log = logging.getLogger("dladiff")


def from_unit(x: torch.Tensor) -> np.ndarray:
    """``(1, 3, H, W)`` in [-1, 1] → ``(H, W, 3) float64`` in 0..255 (not rounded)."""
    return ((x[0].permute(1, 2, 0).double() + 1.0) * 127.5).numpy()


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


def quantize(base: np.ndarray, delta_255: np.ndarray, bound_255: float | np.ndarray) -> np.ndarray:
    """Round ``base + delta`` to uint8 while keeping ``|out − base| ≤ floor(bound)``."""
    limit = np.floor(bound_255 + 1e-6)
    base = base.astype(np.float64)
    out = np.clip(np.round(base + np.clip(delta_255, -limit, limit)), 0, 255)
    return np.clip(out, base - limit, base + limit).astype(np.uint8)


def face_problems(x1_pixels: np.ndarray, clean_pixels: np.ndarray, clean_faces: list[Face], protected_faces: list[Face],
                  models: Layer2Models, cfg: Layer2Config, budget: BudgetConfig | None):
    """One :class:`FaceProblem` per clean face, each with its share of the bound map; (problems, bound, regions)."""
    x1, clean = to_tensor(x1_pixels), to_tensor(clean_pixels)
    source_faces = {source.name: source.faces(x1_pixels) for source in models.sources}
    problems = [build_problem(face, match_face(face, protected_faces), x1, clean, models.encoders, cfg, source_faces)
                for face in clean_faces]
    bound, regions = layer2_bound(clean_pixels, clean_faces, cfg.epsilon, budget)
    for problem in problems:
        x0, y0, x1_, y1_ = problem.box
        problem.weight = None if bound is None else torch.from_numpy(bound[y0:y1_, x0:x1_] / cfg.epsilon)[None, None]
    return problems, bound, regions


def lost_faces(out: np.ndarray, clean_faces: list[Face], clean_seen: dict, models: Layer2Models
               ) -> tuple[list[int], dict, list[Face]]:
    """(indices of the faces that layer 2's detector or a native pipeline no longer finds in ``out``, the judges' faces, the detector's)."""
    boxes = [face.bbox for face in clean_faces]
    with models.phase("detection"):
        found = models.detector.detect(out)
    with models.phase("verdicts"):
        seen = judge_all(models.judges, out)
    lost = sorted({i for i, face in enumerate(clean_faces) if match_face(face, found) is face}
                  | undetected(clean_seen, seen, boxes))
    return lost, seen, found


def render(x1_pixels: np.ndarray, problems: list[FaceProblem], runs: list[FaceRun], cfg: Layer2Config,
           bound: np.ndarray | None) -> np.ndarray:
    """The uint8 photo: every face's δ2 composed (projected where faces overlap) and rounded within the bound."""
    x1 = to_tensor(x1_pixels)
    epsilon = cfg.epsilon if bound is None else torch.from_numpy(bound)[None, None]
    bound_255 = cfg.epsilon * 127.5 if bound is None else bound[..., None] * 127.5
    delta = compose_deltas(x1, problems, runs, epsilon)
    return quantize(x1_pixels, from_unit(x1 + delta) - x1_pixels.astype(np.float64), bound_255)


def attack_until_detected(x1_pixels: np.ndarray, clean_pixels: np.ndarray, clean_faces: list[Face],
                          problems: list[FaceProblem], bound: np.ndarray | None, models: Layer2Models, cfg: Layer2Config,
                          rng: np.random.Generator, eot: EOTConfig | None):
    """PGD on every face, then again with the bound × ``detect_backoff`` on each face a detector lost (at most
    ``detect_retries`` times). Returns (photo, runs, bound scales, judges' faces on the clean photo and on the
    photo, layer 2's detector's faces on the photo)."""
    with models.phase("pgd"):
        runs = [attack_face(problem, models, cfg, 1.0, rng, eot) for problem in problems]
    with models.phase("verdicts"):
        clean_seen = judge_all(models.judges, clean_pixels)
    scales = [1.0] * len(problems)
    for attempt in range(cfg.detect_retries + 1):
        with models.phase("inverse_warp"):
            out = render(x1_pixels, problems, runs, cfg, bound)
        lost, seen, found = lost_faces(out, clean_faces, clean_seen, models)
        if not lost or attempt == cfg.detect_retries:
            break
        with models.phase("retries"):
            for i in lost:
                scales[i] *= cfg.detect_backoff
                runs[i] = attack_face(problems[i], models, cfg, scales[i], rng, eot)
    if lost:
        log.warning("%d face(s) no longer detected after %d retries", len(lost), cfg.detect_retries)
    return out, runs, scales, clean_seen, seen, found


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
    with models.phase("detection"):
        clean_faces = models.detector.detect(clean_pixels)
        same_photo = x1_pixels is clean_pixels or np.array_equal(x1_pixels, clean_pixels)  # --layers 2: x1 = x
        protected_faces = [] if not clean_faces else clean_faces if same_photo else models.detector.detect(x1_pixels)
    if not clean_faces:
        return x1_pixels.copy(), []
    rng = np.random.default_rng(seed)
    with models.phase("alignment"):
        problems, bound, regions = face_problems(x1_pixels, clean_pixels, clean_faces, protected_faces, models, cfg, budget)
    out, runs, scales, clean_seen, seen, found = attack_until_detected(x1_pixels, clean_pixels, clean_faces, problems,
                                                                       bound, models, cfg, rng, eot)
    with models.phase("verdicts"):
        native = native_verdicts(clean_pixels, out, models.judges, [face.bbox for face in clean_faces],
                                 seen={name: (clean_seen[name], seen[name]) for name in models.judges})
        own = [measure_identity(clean_pixels, out, face, found, models, problem.clean_embeddings)
               for face, problem in zip(clean_faces, problems)]
    return out, [dict(run.report, bound_scale=scale, native=verdict, **measured,
                      **({"region": np.round(region, 1).tolist()} if region is not None else {}))
                 for run, scale, verdict, measured, region in zip(runs, scales, native, own, regions)]


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
    protected = to_tensor(protected_pixels)
    if clean_embeddings is None:
        clean = to_tensor(clean_pixels)
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


def protect_photo(index: int, portrait: Portrait, pixels: np.ndarray, cfg: Config, models: Layer2Models,
                  checkpoints: Layer2Checkpoints | None) -> tuple[np.ndarray, dict]:
    """Layer 2 on photo number ``index`` (seed = runtime seed + index), or its stored result when checkpointed."""
    seed = cfg.runtime.seed + index
    key = photo_key(portrait.sha256, pixels, cfg, models.weights, seed) if checkpoints else None
    done = checkpoints.load(key, pixels.shape) if checkpoints else None
    if done is not None:
        return done
    out, faces = protect_image(pixels, portrait.pixels, models, cfg.layer2, seed, cfg.eot, cfg.budget)
    report = {"encoders": models.weights, "weighting": cfg.layer2.weighting, "faces": faces, "no_face": not faces}
    if checkpoints:
        checkpoints.save(key, out, report)
    return out, report


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
            out, report = protect_photo(index, portrait, pixels, cfg, models, checkpoints)
            if report["no_face"]:
                log.warning("%s: no face found; layer 2 left this photo as it was", portrait.name)
            outputs.append(out)
            reports.append(report)
            bar.set_postfix(faces=len(report["faces"]))
            bar.update(1)
    finally:
        bar.close()
    return outputs, reports
