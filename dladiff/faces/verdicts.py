"""Same-person verdicts from each recognizer's own native pipeline, not from the attack's crops.

Layer 2 optimizes through PyTorch ports and its own alignment; grading the result with those
would grade its own homework. Each judge here runs the pipeline a third party would run on the
saved file, with none of layer 2's code:

* ``dlib``: ``dlib.get_frontal_face_detector`` (HOG), the 68-point ``shape_predictor`` and
  ``face_recognition_model_v1.compute_face_descriptor``; same person when distance < 0.6.
* ``sface``: ``cv2.FaceDetectorYN`` (YuNet), ``cv2.FaceRecognizerSF.alignCrop`` then ``.feature``
  (OpenCV's BGR image; ``feature`` swaps it to the RGB the network wants); cosine > 0.363.
* ``arcface-r50`` / ``arcface-r100``: insightface's ``FaceAnalysis`` with the buffalo_l /
  antelopev2 pack (SCRFD + ArcFace, ``normed_embedding``); cosine > 0.3. Only when the pack is present.
* :class:`OnnxJudge`: YuNet + ``alignCrop`` + onnxruntime for any ArcFace-template ONNX recognizer
  (scripts use it for mobileface as a leave-one-out judge).

Everything takes ``(H, W, 3)`` uint8 RGB arrays, so ``dladiff verify CLEAN PROTECTED`` can call
:func:`native_verdicts` on two photos read from disk. Faces of the protected photo are matched to
the clean photo's faces by box overlap (:func:`match_box`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from dladiff.errors import ModelUnavailableError
from dladiff.faces.detect import YuNetDetector, hog_boxes, load_shape_predictor

JPEG_QUALITY = 75
MIN_IOU = 0.3


@dataclass(frozen=True)
class JudgedFace:
    """One face as a native pipeline sees it: box (4,) x1, y1, x2, y2 in pixels and its descriptor (D,)."""

    bbox: np.ndarray
    descriptor: np.ndarray


class Judge(Protocol):
    """A recognizer's native pipeline: faces with descriptors, and its decision rule."""

    name: str
    threshold: float
    threshold_kind: Literal["euclidean", "cosine"]

    def faces(self, image: np.ndarray) -> list[JudgedFace]: ...


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boxes (4,) x1, y1, x2, y2."""
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def match_box(box: np.ndarray, candidates: list[JudgedFace], min_iou: float = MIN_IOU) -> JudgedFace | None:
    """The candidate overlapping ``box`` most, or None when its IoU is below ``min_iou``.

    A box that contains the candidate's centre counts as overlapping too (dlib's HOG boxes are
    tight squares inside YuNet's and SCRFD's taller ones, with IoU near 0.3).
    """
    box = np.asarray(box, dtype=np.float64)
    best, best_iou = None, 0.0
    for candidate in candidates:
        iou = box_iou(box, candidate.bbox)
        cx, cy = (candidate.bbox[0] + candidate.bbox[2]) / 2, (candidate.bbox[1] + candidate.bbox[3]) / 2
        inside = box[0] <= cx <= box[2] and box[1] <= cy <= box[3]
        score = iou if iou >= min_iou else (min_iou if inside else 0.0)
        if score > best_iou:
            best, best_iou = candidate, score
    return best


def jpeg(image: np.ndarray, quality: int = JPEG_QUALITY) -> np.ndarray:
    """``image`` after a PIL JPEG round trip at ``quality`` (what sharing a photo does to it)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB"))


def compare(judge: Judge, clean: np.ndarray, other: np.ndarray) -> dict:
    """``{"same_person", "distance" | "cosine", "threshold"}`` of two descriptors by ``judge``'s rule."""
    if judge.threshold_kind == "euclidean":
        distance = float(np.linalg.norm(clean - other))
        return {"same_person": distance < judge.threshold, "distance": round(distance, 4), "threshold": judge.threshold}
    cosine = float(clean @ other / max(np.linalg.norm(clean) * np.linalg.norm(other), 1e-12))
    return {"same_person": cosine > judge.threshold, "cosine": round(cosine, 4), "threshold": judge.threshold}


def judge_faces(judge: Judge, clean: np.ndarray, protected: np.ndarray, boxes: list[np.ndarray],
                clean_faces: list[JudgedFace] | None = None, protected_faces: list[JudgedFace] | None = None
                ) -> list[dict]:
    """Per box of the clean photo: ``judge``'s verdict between the clean face and the protected one.

    Each entry is ``{"detected": bool, "same_person": bool | None, ...}``: ``detected`` False
    when the judge finds the face in the clean photo but not in ``protected`` (then
    ``same_person`` is None); ``{"detected": None}`` when it misses it in the clean photo too.
    """
    clean_faces = judge.faces(clean) if clean_faces is None else clean_faces
    found = judge.faces(protected) if protected_faces is None else protected_faces
    out = []
    for box in boxes:
        reference = match_box(box, clean_faces)
        if reference is None:
            out.append({"detected": None, "same_person": None})
            continue
        match = match_box(reference.bbox, found)
        if match is None:
            out.append({"detected": False, "same_person": None})
            continue
        out.append({"detected": True, **compare(judge, reference.descriptor, match.descriptor)})
    return out


def native_verdicts(clean: np.ndarray, protected: np.ndarray, judges: dict[str, Judge], boxes: list[np.ndarray],
                    jpeg_quality: int = JPEG_QUALITY, seen: dict[str, tuple[list, list]] | None = None) -> list[dict]:
    """Per face box of ``clean``: ``{judge name: {"png": verdict, "jpeg75": verdict}}`` (see :func:`judge_faces`).

    ``protected`` is judged as given (the saved PNG's pixels) and after a JPEG round trip at
    ``jpeg_quality``. ``seen``: per judge, its faces already found on (clean, protected), to skip
    running its detector again.
    """
    compressed = jpeg(protected, jpeg_quality)
    per_face = [{} for _ in boxes]
    for name, judge in judges.items():
        clean_faces, protected_faces = (seen or {}).get(name) or (judge.faces(clean), judge.faces(protected))
        as_saved = judge_faces(judge, clean, protected, boxes, clean_faces, protected_faces)
        shared = judge_faces(judge, clean, compressed, boxes, clean_faces)
        for entry, png, jpg in zip(per_face, as_saved, shared):
            entry[name] = {"png": png, f"jpeg{jpeg_quality}": jpg}
    return per_face


def judge_all(judges: dict[str, Judge], image: np.ndarray) -> dict[str, list[JudgedFace]]:
    """Every judge's faces in ``image``."""
    return {name: judge.faces(image) for name, judge in judges.items()}


def undetected(clean_seen: dict[str, list[JudgedFace]], protected_seen: dict[str, list[JudgedFace]],
               boxes: list[np.ndarray]) -> set[int]:
    """Indices of the boxes that some judge finds in the clean photo but no longer in the protected one."""
    lost = set()
    for name, clean_faces in clean_seen.items():
        for i, box in enumerate(boxes):
            reference = match_box(box, clean_faces)
            if reference is not None and match_box(reference.bbox, protected_seen[name]) is None:
                lost.add(i)
    return lost


class DlibJudge:
    """dlib's C++ pipeline: HOG detector (``upsample`` doublings), 68-point landmarks, ResNet descriptor."""

    name = "dlib"
    threshold = 0.6
    threshold_kind = "euclidean"

    def __init__(self, upsample: int = 1):
        import dlib

        from dladiff.faces.model_packs import dlib_model_path

        self.upsample = upsample
        self.predictor = load_shape_predictor(str(dlib_model_path("shape_predictor_68_face_landmarks.dat")))
        self.model = dlib.face_recognition_model_v1(str(dlib_model_path("dlib_face_recognition_resnet_model_v1.dat")))

    def faces(self, image: np.ndarray) -> list[JudgedFace]:
        image = np.ascontiguousarray(image)
        out = []
        for rect in hog_boxes(image, self.upsample):
            descriptor = np.array(self.model.compute_face_descriptor(image, self.predictor(image, rect)))
            out.append(JudgedFace(np.array([rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1], float),
                                  descriptor))
        return out


class OnnxJudge:
    """YuNet, ``cv2.FaceRecognizerSF.alignCrop`` (ArcFace 112 template), then an ONNX recognizer in onnxruntime.

    ``channel_order``, ``mean`` and ``std`` say how the network wants the aligned 0..255 crop.
    """

    threshold_kind = "cosine"

    def __init__(self, name: str, model: str | Path, threshold: float, channel_order: str = "RGB",
                 mean: float = 0.0, std: float = 1.0):
        import cv2
        import onnxruntime

        from dladiff.faces.opencv_zoo import opencv_sface_path, quiet_opencv

        self.name, self.threshold = name, float(threshold)
        self.rgb, self.mean, self.std = channel_order == "RGB", float(mean), float(std)
        self.detector = YuNetDetector()
        quiet_opencv()
        self.aligner = cv2.FaceRecognizerSF.create(str(opencv_sface_path()), "")
        onnxruntime.set_default_logger_severity(3)
        self.session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])

    def faces(self, image: np.ndarray) -> list[JudgedFace]:
        bgr = np.ascontiguousarray(image[:, :, ::-1])
        out = []
        for row in self.detector.raw(image):
            crop = self.aligner.alignCrop(bgr, row)
            crop = crop[:, :, ::-1] if self.rgb else crop
            x = ((crop.astype(np.float32) - self.mean) / self.std).transpose(2, 0, 1)[None]
            descriptor = self.session.run(None, {self.session.get_inputs()[0].name: x})[0].reshape(-1)
            out.append(JudgedFace(np.array([row[0], row[1], row[0] + row[2], row[1] + row[3]], float), descriptor))
        return out


class SFaceJudge:
    """OpenCV's own SFace pipeline: ``FaceDetectorYN`` → ``FaceRecognizerSF.alignCrop`` → ``.feature``."""

    name = "sface"
    threshold_kind = "cosine"

    def __init__(self):
        import cv2

        from dladiff.faces.opencv_zoo import SFACE_COSINE_THRESHOLD, opencv_sface_path, quiet_opencv

        self.threshold = SFACE_COSINE_THRESHOLD
        self.detector = YuNetDetector()
        quiet_opencv()
        self.recognizer = cv2.FaceRecognizerSF.create(str(opencv_sface_path()), "")

    def faces(self, image: np.ndarray) -> list[JudgedFace]:
        bgr = np.ascontiguousarray(image[:, :, ::-1])
        return [JudgedFace(np.array([row[0], row[1], row[0] + row[2], row[1] + row[3]], float),
                           self.recognizer.feature(self.recognizer.alignCrop(bgr, row)).reshape(-1).copy())
                for row in self.detector.raw(image)]


class LazyJudge:
    """A judge whose pipeline is built on its first use (``faces``).

    Layer 2 needs the native verdicts only after a face's PGD, so their models load then, not
    before the first face. ``build`` returns the real judge; name and decision rule are known
    beforehand (checked against the built judge).
    """

    def __init__(self, name: str, threshold: float, threshold_kind: Literal["euclidean", "cosine"], build):
        self.name, self.threshold, self.threshold_kind = name, float(threshold), threshold_kind
        self._build = build
        self._judge: Judge | None = None

    @property
    def built(self) -> bool:
        return self._judge is not None

    def judge(self) -> Judge:
        """The real judge, built now if it was not yet."""
        if self._judge is None:
            judge = self._build()
            if (judge.name, judge.threshold, judge.threshold_kind) != (self.name, self.threshold, self.threshold_kind):
                raise ValueError(f"judge {judge.name} is not the {self.name} judge that was announced")
            self._judge = judge
        return self._judge

    def faces(self, image: np.ndarray) -> list[JudgedFace]:
        return self.judge().faces(image)


class InsightFaceJudge:
    """insightface's ``FaceAnalysis`` on a pack (SCRFD detector + ArcFace recognizer), as the adapters run it."""

    threshold = 0.3
    threshold_kind = "cosine"

    def __init__(self, name: str, pack: str, model_root: str | Path, det_size: int = 640):
        from insightface.app import FaceAnalysis

        self.name = name
        root = Path(model_root).expanduser()
        self.app = FaceAnalysis(name=pack, root=str(root.parent), allowed_modules=["detection", "recognition"],
                                providers=["CPUExecutionProvider"])
        self.app.prepare(ctx_id=-1, det_size=(det_size, det_size))

    def faces(self, image: np.ndarray) -> list[JudgedFace]:
        bgr = np.ascontiguousarray(image[:, :, ::-1])
        return [JudgedFace(np.asarray(face.bbox, float), np.asarray(face.normed_embedding, float))
                for face in self.app.get(bgr)]


def native_judge(encoder_name: str, model_root: str | Path, det_size: int = 640) -> Judge | None:
    """The native pipeline of a registered encoder, or None when it has none (``onnx:PATH``) or it is absent.

    dlib's and OpenCV's pipelines are :class:`LazyJudge` (their files are known to be present; they
    load on first use); insightface's ``FaceAnalysis`` loads here, since only loading it tells
    whether a pack works.
    """
    from dladiff.faces.encoders import ENCODERS, encoder_path

    spec = ENCODERS.get(encoder_name)
    if spec is None or encoder_path(encoder_name, model_root) is None:
        return None
    if spec.kind == "dlib":
        return LazyJudge(DlibJudge.name, DlibJudge.threshold, DlibJudge.threshold_kind, DlibJudge)
    if spec.kind == "sface":
        from dladiff.faces.opencv_zoo import SFACE_COSINE_THRESHOLD

        return LazyJudge(SFaceJudge.name, SFACE_COSINE_THRESHOLD, SFaceJudge.threshold_kind, SFaceJudge)
    try:
        return InsightFaceJudge(encoder_name, spec.pack, model_root, det_size)
    except (ImportError, AssertionError, RuntimeError, ValueError) as exc:
        raise ModelUnavailableError(f"insightface FaceAnalysis cannot load pack {spec.pack}: {exc}") from exc


def pass_rates(verdicts: list[dict], names: list[str]) -> dict:
    """Share of faces each judge no longer sees as the same person, as saved and after JPEG, plus detection rates."""
    out = {}
    for name in names:
        for key in ("png", f"jpeg{JPEG_QUALITY}"):
            entries = [face[name][key] for face in verdicts if name in face and face[name][key]["detected"] is not None]
            if entries:
                out.setdefault(name, {})[key] = {
                    "faces": len(entries),
                    "other_person": round(sum(e["same_person"] is False for e in entries) / len(entries), 4),
                    "detected": round(sum(bool(e["detected"]) for e in entries) / len(entries), 4),
                }
    return out
