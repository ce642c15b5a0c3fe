"""Face detection: YuNet and dlib on real photos, backend selection, error messages."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import INSIGHTFACE_MODEL_ROOT, insightface_images_dir

from dladiff.errors import DladiffError, InputError, ModelUnavailableError
from dladiff.faces.detect import (
    DlibDetector,
    Face,
    InsightFaceDetector,
    RetinaFaceDetector,
    YuNetDetector,
    five_points_from_68,
    make_detector,
)
from dladiff.faces.model_packs import available_detector_pack, facexlib_weights_dir, pack_file

IMAGES = insightface_images_dir()
MODEL_ROOT = INSIGHTFACE_MODEL_ROOT


@pytest.fixture(scope="module")
def t1() -> np.ndarray:
    return np.ascontiguousarray(cv2.imread(str(IMAGES / "t1.jpg"))[:, :, ::-1])


@pytest.fixture(scope="module")
def dlib_faces(t1) -> list[Face]:
    return DlibDetector(upsample=1).detect(t1)


def assert_landmarks_in_arcface_order(face: Face) -> None:
    left_eye, right_eye, nose, left_mouth, right_mouth = face.landmarks
    assert left_eye[0] < right_eye[0] and left_mouth[0] < right_mouth[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] + 5
    assert nose[1] < max(left_mouth[1], right_mouth[1])
    x1, y1, x2, y2 = face.bbox
    margin = 0.1 * (x2 - x1)
    assert np.all(face.landmarks[:, 0] > x1 - margin) and np.all(face.landmarks[:, 0] < x2 + margin)
    assert np.all(face.landmarks[:, 1] > y1 - margin) and np.all(face.landmarks[:, 1] < y2 + margin)


def test_dlib_finds_the_six_faces_of_t1(dlib_faces):
    assert len(dlib_faces) == 6
    areas = [face.area for face in dlib_faces]
    assert areas == sorted(areas, reverse=True)
    for face in dlib_faces:
        assert face.bbox.shape == (4,) and face.landmarks.shape == (5, 2)
        assert face.landmarks.dtype == np.float32 and isinstance(face.score, float)
        assert_landmarks_in_arcface_order(face)
    centres = sorted(float(face.bbox[[0, 2]].mean()) for face in dlib_faces)
    assert np.all(np.diff(centres) > 50), "six distinct faces"


def test_dlib_finds_one_face_on_the_aligned_tom_hanks_crop():
    crop = np.ascontiguousarray(cv2.imread(str(IMAGES / "Tom_Hanks_54745.png"))[:, :, ::-1])
    faces = DlibDetector(upsample=2).detect(crop)
    assert len(faces) >= 1
    from dladiff.faces.align import ARCFACE_TEMPLATE_112

    assert np.abs(faces[0].landmarks - ARCFACE_TEMPLATE_112).max() < 8.0


def test_five_points_from_68_picks_eye_centres_nose_and_mouth_corners():
    points = np.zeros((68, 2))
    points[36:42] = [10.0, 20.0]
    points[42:48] = [30.0, 20.0]
    points[30] = [20.0, 30.0]
    points[48] = [12.0, 40.0]
    points[54] = [28.0, 40.0]
    expected = [[10, 20], [30, 20], [20, 30], [12, 40], [28, 40]]
    np.testing.assert_array_equal(five_points_from_68(points), np.array(expected, dtype=np.float32))


def test_detectors_reject_non_uint8_rgb(t1):
    detector = DlibDetector(upsample=0)
    with pytest.raises(InputError, match="uint8"):
        detector.detect(t1.astype(np.float32))
    with pytest.raises(InputError, match=r"\(H, W, 3\)"):
        detector.detect(t1[:, :, 0])


def test_unknown_detector_name_lists_the_choices(tmp_path):
    with pytest.raises(DladiffError, match="auto, yunet, dlib, insightface, retinaface"):
        make_detector("mtcnn", str(tmp_path), 640)


def test_insightface_without_pack_says_where_to_put_the_files(tmp_path):
    with pytest.raises(ModelUnavailableError) as info:
        make_detector("insightface", str(tmp_path), 640)
    message = str(info.value)
    assert str(tmp_path / "buffalo_l" / "det_10g.onnx") in message
    assert str(tmp_path / "antelopev2" / "scrfd_10g_bnkps.onnx") in message
    with pytest.raises(ModelUnavailableError, match=str(tmp_path / "antelopev2" / "scrfd_10g_bnkps.onnx")):
        InsightFaceDetector(str(tmp_path), pack="antelopev2", det_size=640)


def test_auto_falls_back_to_yunet_without_packs_and_dlib_stays_available(tmp_path):
    assert make_detector("auto", str(tmp_path), 640).name == "yunet"
    assert make_detector("dlib", str(tmp_path), 640).name == "dlib"


def test_yunet_finds_the_six_faces_of_t1_where_dlib_does(t1, dlib_faces):
    faces = YuNetDetector().detect(t1)
    assert len(faces) == 6
    areas = [face.area for face in faces]
    assert areas == sorted(areas, reverse=True)
    for face in faces:
        assert face.bbox.shape == (4,) and face.landmarks.dtype == np.float32
        assert_landmarks_in_arcface_order(face)
        nearest = min(dlib_faces, key=lambda other: np.abs(other.landmarks - face.landmarks).mean())
        eye_gap = np.linalg.norm(face.landmarks[1] - face.landmarks[0])
        assert np.abs(nearest.landmarks - face.landmarks).max() < 0.35 * eye_gap


def test_yunet_finds_the_astronaut_and_nothing_in_a_flat_image():
    from skimage import data

    faces = YuNetDetector().detect(data.astronaut())
    assert len(faces) == 1 and faces[0].score > 0.8
    assert YuNetDetector().detect(np.full((200, 300, 3), 128, np.uint8)) == []


def test_pack_lookup_accepts_the_nested_antelopev2_layout(tmp_path):
    nested = tmp_path / "antelopev2" / "antelopev2"
    nested.mkdir(parents=True)
    (nested / "scrfd_10g_bnkps.onnx").write_bytes(b"")
    assert available_detector_pack(tmp_path) == "antelopev2"
    assert pack_file(tmp_path, "antelopev2", "scrfd_10g_bnkps.onnx") == nested / "scrfd_10g_bnkps.onnx"
    assert pack_file(tmp_path, "buffalo_l", "det_10g.onnx") is None


def test_retinaface_without_weights_raises_before_any_download(tmp_path):
    with pytest.raises(ModelUnavailableError) as info:
        RetinaFaceDetector(weights_dir=tmp_path)
    assert str(tmp_path / "detection_Resnet50_Final.pth") in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_retinaface_loads_cached_weights_and_returns_faces(tmp_path):
    """Random weights saved where facexlib looks: the backend loads them and maps its rows to Faces."""
    import torch
    from facexlib.detection.retinaface import RetinaFace

    torch.manual_seed(0)
    torch.save(RetinaFace(network_name="resnet50", device="cpu").state_dict(), tmp_path / "detection_Resnet50_Final.pth")
    detector = RetinaFaceDetector(weights_dir=tmp_path, conf_threshold=0.0)
    image = (np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8)
    faces = detector.detect(image)
    assert faces, "with threshold 0 a random network returns candidates"
    assert all(face.bbox.shape == (4,) and face.landmarks.shape == (5, 2) for face in faces)
    areas = [face.area for face in faces]
    assert areas == sorted(areas, reverse=True)


def export_fake_scrfd(path: Path) -> Path:
    """A random network with SCRFD's 9 outputs (scores, boxes, kps at strides 8, 16, 32, 2 anchors)."""
    import torch
    import torch.nn.functional as F

    class FakeSCRFD(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = torch.nn.ModuleList(torch.nn.Conv2d(3, 2 * 15, 1) for _ in range(3))

        def forward(self, x):
            outputs = []
            for stride, head in zip((8, 16, 32), self.heads):
                y = head(F.avg_pool2d(x, stride)).permute(0, 2, 3, 1).reshape(-1, 15)
                outputs.append((torch.sigmoid(y[:, :1] + 2.0), y[:, 1:5].abs() + 1.0, y[:, 5:]))
            return tuple(out[k] for k in range(3) for out in outputs)

    torch.manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        FakeSCRFD().eval(),
        (torch.zeros(1, 3, 160, 160),),
        str(path),
        input_names=["input.1"],
        dynamic_axes={"input.1": {2: "height", 3: "width"}},
        opset_version=11,
        dynamo=False,
    )
    return path


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_insightface_backend_loads_a_pack_detector_and_returns_faces(tmp_path, t1):
    """A random SCRFD-shaped ONNX in a fake buffalo_l: routing, prepare, detect and unpacking work."""
    export_fake_scrfd(tmp_path / "buffalo_l" / "det_10g.onnx")
    detector = make_detector("auto", str(tmp_path), 160)
    assert detector.name == "insightface" and detector.det_size == 160
    faces = detector.detect(t1)
    assert faces, "scores biased to ~0.9 give candidates above the 0.5 threshold"
    assert all(face.bbox.shape == (4,) and face.landmarks.shape == (5, 2) for face in faces)
    areas = [face.area for face in faces]
    assert areas == sorted(areas, reverse=True)


def installed_pack() -> str | None:
    return available_detector_pack(MODEL_ROOT)


@pytest.mark.skipif(installed_pack() is None, reason=f"no insightface pack with a detector under {MODEL_ROOT}")
def test_insightface_detector_agrees_with_dlib(t1, dlib_faces):
    detector = make_detector("auto", str(MODEL_ROOT), 640)
    assert detector.name == "insightface"
    faces = detector.detect(t1)
    assert len(faces) == 6
    for face in faces:
        assert_landmarks_in_arcface_order(face)
        nearest = min(dlib_faces, key=lambda other: np.abs(other.landmarks - face.landmarks).mean())
        assert np.abs(nearest.landmarks - face.landmarks).mean() < 0.15 * (face.bbox[2] - face.bbox[0])


@pytest.mark.skipif(
    not (facexlib_weights_dir() / "detection_Resnet50_Final.pth").is_file(),
    reason=f"facexlib RetinaFace weights not cached in {facexlib_weights_dir()}",
)
def test_retinaface_detector_agrees_with_dlib(t1, dlib_faces):
    faces = make_detector("retinaface", str(MODEL_ROOT), 640).detect(t1)
    assert len(faces) == 6
    for face in faces:
        assert_landmarks_in_arcface_order(face)
