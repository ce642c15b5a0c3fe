"""Native-pipeline verdicts (dlib's C++ pipeline, OpenCV's YuNet + SFace) on real faces."""

from __future__ import annotations

import numpy as np
import pytest

from dladiff.faces.detect import YuNetDetector
from dladiff.faces.opencv_zoo import opencv_sface_path
from dladiff.faces.verdicts import (
    DlibJudge,
    JudgedFace,
    OnnxJudge,
    SFaceJudge,
    box_iou,
    compare,
    judge_all,
    match_box,
    native_verdicts,
    undetected,
)


@pytest.fixture(scope="module")
def judges():
    return {"dlib": DlibJudge(), "sface": SFaceJudge()}


@pytest.fixture(scope="module")
def t1(real_photos):
    photo = real_photos["t1"]
    return photo, [face.bbox for face in YuNetDetector().detect(photo)]


def blank_face(photo: np.ndarray, box: np.ndarray) -> np.ndarray:
    """``photo`` with the face box (plus a margin) painted flat grey."""
    out = photo.copy()
    x1, y1, x2, y2 = box.astype(int)
    pad = int(0.3 * (x2 - x1))
    out[max(y1 - pad, 0):y2 + pad, max(x1 - pad, 0):x2 + pad] = 128
    return out


def test_box_matching_by_overlap_or_centre():
    a = np.array([0.0, 0.0, 10.0, 10.0])
    assert box_iou(a, a) == 1.0 and box_iou(a, np.array([20.0, 20.0, 30.0, 30.0])) == 0.0
    tight = JudgedFace(np.array([3.0, 3.0, 6.0, 6.0]), np.zeros(2))
    far = JudgedFace(np.array([40.0, 40.0, 50.0, 50.0]), np.zeros(2))
    assert match_box(a, [far, tight]) is tight  # IoU 0.09, but its centre is inside
    assert match_box(a, [far]) is None


def test_same_photo_is_the_same_person_for_every_judge_also_after_jpeg(judges, t1):
    photo, boxes = t1
    verdicts = native_verdicts(photo, photo, judges, boxes)
    assert len(verdicts) == 6
    for face in verdicts:
        for name in judges:
            for condition in ("png", "jpeg75"):
                assert face[name][condition]["detected"] is True and face[name][condition]["same_person"] is True
        assert face["dlib"]["png"]["distance"] == 0.0 and face["sface"]["png"]["cosine"] > 0.9999


def test_different_people_of_t1_are_told_apart(judges, t1):
    photo, _ = t1
    for judge in judges.values():
        faces = judge.faces(photo)
        assert len(faces) == 6
        pairs = [(a, b) for i, a in enumerate(faces) for b in faces[i + 1:]]
        assert sum(compare(judge, a.descriptor, b.descriptor)["same_person"] for a, b in pairs) == 0


def test_a_hidden_face_is_reported_undetected_not_as_another_person(judges, t1):
    photo, boxes = t1
    hidden = blank_face(photo, boxes[0])
    verdicts = native_verdicts(photo, hidden, judges, boxes)
    for name in judges:
        assert verdicts[0][name]["png"] == {"detected": False, "same_person": None}
        assert all(face[name]["png"]["same_person"] is True for face in verdicts[1:])
    assert undetected(judge_all(judges, photo), judge_all(judges, hidden), boxes) == {0}


def test_onnx_judge_with_sface_graph_agrees_with_opencv_pipeline(judges, real_photos):
    photo = real_photos["astronaut"]
    generic = OnnxJudge("sface-onnxruntime", opencv_sface_path(), threshold=0.363)
    (ours,), (native,) = generic.faces(photo), judges["sface"].faces(photo)
    assert compare(generic, ours.descriptor, native.descriptor)["cosine"] > 0.9999
