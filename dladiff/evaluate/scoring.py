"""The paper's metrics on one identity's generated images and protected photos (Tables 1-4, 9, 10).

Per attack and prompt: FDR (share of images with a detected face), ISM (mean cosine between each
generated face and the centroid of the clean references' embeddings, over images with a face), the
identity's FID (clean photos vs generated), BRISQUE, FIQA and the NSFW rate. For the zero-shot attacks,
ISM_pro (clean vs protected photo) and ISM_gen (generated vs clean references) are also computed with
the attack's own encoder (Table 4). For the photos themselves: PSNR and SSIM against the clean
originals (Table 9) and ISM_pro with the metrics encoder. Models that are absent leave their column
empty and their reason in :attr:`Scorers.unavailable`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from dladiff.data import Portrait, load_portrait
from dladiff.errors import ModelUnavailableError
from dladiff.evaluate import metrics
from dladiff.evaluate.config import EvaluateConfig, ZERO_SHOT_ATTACKS
from dladiff.evaluate.embedding import FaceEmbedder, load_face_embedder
from dladiff.layout import image_files

log = logging.getLogger("dladiff")

DISABLED = "disabled in the config"
ROW_METRICS = ("images", "faces", "fdr", "ism", "fid", "brisque", "fiqa", "nsfw_rate", "ism_pro", "ism_gen", "psnr", "ssim")


@dataclass
class Scorers:
    """The models behind the metrics; None where absent (the reason is in ``unavailable``)."""

    embedder: FaceEmbedder
    fid: metrics.FeatureExtractor | None = None
    nsfw: metrics.NsfwChecker | None = None
    fiqa: Callable | None = None
    brisque: bool = True
    zero_shot: dict[str, FaceEmbedder] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)

    def availability(self) -> dict:
        """What is computed, for the metrics cache key."""
        return {"embedder": self.embedder.name, "fid": self.fid is not None, "nsfw": self.nsfw is not None,
                "fiqa": self.fiqa is not None, "brisque": self.brisque, "zero_shot": sorted(self.zero_shot)}


def optional_model(name: str, enabled: bool, load: Callable, unavailable: dict):
    """``load()``, or None with the reason recorded when disabled or its files are absent."""
    if not enabled:
        unavailable[name] = DISABLED
        return None
    try:
        return load()
    except ModelUnavailableError as exc:
        log.warning("%s not computed: %s", name, exc)
        unavailable[name] = str(exc)
        return None


def safety_checker_path(cfg: EvaluateConfig) -> Path:
    """``metrics.safety_checker`` (folder or cached hub id), else the attacked model's own folder.

    For a hub model, its ``safety_checker/`` and ``feature_extractor/`` are fetched (once) when the cache lacks them.
    """
    from dladiff.diffusion.loading import SAFETY_CHECKER_FILES, SAFETY_CHECKER_PATTERNS, resolve_model_folder

    if cfg.metrics.safety_checker:
        path = Path(cfg.metrics.safety_checker).expanduser()
        if path.exists():
            return path
        from dladiff.evaluate.weights import local_model_folder

        return local_model_folder(cfg.metrics.safety_checker, "SD safety checker")
    return resolve_model_folder(cfg.model.id, cfg.model.revision, SAFETY_CHECKER_PATTERNS, SAFETY_CHECKER_FILES)


def load_nsfw_checker(cfg: EvaluateConfig, device: str = "cpu") -> metrics.NsfwChecker:
    """The ``metrics.nsfw_detector``: the SD safety checker (default) or open_nsfw."""
    if cfg.metrics.nsfw_detector == "opennsfw":
        return metrics.OpenNsfwChecker(cfg.metrics.opennsfw_threshold)
    return metrics.load_sd_safety_checker(safety_checker_path(cfg), device)


def load_scorers(cfg: EvaluateConfig, device: str = "cpu") -> Scorers:
    """Detector + encoder (required: a missing one raises) and the optional models of the config."""
    m = cfg.metrics
    scorers = Scorers(load_face_embedder(m.detector, m.encoder, m.model_root, m.det_size), brisque=m.brisque)
    if not m.brisque:
        scorers.unavailable["brisque"] = DISABLED
    scorers.fid = optional_model("fid", m.fid, lambda: metrics.InceptionFeatureExtractor(m.fid_weights or None, device), scorers.unavailable)
    scorers.nsfw = optional_model("nsfw_rate", m.nsfw, lambda: load_nsfw_checker(cfg, device), scorers.unavailable)
    from dladiff.evaluate.fiqa import FiqaScorer

    scorers.fiqa = optional_model("fiqa", m.fiqa, lambda: FiqaScorer(m.fiqa_weights, device), scorers.unavailable)
    for attack in ZERO_SHOT_ATTACKS:
        if attack in cfg.attacks:
            section = getattr(cfg, attack)
            embedder = optional_model(f"ism_{attack}", True, lambda s=section: load_face_embedder(s.detector, s.encoder, m.model_root, m.det_size), scorers.unavailable)
            if embedder is not None:
                scorers.zero_shot[attack] = embedder
    return scorers


def load_images(folder: Path) -> list[Portrait]:
    """The photos of a folder (image files only; reports and sub-folders are ignored)."""
    return [load_portrait(p) for p in image_files(folder)]


def nan_mean(values) -> float:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(values)) if values else math.nan


def clean_pairs(photos: list[Portrait], clean: list[Portrait]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(clean, attacked) pixel pairs matched by file stem (``x.jpg`` <-> ``x.png``), same size only.

    Photos left unpaired (no clean original of that stem, a clean original with no attacked photo,
    or different sizes) are named in a warning: the paired metrics score the pairs only.
    """
    by_stem = {p.path.stem: p for p in clean}
    pairs, unpaired = [], []
    for photo in photos:
        original = by_stem.get(photo.path.stem)
        if original is None:
            unpaired.append(f"{photo.path} (no clean original named {photo.path.stem}.*)")
        elif original.pixels.shape != photo.pixels.shape:
            unpaired.append(f"{photo.path} ({photo.pixels.shape[1]}x{photo.pixels.shape[0]}, its original "
                            f"{original.path} is {original.pixels.shape[1]}x{original.pixels.shape[0]})")
        else:
            pairs.append((original.pixels, photo.pixels))
    attacked = {p.path.stem for p in photos}
    unpaired += [f"{p.path} (clean original without an attacked photo)" for p in clean if p.path.stem not in attacked]
    if unpaired:
        log.warning("PSNR/SSIM/ISM_pro score %d pair(s) only; unpaired: %s", len(pairs), "; ".join(unpaired))
    return pairs


def embeddings_of(images, embedder: FaceEmbedder) -> list[np.ndarray | None]:
    return [embedder.embed(image) for image in images]


def ism_pro_of(pairs, embedder: FaceEmbedder) -> float:
    """Mean ISM_pro (Table 4) over the pairs where both faces are found."""
    scores = []
    for clean, attacked in pairs:
        a, b = embedder.embed(clean), embedder.embed(attacked)
        if a is not None and b is not None:
            scores.append(metrics.ism_pro(a, b))
    return nan_mean(scores)


def reference_matrix(images, embedder: FaceEmbedder) -> np.ndarray | None:
    found = [e for e in embeddings_of(images, embedder) if e is not None]
    return np.stack(found) if found else None


def ism_against(generated: list[np.ndarray | None], references: np.ndarray | None) -> float:
    """ISM of generated embeddings against reference embeddings; NaN without references or faces."""
    if references is None:
        return math.nan
    return metrics.identity_score_matching(generated, references)


def photo_row(photos: list[Portrait], clean: list[Portrait], scorers: Scorers, pairs=None) -> dict:
    """PSNR/SSIM (Table 9) and ISM_pro of the attacked photos against their clean originals (``pairs`` if given)."""
    pairs = clean_pairs(photos, clean) if pairs is None else pairs
    return {
        "attack": "photos", "prompt": "", "images": len(photos),
        "psnr": nan_mean([metrics.psnr(c, a) for c, a in pairs]),
        "ssim": nan_mean([metrics.ssim(c, a) for c, a in pairs]),
        "ism_pro": ism_pro_of(pairs, scorers.embedder),
    }


def generated_row(images: list[np.ndarray], references: np.ndarray | None, clean_features: np.ndarray | None,
                  scorers: Scorers, features_path: Path) -> dict:
    """FDR, ISM, per-identity FID, BRISQUE, FIQA and NSFW rate of one attack and prompt's images."""
    embeddings = embeddings_of(images, scorers.embedder)
    faces = sum(e is not None for e in embeddings)
    row = {"images": len(images), "faces": faces, "fdr": metrics.detection_rate(faces, len(images)),
           "ism": ism_against(embeddings, references)}
    if scorers.fid is not None and images:
        features = scorers.fid(images)
        np.save(features_path, features)
        enough = clean_features is not None and len(clean_features) >= 2 and len(features) >= 2
        row["fid"] = metrics.fid(clean_features, features) if enough else math.nan
    if scorers.brisque and images:
        row["brisque"] = nan_mean([metrics.brisque_score(im) for im in images])
    if scorers.fiqa is not None and images:
        row["fiqa"] = nan_mean(scorers.fiqa(images))
    if scorers.nsfw is not None and images:
        row["nsfw_rate"] = metrics.nsfw_rate(images, scorers.nsfw)
    return row


def zero_shot_scores(attack: str, images: list[np.ndarray], pairs, reference_images, scorers: Scorers) -> dict:
    """ISM_pro and ISM_gen with the encoder the zero-shot pipeline itself reads (Table 4)."""
    embedder = scorers.zero_shot.get(attack)
    if embedder is None:
        return {}
    references = reference_matrix(reference_images, embedder)
    return {"ism_pro": ism_pro_of(pairs, embedder), "ism_gen": ism_against(embeddings_of(images, embedder), references)}
