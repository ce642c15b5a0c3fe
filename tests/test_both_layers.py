"""Both layers together on the tiny SD and real faces: layer 2 works on layer 1's output, δ1 survives
outside the faces, and the saved files keep the combined bound floor(η1·127.5) + floor(η2·127.5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import dladiff.layer2
import dladiff.protect
from dladiff.config import load_config, with_overrides
from dladiff.protect import protect_folder

PHOTOS = ("astronaut", "t1")


def two_photos(real_photos) -> dict[str, np.ndarray]:
    """The astronaut (one face) and a 370x350 crop of t1.jpg holding two of its six people."""
    return {"astronaut": real_photos["astronaut"], "t1": np.ascontiguousarray(real_photos["t1"][150:500, 250:620])}


def both_layers_config(model_id: str, device: str = "cpu"):
    """Fast settings whose PGD steps saturate both bounds: 3 steps of 0.02 > η = 0.05 in each layer."""
    return with_overrides(
        load_config("smoke"), model={"id": model_id}, runtime={"device": device}, surrogate={"steps": 1},
        layer1={"epochs": 1, "stage1_steps": 1, "stage2_steps": 2, "stage3_steps": 1, "step_size": 0.02,
                "checkpoint_every": 1},
        layer2={"encoders": {"dlib": 1.0}, "detector": "dlib", "steps": 3, "step_size": 0.02, "detect_retries": 0})


def run_both_layers(photos_dir, out_dir, cfg):
    """``protect_folder`` with layers 1 and 2, recording layer 1's outputs and layer 2's inputs."""
    seen = {}
    layer1, layer2 = dladiff.protect.run_layer1_on, dladiff.layer2.protect_photos

    def record_layer1(*args, **kwargs):
        seen["layer1_out"], info = layer1(*args, **kwargs)
        return seen["layer1_out"], info

    def record_layer2(portraits, inputs, *args, **kwargs):
        seen["layer2_in"] = [np.array(x) for x in inputs]
        seen["portraits"] = portraits
        return layer2(portraits, inputs, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dladiff.protect, "run_layer1_on", record_layer1)
        patch.setattr(dladiff.layer2, "protect_photos", record_layer2)
        outcome = protect_folder(photos_dir, out_dir, cfg, layers=(1, 2), quiet=True)
    names = [p.path.stem for p in seen["portraits"]]
    seen["layer1_out"] = dict(zip(names, seen["layer1_out"]))
    seen["layer2_in"] = dict(zip(names, seen["layer2_in"]))
    seen["saved"] = {n: np.asarray(Image.open(out_dir / f"{n}.png").convert("RGB")) for n in names}
    return outcome, seen


@pytest.fixture(scope="module")
def both(tmp_path_factory, tiny_sd, real_photos):
    pytest.importorskip("dlib")
    root = tmp_path_factory.mktemp("both")
    (root / "photos").mkdir()
    photos = two_photos(real_photos)
    for name, pixels in photos.items():
        Image.fromarray(pixels).save(root / "photos" / f"{name}.png")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = both_layers_config(str(tiny_sd))
        outcome, seen = run_both_layers(root / "photos", root / "out", cfg)
    finally:
        torch.set_num_threads(previous)
    return cfg, outcome, seen, photos


def _diff(a, b):
    return np.abs(a.astype(int) - b.astype(int))


def test_layer2_reads_layer1_output(both):
    cfg, _, seen, clean = both
    for name in PHOTOS:
        assert np.array_equal(seen["layer2_in"][name], seen["layer1_out"][name])
        assert 0 < _diff(seen["layer2_in"][name], clean[name]).max() <= np.floor(cfg.layer1.epsilon * 127.5 + 1e-6)


def face_mask(shape, faces, grow: float = 2.0) -> np.ndarray:
    """True inside each reported face box scaled by ``grow`` about its centre."""
    mask = np.zeros(shape[:2], bool)
    for face in faces:
        x0, y0, x1, y1 = face["bbox"]
        cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, grow * (x1 - x0) / 2, grow * (y1 - y0) / 2
        mask[max(0, int(cy - hh)):int(np.ceil(cy + hh)), max(0, int(cx - hw)):int(np.ceil(cx + hw))] = True
    return mask


def test_delta1_survives_outside_the_faces(both):
    _, outcome, seen, clean = both
    entries = {e["input"][:-4]: e for e in outcome.report["images"]}
    for name in PHOTOS:
        faces = entries[name]["layer2"]["faces"]
        assert len(faces) == {"astronaut": 1, "t1": 2}[name]
        saved, layer1 = seen["saved"][name], seen["layer1_out"][name]
        changed_by_layer2 = _diff(saved, layer1).max(axis=2) > 0
        assert changed_by_layer2.any() and changed_by_layer2.mean() < 0.5
        outside = ~face_mask(saved.shape, faces)
        assert not changed_by_layer2[outside].any()
        delta1 = _diff(layer1, clean[name]).max(axis=2)
        assert (delta1[outside] > 0).mean() > 0.5  # δ1 is still in the saved file there
        assert np.array_equal(saved[outside], layer1[outside])


def test_combined_bound_holds_on_the_saved_files(both):
    cfg, outcome, seen, clean = both
    eta1 = np.floor(cfg.layer1.epsilon * 127.5 + 1e-6)
    limit = eta1 + np.floor(cfg.layer2.epsilon * 127.5 + 1e-6)
    assert outcome.report["bound_linf_255"]["checked_limit"] == limit == 14
    for entry in outcome.report["images"]:
        name = entry["input"][:-4]
        measured = _diff(seen["saved"][name], clean[name]).max()
        assert measured == entry["linf_255"] <= limit
        assert measured > eta1  # both layers add up on the faces: the combined bound is what binds


def test_previews_and_html_report_show_every_face(both):
    _, outcome, _, _ = both
    out = outcome.out_dir
    page = (out / "report.html").read_text(encoding="utf-8")
    for entry in outcome.report["images"]:
        strip = np.asarray(Image.open(out / "preview" / entry["output"]).convert("RGB"))
        red = (strip[..., 0] > 200) & (strip[..., 1] < 100) & (strip[..., 2] < 100)
        assert red.sum() > 50, "the first face is boxed in red"
        assert entry["output"] in page
    faces = sum(len(e["layer2"]["faces"]) for e in outcome.report["images"])
    assert page.count("<tr><td>") >= faces, "one table row per face and recognizer"
