"""Layer 2 on real faces, judged by dlib's own C++ pipeline (not our port)."""

import dataclasses
import io
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dladiff.cli import EXIT_ERROR, app
from dladiff.config import load_config, with_overrides
from dladiff.faces.dlib_reference import DlibReference
from dladiff.layer2 import prepare_layer2, protect_image

runner = CliRunner()


def jpeg(image, quality=75):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


@pytest.fixture(scope="module")
def protected_faces(tmp_path_factory, real_photos):
    """t1.jpg (6 people) and the astronaut, protected by `dladiff protect --layers 2 --encoders dlib`."""
    root = tmp_path_factory.mktemp("layer2")
    photos, out = root / "photos", root / "out"
    photos.mkdir()
    for name in ("t1", "astronaut"):
        Image.fromarray(real_photos[name]).save(photos / f"{name}.png")
    result = runner.invoke(app, ["protect", str(photos), "--out", str(out), "--layers", "2", "--encoders", "dlib", "--quiet"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    saved = {name: np.asarray(Image.open(out / f"{name}.png")) for name in ("t1", "astronaut")}
    return real_photos, saved, json.loads((out / "report.json").read_text())


def test_dlib_judges_protected_faces_as_other_people(protected_faces):
    clean, saved, _ = protected_faces
    judge = DlibReference()
    png = [d for name in saved for d in judge.distances(clean[name], saved[name])]
    jpg = [d for name in saved for d in judge.distances(clean[name], jpeg(saved[name]))]
    assert len(png) == 7
    assert all(d is not None for d in png), "dlib must still detect every face"
    assert sum(d > 0.6 for d in png) / len(png) >= 0.9
    assert sum(d is not None and d > 0.6 for d in jpg) / len(jpg) >= 0.8


def test_bound_holds_and_only_faces_change(protected_faces):
    clean, saved, report = protected_faces
    limit = np.floor(load_config().layer2.epsilon * 127.5 + 1e-6)
    for entry in report["images"]:
        name = entry["input"][:-4]
        diff = np.abs(saved[name].astype(int) - clean[name].astype(int))
        assert diff.max() == entry["linf_255"] <= limit
        changed = diff.max(axis=2) > 0
        assert changed.mean() < 0.25  # confined to face regions
        faces = entry["layer2"]["faces"]
        assert faces and all("dlib" in f["encoders"] for f in faces)
        for face in faces:
            dlib_entry = face["encoders"]["dlib"]
            assert {"ism_pro", "same_person", "distance", "threshold"} <= set(dlib_entry)
            assert dlib_entry["same_person"] == (dlib_entry["distance"] < 0.6)


def test_report_has_native_verdicts_apart_from_the_attacks_own(protected_faces):
    clean, saved, report = protected_faces
    faces = [face for entry in report["images"] for face in entry["layer2"]["faces"]]
    assert len(faces) == 7
    judge = DlibReference()
    png = [d for name in saved for d in judge.distances(clean[name], saved[name])]
    for face in faces:
        native = face["native"]["dlib"]
        assert set(native) == {"png", "jpeg75"} and native["png"]["detected"] is True
        assert native["png"]["same_person"] == (native["png"]["distance"] < 0.6)
        assert "distance" in face["encoders"]["dlib"]  # the attack's own measurement stays separate
    stored = sorted(f["native"]["dlib"]["png"]["distance"] for f in faces)  # rounded to 4 decimals in the report
    assert np.allclose(sorted(png), stored, atol=1e-4)


def _models_and_cfg(**layer2):
    cfg = with_overrides(load_config(), layer2={"encoders": {"dlib": 1.0}, "detector": "dlib", **layer2})
    return prepare_layer2(cfg.layer2), cfg.layer2


def test_photo_without_face_is_kept_and_reported(tmp_path):
    models, cfg = _models_and_cfg(steps=2)
    blank = np.full((120, 160, 3), 128, np.uint8)
    out, faces = protect_image(blank, blank, models, cfg, seed=0)
    assert faces == [] and np.array_equal(out, blank)


def test_full_resolution_mode_and_reproducibility(real_photos):
    image = real_photos["hanks"]
    for full in (False, True):
        models, cfg = _models_and_cfg(steps=3, full_resolution=full)
        a, faces = protect_image(image, image, models, cfg, seed=5)
        b, _ = protect_image(image, image, models, cfg, seed=5)
        assert np.array_equal(a, b)  # same seed, same result
        assert np.abs(a.astype(int) - image.astype(int)).max() <= np.floor(cfg.epsilon * 127.5 + 1e-6)
        assert len(faces) == 1 and faces[0]["steps"] == 3


def test_jitter_changes_the_gradient_path(real_photos):
    image = real_photos["hanks"]
    models, exact = _models_and_cfg(steps=3, jitter_translation=0.0, jitter_rotation=0.0, jitter_scale=0.0,
                                    diversity_probability=0.0, landmark_sources=[])
    a, _ = protect_image(image, image, models, exact, seed=0)
    b, _ = protect_image(image, image, models, exact, seed=1)
    assert np.array_equal(a, b)  # no jitter, no input diversity, one alignment: the seed plays no part
    _, jittered = _models_and_cfg(steps=3, jitter_translation=2.0, diversity_probability=0.0, landmark_sources=[])
    c, _ = protect_image(image, image, models, jittered, seed=0)
    assert not np.array_equal(a, c)


def test_missing_encoder_is_an_error_before_any_work(photo_dir, tmp_path):
    result = runner.invoke(app, ["protect", str(photo_dir), "--out", str(tmp_path / "out"), "--layers", "1,2",
                                 "--config", "smoke", "--encoders", "arcface-r50", "--quiet"])
    assert result.exit_code == EXIT_ERROR
    assert "w600k_r50.onnx" in result.output
    assert not (tmp_path / "out" / "surrogate").exists()


def test_models_bundle_is_reusable(real_photos):
    """One bundle serves photo after photo: a photo comes out the same after another photo used the bundle."""
    models, cfg = _models_and_cfg(steps=2)
    assert set(models.weights) == {"dlib"}
    hanks = real_photos["hanks"]
    first, faces = protect_image(hanks, hanks, models, cfg, seed=1)
    mirrored = np.ascontiguousarray(hanks[:, ::-1])
    protect_image(mirrored, mirrored, models, cfg, seed=0)
    again, _ = protect_image(hanks, hanks, models, cfg, seed=1)
    assert len(faces) == 1 and not np.array_equal(first, hanks)
    assert np.array_equal(first, again)


def test_eot_option_reaches_the_photo_and_keeps_the_bound(real_photos):
    from dladiff.config import EOTConfig

    image = real_photos["hanks"]
    models, cfg = _models_and_cfg(steps=2)
    plain, _ = protect_image(image, image, models, cfg, seed=0)
    eot = EOTConfig(enabled=True, probability=1.0, jpeg_quality=(60, 60), resize_scale=(0.7, 0.7), blur_sigma=(0.5, 0.5))
    through, faces = protect_image(image, image, models, cfg, seed=0, eot=eot)
    assert len(faces) == 1 and not np.array_equal(plain, through)
    assert np.abs(through.astype(int) - image.astype(int)).max() <= np.floor(cfg.epsilon * 127.5 + 1e-6)
    layer1_only, _ = protect_image(image, image, models, cfg, seed=0, eot=dataclasses.replace(eot, layers=(1,)))
    assert np.array_equal(plain, layer1_only)
