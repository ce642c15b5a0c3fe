"""Where and how much a perturbation may change a photo: the face region and the perceptual budget.

The paper bounds δ uniformly, ``|δ(p)| ≤ η`` at every pixel (Eqs. 9, 11). Here the bound becomes a
map ``b(p) ≤ η`` (``budget`` section of the config):

* **Face region** (layer 2): the convex hull of the face's landmarks, grown by ``margin`` eye gaps
  (the distance between the eye centres), with its inner edge feathered over ``feather`` pixels:
  ``w(p) = min(1, d_in(p) / feather)``, ``d_in`` the Euclidean distance from ``p`` to the nearest
  pixel outside the grown hull. Outside the grown hull ``w = 0`` (no pixel changes); a pixel whose
  4-neighbour lies outside has ``w ≤ 1/feather``, so δ steps by at most ``η/feather`` across the edge
  (2/255 at η = 8/255, ``feather: 4``) and by ``η·√2/feather`` between neighbours inside the ring.
  Landmarks: dlib's 68-point shape predictor fitted in the detector's face box (``hull: dlib68``),
  or the five detector points expanded to a face outline (``hull: five``, :func:`five_point_outline`).
* **Perceptual budget** (texture masking): a change is harder to see where the photo is textured.
  With ``s(p)`` the standard deviation of the luminance (0-255) in a ``window``² box around ``p``,
  ``t(p) = floor + (η − floor) · clip((s − flat_std) / (full_std − flat_std), 0, 1)``: the floor
  where ``s ≤ flat_std`` (a flat sky, a wall, smooth skin), the full η where ``s ≥ full_std``.

Layer 2 scales its face perturbation by ``w·t / η`` (so the bound holds by construction and PGD sees
the scaled perturbation); layer 1 clips δ1, brought back to the photo's grid, to ``t``.
Arrays are numpy; images ``(H, W, 3)`` uint8 RGB; maps ``(H, W)`` float32.
"""

from __future__ import annotations

import cv2
import numpy as np

from dladiff.faces.align import ARCFACE_TEMPLATE_112, alignment_matrix, transform_points

FACE_ELLIPSE_112 = ((56.0, 68.0), (40.0, 46.0))
"""Face outline of :func:`five_point_outline`, in ArcFace's 112² crop: centre (x, y) and semi-axes
(x, y) in pixels. It spans x 16..96 and y 22..114: cheek to cheek at the eyes, brow to chin."""

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def luminance(pixels: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB → ``(H, W)`` float32 luma (ITU-R BT.601), 0..255."""
    return pixels.astype(np.float32) @ LUMA


def local_std(luma: np.ndarray, window: int) -> np.ndarray:
    """``(H, W)`` → ``(H, W)`` standard deviation in the ``window``² box around each pixel (mirrored border)."""
    size = (window, window)
    mean = cv2.blur(luma, size, borderType=cv2.BORDER_REFLECT_101)
    mean_square = cv2.blur(luma * luma, size, borderType=cv2.BORDER_REFLECT_101)
    return np.sqrt(np.maximum(mean_square - mean * mean, 0.0))


def texture_budget(pixels: np.ndarray, epsilon: float, floor: float, flat_std: float, full_std: float,
                   window: int) -> np.ndarray:
    """Per-pixel bound ``t (H, W)`` float32, in ``epsilon``'s units: ``floor`` on flat areas, up to ``epsilon``.

    ``flat_std`` < ``full_std``: luminance standard deviations (0-255) where the ramp starts and ends.
    """
    texture = np.clip((local_std(luminance(pixels), window) - flat_std) / (full_std - flat_std), 0.0, 1.0)
    return (min(floor, epsilon) + (epsilon - min(floor, epsilon)) * texture).astype(np.float32)


def five_point_outline(landmarks: np.ndarray, points: int = 32) -> np.ndarray:
    """``(points, 2)`` face outline from ArcFace-order landmarks ``(5, 2)``: :data:`FACE_ELLIPSE_112` mapped back."""
    (cx, cy), (ax, ay) = FACE_ELLIPSE_112
    angle = np.linspace(0.0, 2.0 * np.pi, points, endpoint=False)
    ellipse = np.stack([cx + ax * np.cos(angle), cy + ay * np.sin(angle)], axis=1)
    M = alignment_matrix(landmarks, ARCFACE_TEMPLATE_112)
    inverse = np.linalg.inv(np.vstack([M, [0.0, 0.0, 1.0]]))[:2]
    return transform_points(inverse, ellipse)


def dlib68_points(image: np.ndarray, bbox: np.ndarray) -> np.ndarray:
    """``(68, 2)`` iBUG landmarks of the face in ``bbox`` (x1, y1, x2, y2) by dlib's shape predictor."""
    import dlib

    from dladiff.faces.detect import default_dlib_predictor_path, load_shape_predictor

    predictor = load_shape_predictor(str(default_dlib_predictor_path()))
    x1, y1, x2, y2 = (int(round(float(v))) for v in bbox)
    shape = predictor(np.ascontiguousarray(image), dlib.rectangle(x1, y1, x2 - 1, y2 - 1))
    return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)


def grown_hull(points: np.ndarray, margin: float, samples: int = 32) -> np.ndarray:
    """``(K, 2)`` convex polygon: the hull of ``points (N, 2)`` grown by ``margin`` pixels (Minkowski sum with a disc)."""
    angle = np.linspace(0.0, 2.0 * np.pi, samples, endpoint=False)
    disc = margin * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    grown = (np.asarray(points, dtype=np.float64)[:, None, :] + disc[None]).reshape(-1, 2)
    return cv2.convexHull(grown.astype(np.float32))[:, 0, :].astype(np.float64)


def feathered_mask(shape: tuple[int, int], polygons: list[np.ndarray], feather: float) -> np.ndarray:
    """``(H, W)`` float32 weight in [0, 1]: 0 outside every polygon, rising to 1 over ``feather`` pixels inside.

    Polygon vertices are in pixel coordinates (pixel centres at integers), rasterized by OpenCV
    with 1/16-pixel precision. Overlapping faces take the larger weight.
    """
    height, width = shape
    weight = np.zeros((height, width), dtype=np.float32)
    for polygon in polygons:
        x0, y0 = np.maximum(np.floor(polygon.min(0)).astype(int) - 1, 0)
        x1, y1 = np.minimum(np.ceil(polygon.max(0)).astype(int) + 2, [width, height])
        if x1 <= x0 or y1 <= y0:
            continue
        inside = np.zeros((y1 - y0, x1 - x0), dtype=np.uint8)
        corners = np.round((polygon - [x0, y0]) * 16).astype(np.int32)
        cv2.fillConvexPoly(inside, corners, 1, lineType=cv2.LINE_8, shift=4)
        padded = np.pad(inside, 1)
        distance = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
        local = np.minimum(distance / max(feather, 1.0), 1.0).astype(np.float32)
        np.maximum(weight[y0:y1, x0:x1], local, out=weight[y0:y1, x0:x1])
    return weight


def edge_step(delta: np.ndarray, region: np.ndarray) -> float:
    """Largest ``|δ(p) − δ(q)|`` over 4-neighbours p, q with exactly one of them in ``region``.

    ``delta``: ``(H, W)`` or ``(H, W, C)``; ``region``: ``(H, W)`` bool. 0 when no pair straddles the edge.
    """
    delta = delta if delta.ndim == 3 else delta[..., None]
    steps = [0.0]
    for axis in (0, 1):
        a = [slice(None)] * 2
        b = [slice(None)] * 2
        a[axis], b[axis] = slice(None, -1), slice(1, None)
        straddle = region[tuple(a)] != region[tuple(b)]
        if straddle.any():
            steps.append(float(np.abs(delta[tuple(a)] - delta[tuple(b)])[straddle].max()))
    return max(steps)


def face_hull_points(image: np.ndarray, bbox: np.ndarray, landmarks: np.ndarray, hull: str) -> np.ndarray:
    """``(N, 2)`` points whose hull is the face: the 5-point outline, with dlib's 68 points for ``hull: dlib68``.

    dlib's 68 points stop at the eyebrows; the 5-point outline reaches the forehead, and keeps the
    region on the face where the 68-point fit in another detector's box goes astray.
    """
    outline = five_point_outline(landmarks)
    return np.concatenate([outline, dlib68_points(image, bbox)]) if hull == "dlib68" else outline


def layer2_bound(clean: np.ndarray, faces: list, epsilon: float, budget) -> tuple[np.ndarray | None, list]:
    """Layer 2's per-pixel bound ``(H, W)`` float32 ([-1,1] units) and each face's grown hull ``(K, 2)``.

    ``clean``: the clean photo ``(H, W, 3)`` uint8 (texture and landmarks are read on it);
    ``faces``: its :class:`~dladiff.faces.detect.Face` list; ``budget``: a
    :class:`~dladiff.config.BudgetConfig`. Returns ``(None, [None, ...])`` for the uniform bound.
    """
    if budget is None or not (budget.face_mask or budget.perceptual_on(2)):
        return None, [None] * len(faces)
    if budget.perceptual_on(2):
        bound = texture_budget(clean, epsilon, budget.floor, budget.flat_std, budget.full_std, budget.window)
    else:
        bound = np.full(clean.shape[:2], epsilon, dtype=np.float32)
    if not budget.face_mask:
        return bound, [None] * len(faces)
    polygons = [grown_hull(face_hull_points(clean, face.bbox, face.landmarks, budget.hull),
                           budget.margin * float(np.linalg.norm(face.landmarks[0] - face.landmarks[1])))
                for face in faces]
    return bound * feathered_mask(clean.shape[:2], polygons, budget.feather), polygons


def texture_budget_rows(pixels: np.ndarray, top: int, bottom: int, epsilon: float, floor: float, budget) -> np.ndarray:
    """:func:`texture_budget` of rows ``top:bottom`` of a photo ``(H, W, 3)``, read with a halo of window/2 rows.

    Equal to ``texture_budget(pixels, ...)[top:bottom]``; memory stays a few strips for a large photo.
    ``budget``: a :class:`~dladiff.config.BudgetConfig` (its std thresholds and window); ``epsilon``,
    ``floor`` and the result in the same units.
    """
    halo = budget.window // 2
    start, stop = max(top - halo, 0), min(bottom + halo, pixels.shape[0])
    rows = texture_budget(pixels[start:stop], epsilon, floor, budget.flat_std, budget.full_std, budget.window)
    return rows[top - start:top - start + bottom - top]
