"""Alignment diversity from real landmark sources: the crops other pipelines would cut from the same face.

The attacker's detector is unknown, and a crop cut from other landmarks is another input: the
same perturbation read through dlib's own 68-point chip can score 0.585 where the attack's own
crop said 0.72. Layer 2 therefore draws, per step, among the alignments that several real
landmark sources give (``layer2.landmark_sources``):

* ``yunet``: OpenCV's YuNet 5 points;
* ``dlib68``: dlib's HOG box + 68-point shape predictor; for the dlib encoder the exact matrix of
  ``dlib.get_face_chip_details`` (dlib's robust fit over 15 mean-face points, 150², padding 0.25),
  for the others the 5 ArcFace points taken from the 68;
* ``dlib5``: dlib's HOG box + the 5-point predictor (``shape_predictor_5_face_landmarks.dat``):
  the chip matrix dlib computes from it, and for the others the ArcFace points that chip implies;
* ``scrfd``: the SCRFD detector of an insightface pack, when one is present (skipped otherwise).

Each source returns, per face, a :class:`SourceFace`: ArcFace-order landmarks (5, 2) in image
pixels and, for the dlib sources, dlib's chip matrix (2, 3) image → 150² chip.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dladiff.faces.align import alignment_matrix, estimate_similarity, transform_points
from dladiff.faces.detect import Face, five_points_from_68, hog_boxes, load_shape_predictor, make_face

SOURCE_NAMES = ("yunet", "dlib68", "dlib5", "scrfd")
DLIB_CHIP = 150
DLIB_PADDING = 0.25


@dataclass(frozen=True)
class SourceFace:
    """A face as one landmark source sees it: ArcFace-order landmarks and, for dlib, its own chip matrix."""

    face: Face
    chip: np.ndarray | None = None  # (2, 3) image → dlib's 150² chip


def chip_matrix(details) -> np.ndarray:
    """(2, 3) image → chip matrix of a ``dlib.chip_details`` (rotated rect → chip corners; checked on real faces)."""
    rect = details.rect
    cx, cy = (rect.left() + rect.right()) / 2, (rect.top() + rect.bottom()) / 2
    half = np.array([(rect.width() - 1) / 2, (rect.height() - 1) / 2])
    c, s = np.cos(details.angle), np.sin(details.angle)
    corners = np.array([[-1, -1], [1, -1], [-1, 1], [1, 1]]) * half @ np.array([[c, -s], [s, c]]).T + [cx, cy]
    size = np.array([details.cols - 1, details.rows - 1], dtype=np.float64)
    return estimate_similarity(corners, np.array([[0, 0], [1, 0], [0, 1], [1, 1]]) * size)


class DlibSource:
    """dlib's HOG detector (one pass per photo shared by both dlib sources, :func:`~dladiff.faces.detect.hog_boxes`)
    and a shape predictor (68- or 5-point) as a landmark source."""

    def __init__(self, points: int):
        from dladiff.faces.dlib_resnet import dlib_chip_template
        from dladiff.faces.model_packs import dlib_model_path

        self.name = f"dlib{points}"
        self.points = points
        self.predictor = load_shape_predictor(str(dlib_model_path(f"shape_predictor_{points}_face_landmarks.dat")))
        self.chip_points = dlib_chip_template(DLIB_CHIP, DLIB_PADDING)

    def faces(self, image: np.ndarray) -> list[SourceFace]:
        """The faces of ``image`` (uint8 RGB), each with its 5 points and dlib's own chip matrix."""
        import dlib

        image = np.ascontiguousarray(image)
        out = []
        for rect in hog_boxes(image, 1):
            shape = self.predictor(image, rect)
            chip = chip_matrix(dlib.get_face_chip_details(shape, DLIB_CHIP, DLIB_PADDING))
            if self.points == 68:
                landmarks = five_points_from_68(np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64))
            else:
                inverse = np.linalg.inv(np.vstack([chip, [0.0, 0.0, 1.0]]))[:2]
                landmarks = transform_points(inverse, self.chip_points)
            box = [rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1]
            out.append(SourceFace(make_face(box, landmarks, 1.0), chip))
        return out


class DetectorSource:
    """Any :class:`~dladiff.faces.detect.FaceDetector` (YuNet, SCRFD) as a landmark source."""

    def __init__(self, name: str, detector):
        self.name, self.detector = name, detector

    def faces(self, image: np.ndarray) -> list[SourceFace]:
        return [SourceFace(face) for face in self.detector.detect(image)]


def make_sources(names: tuple[str, ...], model_root: str | Path, det_size: int, skip: str | None = None) -> list:
    """The landmark sources named (``skip``: the layer's own detector, already the first alignment).

    ``scrfd`` is left out when no insightface pack is present.
    """
    from dladiff.faces.detect import InsightFaceDetector, YuNetDetector, available_detector_pack

    sources = []
    for name in names:
        if name == skip or (name == "scrfd" and skip == "insightface"):
            continue
        if name == "yunet":
            sources.append(DetectorSource(name, YuNetDetector()))
        elif name in ("dlib68", "dlib5"):
            sources.append(DlibSource(int(name[4:])))
        elif name == "scrfd":
            pack = available_detector_pack(model_root)
            if pack is not None:
                sources.append(DetectorSource(name, InsightFaceDetector(model_root, pack=pack, det_size=det_size)))
    return sources


def nearest(face: Face, candidates: list[SourceFace]) -> SourceFace | None:
    """The candidate whose landmarks' centre is within one eye gap of ``face``'s, closest first."""
    if not candidates:
        return None
    gap = float(np.linalg.norm(face.landmarks[0] - face.landmarks[1]))
    distances = [float(np.linalg.norm(c.face.landmarks.mean(0) - face.landmarks.mean(0))) for c in candidates]
    best = int(np.argmin(distances))
    return candidates[best] if distances[best] < gap else None


def source_alignments(found: SourceFace, template: np.ndarray, crop_size: int, is_dlib_chip: bool) -> np.ndarray:
    """(2, 3) image → crop matrix from one source's face: dlib's own chip for the dlib encoder, else by landmarks."""
    if is_dlib_chip and found.chip is not None and crop_size == DLIB_CHIP:
        return found.chip
    return alignment_matrix(found.face.landmarks, template)
