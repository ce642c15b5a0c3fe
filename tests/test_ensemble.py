"""Balanced ensemble: each encoder's term on its own threshold, hinged; the paper's fixed sum stays available."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import INSIGHTFACE_MODEL_ROOT

from dladiff.faces.align import estimate_similarity, warp_to_crop
from dladiff.faces.detect import YuNetDetector
from dladiff.faces.encoders import load_encoder
from dladiff.faces.ensemble import Ensemble, margin_score


def test_margin_score_is_one_at_the_clean_face_and_zero_at_the_threshold():
    clean = torch.tensor([1.0, 0.0, 0.0])
    at_distance = torch.tensor([[1.0, 0.6, 0.0]])  # Euclidean distance 0.6 from clean
    assert margin_score(clean[None], clean, 0.6, "euclidean").item() == pytest.approx(1.0, abs=1e-5)
    assert margin_score(at_distance, clean, 0.6, "euclidean").item() == pytest.approx(0.0, abs=1e-6)
    angle = np.arccos(0.363)
    at_cosine = torch.tensor([[np.cos(angle), np.sin(angle), 0.0]], dtype=torch.float32)
    assert margin_score(clean[None], clean, 0.363, "cosine").item() == pytest.approx(1.0)
    assert margin_score(at_cosine, clean, 0.363, "cosine").item() == pytest.approx(0.0, abs=1e-6)


def test_hinge_stops_an_encoder_past_its_threshold_by_the_margin():
    clean = torch.tensor([1.0, 0.0])
    far = torch.tensor([[-1.0, 0.2]], requires_grad=True)  # cosine ≈ −0.98: far past 0.363
    hinged = Ensemble({"a": 1.0}, "normalized", margin=0.3).score(far, clean, 0.363, "cosine")
    assert hinged.item() == 0.0
    hinged.sum().backward()
    assert far.grad.abs().sum() == 0
    plain = Ensemble({"a": 1.0}, "normalized", margin=-1.0).score(far, clean, 0.363, "cosine")
    assert plain.item() < -1.0
    fixed = Ensemble({"a": 1.0}, "fixed").score(far, clean, 0.363, "cosine")
    assert fixed.item() == pytest.approx(torch.nn.functional.cosine_similarity(far, clean[None]).item())


def test_combine_and_stop_rules():
    fixed = Ensemble({"a": 4.0, "b": 1.0}, "fixed")
    assert fixed.combine({"a": torch.tensor(0.5), "b": torch.tensor(1.0)}).item() == pytest.approx(0.6)
    assert fixed.done({"a": -0.1, "b": -0.1}, tau=0.0) and not fixed.done({"a": 0.5, "b": -0.9}, tau=0.0)
    hinged = Ensemble({"a": 1.0, "b": 1.0}, "normalized", 0.3)
    assert hinged.done({"a": 0.0, "b": 0.0}, tau=0.0) and not hinged.done({"a": 0.0, "b": 0.01}, tau=0.0)
    plain = Ensemble({"a": 1.0, "b": 1.0}, "normalized", -1.0)
    assert not plain.done({"a": -2.0, "b": 0.5}, tau=0.0)  # the mean is past, encoder b is not
    assert plain.done({"a": -2.0, "b": -0.01}, tau=0.0)


@pytest.fixture(scope="module")
def two_people(real_photos):
    """Crops of two different people of t1 for dlib (150²) and sface (112²), in [-1, 1]."""
    photo = real_photos["t1"]
    faces = YuNetDetector().detect(photo)[:2]
    image = torch.from_numpy(np.array(photo)).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    out = {}
    for name in ("dlib", "sface"):
        encoder = load_encoder(name, INSIGHTFACE_MODEL_ROOT)
        matrices = np.stack([estimate_similarity(face.landmarks, encoder.template) for face in faces])
        out[name] = (encoder, warp_to_crop(image.expand(2, -1, -1, -1), torch.from_numpy(matrices), encoder.crop_size))
    return out


def test_normalized_terms_put_real_encoders_on_one_scale_where_cosines_do_not(two_people):
    """Another person is past both thresholds: normalized scores are both < 0, dlib's cosine still looks 'similar'."""
    fixed, balanced = Ensemble({}, "fixed"), Ensemble({}, "normalized", margin=-1.0)
    scores, cosines = {}, {}
    for name, (encoder, crops) in two_people.items():
        with torch.no_grad():
            embeddings = encoder(crops)
        scores[name] = balanced.score(embeddings[1:], embeddings[0], encoder.threshold, encoder.threshold_kind).item()
        cosines[name] = fixed.score(embeddings[1:], embeddings[0], encoder.threshold, encoder.threshold_kind).item()
    assert scores["dlib"] < 0 and scores["sface"] < 0
    assert cosines["dlib"] > 0.7 > cosines["sface"]  # dlib's cosine is a poor proxy for its verdict


def test_hinged_encoder_past_its_threshold_gives_no_gradient_on_real_crops(two_people):
    """Another person (past both thresholds, hinge margin 0) pulls nothing; the same face pulls both."""
    ensemble = Ensemble({"dlib": 1.0, "sface": 1.0}, "normalized", margin=0.0)
    terms, grads = {}, {}
    for name, (encoder, crops) in two_people.items():
        with torch.no_grad():
            clean = encoder(crops[:1])[0]
        other = crops[1:].clone().requires_grad_(True)
        noise = torch.randn(crops[:1].shape, generator=torch.Generator().manual_seed(0)) * 0.03
        same = (crops[:1] + noise).requires_grad_(True)  # the same face, slightly off the clean point
        for label, x in (("other", other), ("same", same)):
            term = ensemble.score(encoder(x), clean, encoder.threshold, encoder.threshold_kind).sum()
            term.backward()
            terms[name, label], grads[name, label] = term.item(), x.grad.abs().sum().item()
    for name in ("dlib", "sface"):
        assert terms[name, "other"] == 0.0 and grads[name, "other"] == 0.0
        assert terms[name, "same"] > 0.8 and grads[name, "same"] > 0.0


def test_paper_config_is_plain_fixed_weighted_pgd_and_default_is_balanced():
    from dladiff.config import load_config

    paper, default = load_config("layer2_paper").layer2, load_config().layer2
    assert (paper.weighting, paper.momentum, paper.diversity_probability, paper.ti_kernel) == ("fixed", 0.0, 0.0, 0)
    assert default.weighting == "normalized" and default.hinge_margin >= 0 and default.encoders == "auto"
