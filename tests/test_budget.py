"""The face region and the perceptual budget (dladiff.budget), alone and inside both layers, on real faces."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from dladiff.budget import (edge_step, face_hull_points, feathered_mask, five_point_outline, grown_hull, layer2_bound,
                            local_std, luminance, texture_budget, texture_budget_rows)
from dladiff.config import BudgetConfig, load_config, with_overrides
from dladiff.data import apply_perturbation
from dladiff.errors import ConfigError
from dladiff.preview import preview_image

ASTRONAUT_LANDMARKS = np.array([[200.1, 101.8], [247.2, 102.6], [220.3, 124.7], [198.9, 143.2], [239.8, 143.9]], np.float32)
ASTRONAUT_BOX = np.array([178.0, 62.6, 268.4, 176.4])  # YuNet on the astronaut


def test_local_std_is_zero_on_flat_and_matches_numpy_inside():
    rng = np.random.default_rng(0)
    luma = rng.uniform(0, 255, (20, 30)).astype(np.float32)
    std = local_std(luma, 5)
    assert std.shape == (20, 30)
    assert np.allclose(std[10, 10], luma[8:13, 8:13].std(), atol=1e-2)
    assert np.allclose(local_std(np.full((8, 8), 77.0, np.float32), 3), 0.0, atol=1e-3)


def test_texture_budget_goes_from_floor_on_flat_to_epsilon_on_texture():
    image = np.full((40, 80, 3), 120, np.uint8)
    image[:, 40:] = np.random.default_rng(1).integers(0, 256, (40, 40, 3))
    bound = texture_budget(image, 0.05, 0.008, 2.0, 12.0, 7)
    assert bound.shape == (40, 80) and bound.dtype == np.float32
    assert np.allclose(bound[:, :30], 0.008) and np.allclose(bound[:, 50:], 0.05)
    assert (bound >= 0.008 - 1e-7).all() and (bound <= 0.05 + 1e-7).all()


def test_texture_budget_rows_equal_the_whole_photo(real_photos):
    photo, budget = real_photos["astronaut"], BudgetConfig()
    whole = texture_budget(photo, 6.4, 1.0, budget.flat_std, budget.full_std, budget.window)
    for top, bottom in [(0, 5), (100, 164), (500, 512)]:
        assert np.allclose(texture_budget_rows(photo, top, bottom, 6.4, 1.0, BudgetConfig()), whole[top:bottom], atol=1e-4)


def test_five_point_outline_surrounds_the_face():
    outline = five_point_outline(ASTRONAUT_LANDMARKS)
    assert outline.shape == (32, 2)
    x0, y0 = outline.min(0)
    x1, y1 = outline.max(0)
    assert x0 < 190 and x1 > 257 and y0 < 85 and y1 > 160  # beyond eyes and mouth: cheeks, brow, chin
    assert x1 - x0 < 2.5 * 47 and y1 - y0 < 3 * 47  # but no wider than a face (eye gap 47 px)


def test_grown_hull_and_feathered_mask_fade_inside_and_stop_at_the_edge():
    square = np.array([[10.0, 10.0], [30.0, 10.0], [30.0, 30.0], [10.0, 30.0]])
    polygon = grown_hull(square, 3.0)
    assert polygon.min() == pytest.approx(7.0, abs=0.01) and polygon.max() == pytest.approx(33.0, abs=0.01)
    weight = feathered_mask((40, 40), [polygon], 4.0)
    assert weight.shape == (40, 40) and weight.dtype == np.float32
    assert (weight[:6] == 0).all() and (weight[:, 35:] == 0).all()  # outside the grown hull
    assert (weight[15:26, 15:26] == 1).all()  # deep inside
    ring = (weight > 0) & (weight < 1)
    assert ring.any() and weight[20, 7:12].tolist() == sorted(weight[20, 7:12].tolist())  # rises inward
    step = max(np.abs(np.diff(weight, axis=a)).max() for a in (0, 1))
    assert step <= np.sqrt(2) / 4 + 1e-6


def test_edge_step_sees_only_pairs_across_the_edge():
    region = np.zeros((4, 6), bool)
    region[:, :3] = True
    delta = np.zeros((4, 6))
    delta[:, 0], delta[:, 2] = 9.0, 2.0
    assert edge_step(delta, region) == 2.0
    assert edge_step(delta, np.ones((4, 6), bool)) == 0.0


def test_budget_config_is_validated(tmp_path):
    default = BudgetConfig()
    assert load_config().budget == default and default.face_mask and default.perceptual_on(2) and not default.perceptual_on(1)
    paper = load_config("layer2_paper").budget
    assert paper.face_mask is False and paper.perceptual is False
    with pytest.raises(ConfigError, match="budget.perceptual_layers"):
        with_overrides(load_config(), budget={"perceptual_layers": [0]})
    with pytest.raises(ConfigError, match="budget.window"):
        with_overrides(load_config(), budget={"window": 4})
    with pytest.raises(ConfigError, match="budget.flat_std"):
        with_overrides(load_config(), budget={"flat_std": 20.0})
    with pytest.raises(ConfigError, match="hull"):
        with_overrides(load_config(), budget={"hull": "68"})


def test_layer1_is_clipped_to_the_texture_bound_on_the_photo_grid(real_photos):
    photo = real_photos["astronaut"]
    delta = torch.full((3, 64, 64), 0.05)  # +6.4/255 everywhere in the model frame
    uniform = apply_perturbation(photo, delta, 0.05 * 127.5).astype(int) - photo
    assert np.array_equal(apply_perturbation(photo, delta, 0.05 * 127.5, BudgetConfig(perceptual=False)) - photo.astype(int),
                          uniform)
    assert np.array_equal(apply_perturbation(photo, delta, 0.05 * 127.5, BudgetConfig()) - photo.astype(int), uniform)
    shaped = apply_perturbation(photo, delta, 0.05 * 127.5, BudgetConfig(perceptual_layers=(1, 2))).astype(int) - photo
    budget = BudgetConfig()
    limit = np.floor(texture_budget(photo, 6.375, budget.floor * 127.5, budget.flat_std, budget.full_std, budget.window)
                     + 1e-6)[..., None]
    assert (np.abs(shaped) <= limit).all() and np.abs(shaped).max() == 6
    flat = local_std(luminance(photo), 7) <= 2.0
    assert np.abs(uniform)[flat].mean() > 4 and np.abs(shaped)[flat].mean() <= 1.0


@pytest.fixture(scope="module")
def protected_astronaut(real_photos):
    """Layer 2 (SFace in the loop, a few steps) with the face mask and the perceptual budget on, on the astronaut."""
    from dladiff.layer2 import prepare_layer2, protect_image

    cfg = with_overrides(load_config(), layer2={"steps": 8, "step_size": 0.02, "encoders": {"sface": 1.0},
                                                "landmark_sources": [], "native_verdicts": False, "detect_retries": 0},
                       budget={"face_mask": True, "perceptual": True})
    models = prepare_layer2(cfg.layer2)
    clean = real_photos["astronaut"]
    out, faces = protect_image(clean, clean, models, cfg.layer2, 0, None, cfg.budget)
    mask_only = dataclasses.replace(cfg.budget, perceptual=False)
    return cfg, models, clean, out, faces, protect_image(clean, clean, models, cfg.layer2, 0, None, mask_only)[0]


def test_layer2_meets_the_targets_on_a_real_face(protected_astronaut):
    cfg, models, clean, out, faces, _ = protected_astronaut
    bound, polygons = layer2_bound(clean, models.detector.detect(clean), cfg.layer2.epsilon, cfg.budget)
    delta = out.astype(int) - clean
    size = np.abs(delta)
    region = bound > 0
    assert len(faces) == 1 and faces[0]["region"] and size.max() >= 5, "the face is perturbed"
    assert (size[~region] == 0).all(), "outside the grown face hull no pixel changes"
    assert edge_step(delta, region) <= 2, "δ steps by at most 2/255 across the region's edge"
    flat = region & (local_std(luminance(clean), cfg.budget.window) <= cfg.budget.flat_std)
    assert flat.sum() > 50 and size[flat].mean() <= 1.0, "mean |δ| at most 1/255 on flat areas"
    assert (size <= np.floor(bound[..., None] * 127.5 + 1e-6)).all(), "the per-pixel bound holds on the uint8 photo"
    assert size.max() <= np.floor(cfg.layer2.epsilon * 127.5 + 1e-6)


def test_face_mask_alone_keeps_the_region_and_the_edge(protected_astronaut):
    cfg, models, clean, out, _, mask_only = protected_astronaut
    bound, _ = layer2_bound(clean, models.detector.detect(clean), cfg.layer2.epsilon,
                            dataclasses.replace(cfg.budget, perceptual=False))
    delta = mask_only.astype(int) - clean
    region = bound > 0
    assert (delta[~region] == 0).all() and edge_step(delta, region) <= 2
    flat = region & (local_std(luminance(clean), cfg.budget.window) <= cfg.budget.flat_std)
    assert np.abs(delta)[flat].mean() > np.abs(out.astype(int) - clean)[flat].mean()  # the texture bound is what quiets flat areas


def test_dlib68_points_join_the_five_point_outline(real_photos):
    photo = real_photos["astronaut"]
    points = face_hull_points(photo, ASTRONAUT_BOX, ASTRONAUT_LANDMARKS, "dlib68")
    assert points.shape == (32 + 68, 2)
    chin = points[32 + 8]
    assert 200 < chin[0] < 245 and 160 < chin[1] < 190  # dlib's chin point lies below the mouth
    assert face_hull_points(photo, ASTRONAUT_BOX, ASTRONAUT_LANDMARKS, "five").shape == (32, 2)


def test_uniform_budget_is_the_papers_bound(protected_astronaut):
    cfg, models, clean, _, _, _ = protected_astronaut
    bound, regions = layer2_bound(clean, models.detector.detect(clean), cfg.layer2.epsilon,
                                  dataclasses.replace(cfg.budget, face_mask=False, perceptual=False))
    assert bound is None and regions == [None]


def test_preview_outlines_the_region_on_the_difference_panel(protected_astronaut):
    _, _, clean, out, faces, _ = protected_astronaut
    plain = preview_image(clean, out, [{}], max_height=512)
    outlined = preview_image(clean, out, [{"region": faces[0]["region"]}], max_height=512)
    changed = (plain != outlined).any(axis=2)
    third = plain.shape[1] // 3
    assert changed[:, 2 * third:].sum() > 100 and changed[:, :2 * third].sum() == 0


def test_defaults_mask_layer2_to_the_face_and_the_preview_shows_it(real_photos):
    """At the default settings each face's report carries its grown hull and the preview outlines it on the
    difference panel; the paper's config (uniform η over the warped-back crop) has no region."""
    from dladiff.layer2 import prepare_layer2, protect_image

    quick = {"steps": 2, "encoders": {"sface": 1.0}, "landmark_sources": [], "native_verdicts": False, "detect_retries": 0}
    clean = real_photos["astronaut"]
    runs = {}
    for name in ("default", "layer2_paper"):
        cfg = with_overrides(load_config(name), layer2=quick)
        runs[name] = protect_image(clean, clean, prepare_layer2(cfg.layer2), cfg.layer2, 0, None, cfg.budget)
    out, faces = runs["default"]
    assert len(faces) == 1 and len(faces[0]["region"]) >= 3
    without = [{k: v for k, v in face.items() if k != "region"} for face in faces]
    changed = (preview_image(clean, out, faces, max_height=512) != preview_image(clean, out, without, max_height=512)).any(axis=2)
    third = changed.shape[1] // 3
    assert changed[:, 2 * third:].sum() > 100 and changed[:, :2 * third].sum() == 0
    paper_out, paper_faces = runs["layer2_paper"]
    assert "region" not in paper_faces[0]
    moved = [(np.abs(o.astype(int) - clean).max(axis=2) > 0).sum() for o in (out, paper_out)]
    assert moved[0] < moved[1]  # the grown hull is smaller than the warped-back crop
