"""Alignment diversity from real landmark sources (YuNet, dlib 68/5-point) on real faces."""

from __future__ import annotations

import dlib
import numpy as np
import pytest
import torch

from dladiff.config import load_config, with_overrides
from dladiff.data import to_tensor
from dladiff.faces.align import warp_to_crop
from dladiff.faces.detect import YuNetDetector
from dladiff.faces.model_packs import dlib_model_path
from dladiff.faces.landmarks import DlibSource, chip_matrix, make_sources, nearest
from dladiff.layer2 import prepare_layer2
from dladiff.layer2.problem import build_problem


@pytest.fixture(scope="module")
def astronaut(real_photos):
    return np.ascontiguousarray(real_photos["astronaut"])


def test_chip_matrix_cuts_the_chip_dlib_cuts(astronaut):
    rect = dlib.get_frontal_face_detector()(astronaut, 1)[0]
    for name in ("shape_predictor_68_face_landmarks.dat", "shape_predictor_5_face_landmarks.dat"):
        shape = dlib.shape_predictor(str(dlib_model_path(name)))(astronaut, rect)
        native = np.asarray(dlib.get_face_chip(astronaut, shape, 150, 0.25), dtype=np.float64)
        M = chip_matrix(dlib.get_face_chip_details(shape, 150, 0.25))
        image = torch.from_numpy(astronaut).permute(2, 0, 1)[None].double()
        ours = warp_to_crop(image, torch.from_numpy(M), 150, fill=0)[0].permute(1, 2, 0).numpy()
        assert np.abs(ours - native).mean() < 1.5


def test_dlib_sources_agree_with_yunet_on_where_the_face_is(astronaut):
    yunet = YuNetDetector().detect(astronaut)[0]
    gap = np.linalg.norm(yunet.landmarks[1] - yunet.landmarks[0])
    for points in (68, 5):
        found = nearest(yunet, DlibSource(points).faces(astronaut))  # HOG also fires on the suit (score 0.12)
        assert found is not None and found.chip.shape == (2, 3)
        assert np.abs(found.face.landmarks - yunet.landmarks).max() < 0.5 * gap


def test_each_source_adds_an_alignment_per_encoder_and_dlib_gets_its_own_chip(astronaut):
    cfg = with_overrides(load_config(), layer2={"encoders": {"dlib": 1.0}, "detector": "yunet",
                                                 "landmark_sources": ["yunet", "dlib68", "dlib5"],
                                                 "native_verdicts": False}).layer2
    models = prepare_layer2(cfg)
    assert [source.name for source in models.sources] == ["dlib68", "dlib5"]  # yunet is the detector already
    face = models.detector.detect(astronaut)[0]
    x = to_tensor(astronaut)
    source_faces = {source.name: source.faces(astronaut) for source in models.sources}
    problem = build_problem(face, face, x, x, models.encoders, cfg, source_faces)
    assert len(problem.alignments["dlib"]) == 3
    x0, y0 = problem.box[:2]
    chip = nearest(face, source_faces["dlib68"]).chip
    expected = chip.copy()
    expected[:, 2] += chip[:, :2] @ np.array([x0, y0], dtype=np.float64)
    np.testing.assert_allclose(problem.alignments["dlib"][1], expected, atol=1e-9)
    assert make_sources(("scrfd",), "/nonexistent", 640) == []


