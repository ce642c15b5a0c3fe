"""Alignment: similarity estimate, warps against insightface/OpenCV, inverse warp, jitter."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import insightface_images_dir
import torch

from dladiff.faces.align import (
    ARCFACE_TEMPLATE_112,
    crop_footprint_mask,
    estimate_similarity,
    inverse_warp_to_image,
    jitter_matrix,
    transform_points,
    warp_to_crop,
)

IMAGES = insightface_images_dir()


def load_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path))
    assert bgr is not None, f"cannot read {path}"
    return np.ascontiguousarray(bgr[:, :, ::-1])


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) -> (1, 3, H, W) float32, 0..255."""
    return torch.from_numpy(image).permute(2, 0, 1)[None].float()


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor[0].permute(1, 2, 0).detach().numpy()


def skimage_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    from skimage.transform import SimilarityTransform

    if hasattr(SimilarityTransform, "from_estimate"):
        return SimilarityTransform.from_estimate(src, dst).params[:2]
    tform = SimilarityTransform()
    tform.estimate(src, dst)
    return tform.params[:2]


@pytest.fixture(scope="module")
def t1() -> np.ndarray:
    return load_rgb(IMAGES / "t1.jpg")


@pytest.fixture(scope="module")
def t1_landmarks(t1) -> list[np.ndarray]:
    from dladiff.faces.detect import DlibDetector

    faces = DlibDetector(upsample=1).detect(t1)
    assert len(faces) == 6
    return [face.landmarks for face in faces]


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.astronaut())


ASTRONAUT_LANDMARKS = np.array(
    [[203.17, 101.5], [246.5, 104.17], [225.0, 127.0], [201.0, 139.0], [246.0, 141.0]]
)


def test_similarity_equals_skimage(t1_landmarks):
    rng = np.random.default_rng(0)
    cases = [(lm.astype(np.float64), ARCFACE_TEMPLATE_112.astype(np.float64)) for lm in t1_landmarks]
    cases += [(rng.normal(size=(5, 2)) * 50, rng.normal(size=(5, 2)) * 30) for _ in range(20)]
    worst = max(np.abs(estimate_similarity(src, dst) - skimage_similarity(src, dst)).max() for src, dst in cases)
    assert worst < 1e-6


def test_similarity_recovers_an_exact_similarity():
    angle, scale, shift = np.deg2rad(17.0), 0.8, np.array([12.0, -5.0])
    true = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) * scale
    src = np.random.default_rng(1).uniform(0, 200, size=(5, 2))
    dst = src @ true.T + shift
    np.testing.assert_allclose(estimate_similarity(src, dst), np.hstack([true, shift[:, None]]), atol=1e-10)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_warp_matches_insightface_norm_crop(t1, t1_landmarks):
    from insightface.utils.face_align import norm_crop

    image = to_tensor(t1)
    for landmarks in t1_landmarks:
        reference = norm_crop(t1, landmarks, image_size=112).astype(np.float32)
        M = estimate_similarity(landmarks, ARCFACE_TEMPLATE_112)
        ours = to_numpy(warp_to_crop(image, M, 112, fill=0.0))
        diff = np.abs(ours - reference)
        assert diff.mean() < 0.5, diff.mean()
        assert diff.max() <= 1.0, diff.max()


def test_warp_matches_cv2_across_the_image_border(astronaut):
    """A crop that reaches outside the photo: the border blends into ``fill`` like cv2's."""
    M = estimate_similarity(ASTRONAUT_LANDMARKS - [180.0, 80.0], ARCFACE_TEMPLATE_112)
    shifted = np.ascontiguousarray(astronaut[80:, 180:])
    reference = cv2.warpAffine(shifted, M, (112, 112), flags=cv2.INTER_LINEAR, borderValue=0)
    ours = to_numpy(warp_to_crop(to_tensor(shifted), M, 112, fill=0.0))
    assert (reference == 0).all(axis=2).mean() > 0.05
    diff = np.abs(ours - reference)
    assert diff.mean() < 0.5 and diff.max() <= 1.0


def test_warp_fill_is_black_for_unit_range_tensors(astronaut):
    image = to_tensor(astronaut) / 127.5 - 1.0
    far_away = np.array([[1.0, 0.0, 2000.0], [0.0, 1.0, 2000.0]])
    crop = warp_to_crop(image, far_away, 32)
    assert torch.allclose(crop, torch.full_like(crop, -1.0))


def test_warp_batched_equals_single(t1, t1_landmarks):
    image = to_tensor(t1).expand(3, -1, -1, -1)
    matrices = np.stack([estimate_similarity(lm, ARCFACE_TEMPLATE_112) for lm in t1_landmarks[:3]])
    batched = warp_to_crop(image, torch.from_numpy(matrices), 112)
    for i in range(3):
        single = warp_to_crop(image[:1], matrices[i], 112)
        assert torch.allclose(batched[i : i + 1], single, atol=1e-4)


def test_warp_is_differentiable_in_the_image(t1, t1_landmarks):
    image = (to_tensor(t1) / 127.5 - 1.0).requires_grad_(True)
    M = estimate_similarity(t1_landmarks[0], ARCFACE_TEMPLATE_112)
    warp_to_crop(image, M, 112).square().sum().backward()
    grad = image.grad[0].abs().sum(0)
    x1, y1 = t1_landmarks[0].min(0).astype(int)
    x2, y2 = t1_landmarks[0].max(0).astype(int)
    assert grad[y1 : y2 + 1, x1 : x2 + 1].min() > 0
    assert grad[:50, :50].sum() == 0


def eroded(mask: torch.Tensor, pixels: int) -> np.ndarray:
    """Interior of a (1, 1, H, W) mask, ``pixels`` away from its edge, as a bool (H, W) array."""
    kernel = 2 * pixels + 1
    outside = torch.nn.functional.max_pool2d(1 - mask, kernel, stride=1, padding=pixels)
    return (outside[0, 0] == 0).numpy()


def test_round_trip_integer_shift_is_exact(astronaut):
    image = to_tensor(astronaut)
    M = np.array([[1.0, 0.0, -150.0], [0.0, 1.0, -50.0]])
    back, mask = inverse_warp_to_image(warp_to_crop(image, M, 112, fill=0.0), M, astronaut.shape[:2])
    assert mask.sum() == 112 * 112
    assert torch.allclose(back, image * mask, atol=1e-2)
    assert mask[0, 0, 50:162, 150:262].all()


def test_round_trip_returns_the_face_pixels(astronaut):
    """Warp -> inverse warp reproduces the photo inside the face region, up to bilinear blur."""
    smooth = cv2.GaussianBlur(astronaut, (0, 0), 2.0).astype(np.float32)
    M = estimate_similarity(ASTRONAUT_LANDMARKS, ARCFACE_TEMPLATE_112)
    back, mask = inverse_warp_to_image(warp_to_crop(to_tensor(smooth), M, 112, fill=0.0), M, smooth.shape[:2])
    inside = eroded(mask, 3)
    assert inside.sum() > 0.7 * mask.sum().item()
    error = np.abs(to_numpy(back) - smooth)[inside]
    assert error.mean() < 0.6 and error.max() < 6.0, (error.mean(), error.max())

    sharp = astronaut.astype(np.float32)
    back, _ = inverse_warp_to_image(warp_to_crop(to_tensor(sharp), M, 112, fill=0.0), M, sharp.shape[:2])
    cv2_crop = cv2.warpAffine(sharp, M, (112, 112), flags=cv2.INTER_LINEAR)
    cv2_back = cv2.warpAffine(cv2_crop, cv2.invertAffineTransform(M), sharp.shape[1::-1], flags=cv2.INTER_LINEAR)
    assert np.abs(to_numpy(back) - cv2_back)[inside].mean() < 0.01


def test_inverse_warp_keeps_the_linf_bound(t1, t1_landmarks):
    epsilon = 0.03
    generator = torch.Generator().manual_seed(0)
    matrices = np.stack([estimate_similarity(lm, ARCFACE_TEMPLATE_112) for lm in t1_landmarks])
    delta = (torch.rand((6, 3, 112, 112), generator=generator) * 2 - 1) * epsilon
    delta_image, mask = inverse_warp_to_image(delta, torch.from_numpy(matrices), t1.shape[:2])
    assert delta_image.shape == (6, 3, *t1.shape[:2]) and mask.shape == (6, 1, *t1.shape[:2])
    assert delta_image.abs().max() <= epsilon + 1e-7
    assert (delta_image * (1 - mask)).abs().max() == 0
    for i, M in enumerate(matrices):
        scale = np.sqrt(abs(np.linalg.det(M[:, :2])))
        assert mask[i].sum().item() == pytest.approx((112 / scale) ** 2, rel=0.02)


def test_inverse_warp_is_differentiable():
    M = np.array([[0.9, 0.1, -20.0], [-0.1, 0.9, -10.0]])
    delta = torch.zeros((1, 3, 112, 112), requires_grad=True)
    delta_image, _ = inverse_warp_to_image(delta, M, (200, 200))
    delta_image.sum().backward()
    assert delta.grad.abs().sum() > 0


def test_crop_footprint_mask_matches_inverse_warp_mask(t1, t1_landmarks):
    matrices = torch.from_numpy(np.stack([estimate_similarity(lm, ARCFACE_TEMPLATE_112) for lm in t1_landmarks]))
    _, mask = inverse_warp_to_image(torch.zeros((6, 3, 112, 112)), matrices, t1.shape[:2])
    assert torch.equal(crop_footprint_mask(matrices, 112, t1.shape[:2]), mask)
    assert crop_footprint_mask(matrices[0].numpy(), 112, t1.shape[:2]).shape == (1, 1, *t1.shape[:2])


def test_jitter_with_zero_amplitude_is_identity():
    M = np.array([[0.9, 0.1, -20.0], [-0.1, 0.9, -10.0]])
    assert np.array_equal(jitter_matrix(M, np.random.default_rng(0), 0.0, 0.0, 0.0), M)
    tensor = torch.from_numpy(M)
    assert torch.equal(jitter_matrix(tensor, torch.Generator().manual_seed(0), 0.0, 0.0, 0.0), tensor)


def jitter_displacements(M: np.ndarray, **amplitudes) -> tuple[np.ndarray, np.ndarray]:
    """Crop-space images of the crop centre and of a point 40 px right of it, over 4000 draws."""
    batch = np.repeat(M[None], 4000, axis=0)
    jittered = jitter_matrix(batch, np.random.default_rng(0), crop_size=112, **amplitudes)
    image_points = transform_points(np.linalg.inv(np.vstack([M, [0, 0, 1]]))[:2], [[55.5, 55.5], [95.5, 55.5]])
    centre = np.einsum("nij,j->ni", jittered[:, :, :2], image_points[0]) + jittered[:, :, 2]
    side = np.einsum("nij,j->ni", jittered[:, :, :2], image_points[1]) + jittered[:, :, 2]
    return centre, side


def test_jitter_moves_points_by_the_requested_amounts():
    M = np.array([[0.9, 0.1, -20.0], [-0.1, 0.9, -10.0]])
    centre, _ = jitter_displacements(M, translation_px=2.0, rotation_deg=0.0, scale=0.0)
    assert np.std(centre - 55.5, axis=0) == pytest.approx([2.0, 2.0], rel=0.08)

    centre, side = jitter_displacements(M, translation_px=0.0, rotation_deg=3.0, scale=0.0)
    np.testing.assert_allclose(centre, 55.5, atol=1e-9)
    angles = np.rad2deg(np.arctan2(side[:, 1] - centre[:, 1], side[:, 0] - centre[:, 0]))
    assert np.std(angles) == pytest.approx(3.0, rel=0.08)
    np.testing.assert_allclose(np.linalg.norm(side - centre, axis=1), 40.0, rtol=1e-9)

    centre, side = jitter_displacements(M, translation_px=0.0, rotation_deg=0.0, scale=0.05)
    assert np.std(np.linalg.norm(side - centre, axis=1) / 40.0) == pytest.approx(0.05, rel=0.08)


def test_jitter_with_torch_generator_keeps_type_and_is_reproducible():
    M = torch.tensor([[[0.9, 0.1, -20.0], [-0.1, 0.9, -10.0]]] * 4, dtype=torch.float32)
    a = jitter_matrix(M, torch.Generator().manual_seed(3), 1.0, 1.0, 0.01)
    b = jitter_matrix(M, torch.Generator().manual_seed(3), 1.0, 1.0, 0.01)
    assert isinstance(a, torch.Tensor) and a.shape == M.shape and a.dtype == M.dtype
    assert torch.equal(a, b)
    assert not torch.allclose(a[0], a[1])
    assert (a - M).abs().max() < 10.0
