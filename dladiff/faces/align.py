"""Five-point face alignment: similarity estimation, jitter and differentiable warps.

Conventions (the same as OpenCV and insightface's ``face_align.norm_crop``):

* Coordinates are pixels with pixel centres at integer positions, ``x`` right, ``y`` down.
* An alignment matrix ``M`` is ``(2, 3)`` (or ``(N, 2, 3)``) and maps *image* pixel coordinates
  to *crop* pixel coordinates: ``[x', y'] = M @ [x, y, 1]``, as given to ``cv2.warpAffine``.
* Images are tensors ``(N, C, H, W)``; the warps work in whatever units the tensor has
  (0..255 or [-1, 1]) and are differentiable with respect to the image.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float32,
)
"""Landmarks (left eye, right eye, nose tip, left/right mouth corner) of ArcFace's 112x112 crop."""


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (Umeyama 1991) mapping ``src`` (K, 2) onto ``dst`` (K, 2).

    Returns the ``(2, 3)`` float64 matrix; identical to ``skimage.transform.SimilarityTransform``'s
    estimate, which insightface's ``norm_crop`` uses.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_centred, dst_centred = src - src_mean, dst - dst_mean
    covariance = dst_centred.T @ src_centred / len(src)
    u, singular, vt = np.linalg.svd(covariance)
    signs = np.array([1.0, -1.0 if np.linalg.det(covariance) < 0 else 1.0])
    rank = np.count_nonzero(singular > singular.max() * 2 * np.finfo(float).eps)
    if rank == 0:
        raise ValueError("cannot align: the landmarks coincide (degenerate similarity)")
    if rank == 1:
        reflect = np.linalg.det(u) * np.linalg.det(vt) <= 0
        rotation = u @ np.diag([1.0, -1.0]) @ vt if reflect else u @ vt
    else:
        rotation = u @ np.diag(signs) @ vt
    scale = (singular @ signs) / src_centred.var(axis=0).sum()
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def alignment_matrix(landmarks: np.ndarray, template: np.ndarray) -> np.ndarray:
    """``(2, 3)`` matrix taking a face's 5 image landmarks onto a crop template (both (5, 2) pixels)."""
    return estimate_similarity(landmarks, template)


def _as_homogeneous(matrix: torch.Tensor) -> torch.Tensor:
    """(N, 2, 3) -> (N, 3, 3) by appending the row [0, 0, 1]."""
    bottom = matrix.new_tensor([0.0, 0.0, 1.0]).expand(matrix.shape[0], 1, 3)
    return torch.cat([matrix, bottom], dim=1)


def _batched_matrix(M: torch.Tensor | np.ndarray, batch: int | None, device: torch.device) -> torch.Tensor:
    """Any (2, 3) / (N, 2, 3) matrix as a float64 (batch, 2, 3) tensor on ``device``.

    A single matrix is repeated over the batch; ``batch=None`` keeps the matrices' own count.
    """
    matrix = torch.as_tensor(M, dtype=torch.float64, device=device)
    if matrix.dim() == 2:
        matrix = matrix.unsqueeze(0)
    if matrix.shape[1:] != (2, 3):
        raise ValueError(f"alignment matrix must be (2, 3) or (N, 2, 3), got {tuple(matrix.shape)}")
    batch = matrix.shape[0] if batch is None else batch
    if matrix.shape[0] == 1 and batch > 1:
        matrix = matrix.expand(batch, 2, 3)
    if matrix.shape[0] != batch:
        raise ValueError(f"{matrix.shape[0]} matrices for a batch of {batch} images")
    return matrix


def _pixel_to_normalized(width: int, height: int, like: torch.Tensor) -> torch.Tensor:
    """(3, 3) map from pixel coordinates to ``grid_sample``'s align_corners=False coordinates."""
    return like.new_tensor(
        [[2.0 / width, 0.0, 1.0 / width - 1.0], [0.0, 2.0 / height, 1.0 / height - 1.0], [0.0, 0.0, 1.0]]
    )


def _sampling_theta(
    out_to_in_pixels: torch.Tensor, out_size: tuple[int, int], in_size: tuple[int, int]
) -> torch.Tensor:
    """``affine_grid`` theta (N, 2, 3) from a pixel map (N, 2, 3) output pixel -> input pixel.

    ``out_size`` and ``in_size`` are (H, W).
    """
    to_norm_in = _pixel_to_normalized(in_size[1], in_size[0], out_to_in_pixels)
    from_norm_out = torch.linalg.inv(_pixel_to_normalized(out_size[1], out_size[0], out_to_in_pixels))
    return (to_norm_in @ _as_homogeneous(out_to_in_pixels) @ from_norm_out)[:, :2, :]


def _resample(
    source: torch.Tensor,
    out_to_in_pixels: torch.Tensor,
    out_size: tuple[int, int],
    padding_mode: str,
) -> torch.Tensor:
    """Bilinear sample of ``source`` (N, C, h, w) at ``out_to_in_pixels`` of each output pixel.

    Sampling runs in float32 (float64 sources stay float64); the result has ``source``'s dtype.
    """
    work_dtype = torch.float64 if source.dtype == torch.float64 else torch.float32
    theta = _sampling_theta(out_to_in_pixels, out_size, tuple(source.shape[-2:])).to(work_dtype)
    n, c = source.shape[:2]
    grid = F.affine_grid(theta, [n, c, *out_size], align_corners=False)
    out = F.grid_sample(source.to(work_dtype), grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)
    return out.to(source.dtype)


def warp_to_crop(
    image: torch.Tensor, M: torch.Tensor | np.ndarray, size: int, fill: float = -1.0
) -> torch.Tensor:
    """Aligned crops (N, C, size, size) of ``image`` (N, C, H, W); differentiable in ``image``.

    Matches ``cv2.warpAffine(img, M, (size, size), flags=INTER_LINEAR, borderValue=...)``:
    outside the photo the crop takes the value ``fill`` in the tensor's units (-1 is black for
    [-1, 1] tensors; pass 0 for 0..255 tensors to match ``borderValue=0``).
    """
    matrix = _batched_matrix(M, image.shape[0], image.device)
    crop_to_image = torch.linalg.inv(_as_homogeneous(matrix))[:, :2, :]
    shifted = image - fill
    return _resample(shifted, crop_to_image, (size, size), padding_mode="zeros") + fill


def crop_footprint_mask(M: torch.Tensor | np.ndarray, size: int, image_size: tuple[int, int]) -> torch.Tensor:
    """(N, 1, H, W) float32 mask: 1 where an image pixel falls inside the size x size crop.

    A crop pixel ``i`` covers [i - 0.5, i + 0.5], so the crop's footprint is [-0.5, size - 0.5]^2
    in crop coordinates, mapped back into the photo of size ``image_size`` (H, W). ``N`` is the
    number of matrices in ``M`` ((2, 3) gives N = 1); the mask is on ``M``'s device.
    """
    device = M.device if isinstance(M, torch.Tensor) else torch.device("cpu")
    return _footprint(_batched_matrix(M, None, device), size, image_size, torch.float32, device)


def _footprint(
    matrix: torch.Tensor, size: int, image_size: tuple[int, int], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Footprint mask for float64 (N, 2, 3) matrices, in ``dtype`` on ``device``."""
    theta = _sampling_theta(matrix, image_size, (size, size)).float()
    grid = F.affine_grid(theta, [matrix.shape[0], 1, *image_size], align_corners=False)
    inside = (grid.abs() <= 1.0).all(dim=-1)
    return inside.unsqueeze(1).to(device=device, dtype=dtype)


def inverse_warp_to_image(
    crop_delta: torch.Tensor, M: torch.Tensor | np.ndarray, image_size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring a crop-space perturbation (N, C, s, s) back into the photo (H, W) through M⁻¹.

    Returns ``(delta_image (N, C, H, W), mask (N, 1, H, W))``. Each photo pixel inside the crop's
    footprint takes the bilinear (convex) combination of the crop pixels it maps onto, so
    ``‖delta_image‖∞ <= ‖crop_delta‖∞``; outside the footprint (mask 0) the delta is 0.
    Differentiable in ``crop_delta``.
    """
    size = crop_delta.shape[-1]
    matrix = _batched_matrix(M, crop_delta.shape[0], crop_delta.device)
    delta = _resample(crop_delta, matrix, tuple(image_size), padding_mode="border")
    mask = _footprint(matrix, size, tuple(image_size), crop_delta.dtype, crop_delta.device)
    return delta * mask, mask


def _standard_normal(rng: np.random.Generator | torch.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal draws (float64 numpy) from a numpy or a torch generator."""
    if isinstance(rng, torch.Generator):
        return torch.randn(shape, generator=rng, dtype=torch.float64, device=rng.device).cpu().numpy()
    return rng.standard_normal(shape)


def random_similarity(
    rng: np.random.Generator | torch.Generator,
    count: int,
    translation_px: float,
    rotation_deg: float,
    scale: float,
    centre: tuple[float, float],
) -> np.ndarray:
    """``count`` random similarities (count, 3, 3) about ``centre`` (crop pixels).

    Each is ``x -> (1 + s) R(θ) (x - c) + c + t`` with ``t ~ N(0, translation_px²)`` per axis
    (pixels), ``θ ~ N(0, rotation_deg²)`` (degrees) and ``s ~ N(0, scale²)`` (relative).
    """
    noise = _standard_normal(rng, (count, 4))
    shift = noise[:, :2] * translation_px
    angle = np.deg2rad(noise[:, 2] * rotation_deg)
    zoom = 1.0 + noise[:, 3] * scale
    cos, sin = zoom * np.cos(angle), zoom * np.sin(angle)
    linear = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], axis=1)
    c = np.asarray(centre, dtype=np.float64)
    out = np.tile(np.eye(3), (count, 1, 1))
    out[:, :2, :2] = linear
    out[:, :2, 2] = c + shift - linear @ c
    return out


def jitter_matrix(
    M: np.ndarray | torch.Tensor,
    rng: np.random.Generator | torch.Generator,
    translation_px: float,
    rotation_deg: float,
    scale: float,
    crop_size: int = 112,
) -> np.ndarray | torch.Tensor:
    """``M`` (2, 3) or (N, 2, 3) followed by a small random similarity about the crop centre.

    Amplitudes are standard deviations: translation in crop pixels, rotation in degrees,
    scale relative (0.01 = 1 %). All zero returns ``M`` exactly. The result has ``M``'s type,
    shape, dtype and device; each matrix of a batch gets its own draw.
    """
    if translation_px == 0 and rotation_deg == 0 and scale == 0:
        return M
    batched = M.ndim == 3
    count = M.shape[0] if batched else 1
    centre = ((crop_size - 1) / 2.0, (crop_size - 1) / 2.0)
    jitter = random_similarity(rng, count, translation_px, rotation_deg, scale, centre)
    if isinstance(M, torch.Tensor):
        homogeneous = _as_homogeneous(M.reshape(count, 2, 3))
        out = (torch.as_tensor(jitter, dtype=M.dtype, device=M.device) @ homogeneous)[:, :2]
    else:
        matrices = np.asarray(M, dtype=np.float64).reshape(count, 2, 3)
        homogeneous = np.concatenate([matrices, np.tile([[[0.0, 0.0, 1.0]]], (count, 1, 1))], axis=1)
        out = (jitter @ homogeneous)[:, :2].astype(np.asarray(M).dtype, copy=False)
    return out if batched else out[0]


def transform_points(M: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a (2, 3) matrix to points (K, 2); returns (K, 2) float64."""
    points = np.asarray(points, dtype=np.float64)
    return points @ np.asarray(M, dtype=np.float64)[:, :2].T + np.asarray(M, dtype=np.float64)[:, 2]


def matrix_scale(M: np.ndarray) -> float:
    """Isotropic scale of a similarity (2, 3): crop pixels per image pixel."""
    return float(math.sqrt(abs(np.linalg.det(np.asarray(M, dtype=np.float64)[:, :2]))))
