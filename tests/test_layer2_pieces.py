"""Layer 2's pieces one by one (the plain loop, gradient and input transforms, the warp, the objective), on tiny
random encoders, and the paper config as the plain sign-PGD of Eqs. 10-11."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dladiff.config import load_config
from dladiff.faces.align import ARCFACE_TEMPLATE_112, warp_to_crop
from dladiff.faces.detect import make_face
from dladiff.faces.encoders import IdentityEncoder
from dladiff.layer2.attack import FaceRun, attack_face, gradient_direction, identity_objective
from dladiff.layer2.models import Layer2Models
from dladiff.layer2.pgd import Evaluation, sign_pgd
from dladiff.layer2.photos import compose_deltas, quantize
from dladiff.layer2.problem import PatchWarp, build_problem
from dladiff.layer2.transforms import (AlignmentSampler, Jitter, Momentum, chain, diverse_input, gaussian_kernel, momentum,
                                       smooth_gradient)


class TinyEncoder(IdentityEncoder):
    """A random conv net on 32² crops, ArcFace template scaled, cosine threshold 0.3."""

    def __init__(self, seed: int, name: str = "tiny"):
        super().__init__()
        torch.manual_seed(seed)
        self.name, self.crop_size, self.threshold, self.threshold_kind = name, 32, 0.3, "cosine"
        self.template = (ARCFACE_TEMPLATE_112 * (32 / 112)).astype(np.float32)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.Tanh(), torch.nn.Conv2d(8, 8, 3),
                                       torch.nn.Flatten(), torch.nn.LazyLinear(16))
        self.net(torch.zeros(1, 3, 32, 32))
        self.requires_grad_(False)

    def forward(self, crops):
        return self.net(crops)


@pytest.fixture(scope="module")
def tiny_face():
    """A random 80² photo in [-1, 1], a face whose landmarks are the 32² template moved to (20, 18), two tiny encoders."""
    generator = torch.Generator().manual_seed(0)
    photo = torch.rand(1, 3, 80, 80, generator=generator) * 2 - 1
    landmarks = ARCFACE_TEMPLATE_112 * (40 / 112) + np.array([20.0, 18.0])
    face = make_face([18, 14, 62, 62], landmarks, 1.0)
    encoders = {"a": TinyEncoder(1, "a"), "b": TinyEncoder(2, "b")}
    return photo, face, encoders, {"a": 2.0, "b": 1.0}


def paper_problem(tiny_face, **changes):
    photo, face, encoders, weights = tiny_face
    cfg = dataclasses.replace(load_config("layer2_paper").layer2, crop_size=32, **changes)
    problem = build_problem(face, face, photo, photo, encoders, cfg)
    return problem, Layer2Models(None, encoders, weights), cfg


def reference_plain_pgd(problem, encoders, weights, cfg):
    """Eqs. 10-11 written out: minimize Σ w·cos / Σ w by δ ← clip(δ − α·sign ∇), stop once below τ."""
    warp = PatchWarp(problem, cfg.crop_size, cfg.full_resolution)
    delta, x = torch.zeros_like(warp.reference), warp.reference
    for _ in range(cfg.steps):
        delta.requires_grad_(True)
        patch = warp(delta)
        terms = [weights[n] * F.cosine_similarity(e(warp_to_crop(patch, torch.as_tensor(problem.alignments[n][0][None], dtype=torch.float32),
                                                                   e.crop_size)), problem.clean_embeddings[n][None], dim=1).mean()
                 for n, e in encoders.items()]
        similarity = sum(terms) / sum(weights.values())
        if float(similarity.detach()) < cfg.threshold:
            break
        (grad,) = torch.autograd.grad(similarity, delta)
        delta = (delta.detach() - cfg.step_size * grad.sign()).clamp(-cfg.epsilon, cfg.epsilon)
        delta = (x + delta).clamp(-1, 1) - x
    return warp(delta).detach() - problem.patch


def test_paper_config_switches_every_extra_off():
    cfg = load_config("layer2_paper")
    l2 = cfg.layer2
    assert l2.weighting == "fixed" and not cfg.eot.enabled and not cfg.budget.face_mask and not cfg.budget.perceptual
    assert (l2.momentum, l2.diversity_probability, l2.ti_kernel, l2.feature_weight) == (0, 0, 0, 0)
    assert (l2.align_samples, l2.align_templates, l2.landmark_sources) == (1, (), ())
    assert gradient_direction(l2) is None


def test_paper_config_is_exactly_the_plain_sign_pgd(tiny_face):
    """With the paper config (jitter off, so the draws play no part), the assembled attack gives the hand-written loop's δ."""
    problem, models, cfg = paper_problem(tiny_face, steps=12, jitter_translation=0.0, jitter_rotation=0.0,
                                         jitter_scale=0.0, threshold=-1.0)
    objective = identity_objective(problem, PatchWarp(problem, 32, False), models, cfg, np.random.default_rng(0))
    assert (objective.diverse, objective.eot, objective.features) == (None, None, None)
    run = attack_face(problem, models, cfg, 1.0, np.random.default_rng(0))
    expected = reference_plain_pgd(problem, models.encoders, models.weights, cfg)
    assert run.report["steps"] == 12 and expected.abs().max() > 0
    assert torch.equal(run.patch_delta, expected)


def test_paper_stop_rule_stops_below_tau(tiny_face):
    problem, models, cfg = paper_problem(tiny_face, steps=50, jitter_translation=0.0, jitter_rotation=0.0,
                                         jitter_scale=0.0, threshold=0.999, step_size=0.02)
    run = attack_face(problem, models, cfg, 1.0, np.random.default_rng(0))
    assert 0 < run.report["steps"] < 50 and run.report["final_similarity"] < 0.999
    assert torch.equal(run.patch_delta, reference_plain_pgd(problem, models.encoders, models.weights,
                                                            dataclasses.replace(cfg, steps=run.report["steps"] + 1)))


def test_sign_pgd_projects_to_the_ball_and_the_pixel_range():
    reference = torch.linspace(-1, 1, 48).view(1, 3, 4, 4)
    target = torch.full_like(reference, 5.0)

    def objective(delta):
        return Evaluation(((reference + delta - target) ** 2).sum(), 0.0, False)

    delta, steps, _ = sign_pgd(objective, reference, 0.1, 0.03, 10)
    assert steps == 10 and delta.shape == reference.shape
    assert delta.abs().max() <= 0.1 + 1e-7 and (reference + delta).max() <= 1.0
    assert torch.allclose(delta[reference <= 0.9], torch.tensor(0.1))  # pushed to the bound where the range allows
    assert torch.allclose((reference + delta)[reference > 0.9], torch.tensor(1.0))


def test_sign_pgd_stops_before_stepping_when_done():
    calls = []

    def objective(delta):
        calls.append(delta.detach().clone())
        return Evaluation(delta.sum(), float(len(calls)), len(calls) == 3)

    delta, steps, value = sign_pgd(objective, torch.zeros(1, 1, 2, 2), 1.0, 0.1, 10)
    assert (steps, value, len(calls)) == (2, 3.0, 3)
    assert torch.allclose(delta, torch.full((1, 1, 2, 2), -0.2))  # two descent steps on Σδ


def test_momentum_accumulates_as_mi_fgsm():
    grads = [torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    state, g = Momentum(0.5), None
    for grad in grads:
        out = state(grad)
        l1 = grad.abs().flatten(1).mean(1).view(-1, 1, 1, 1)
        g = grad / l1 if g is None else 0.5 * g + grad / l1
        assert torch.allclose(out, g)
    assert torch.equal(momentum(grads[0], None, 0.5), grads[0] / grads[0].abs().flatten(1).mean(1).view(-1, 1, 1, 1))


def test_ti_kernel_sums_to_one_and_smooths():
    kernel = gaussian_kernel(7)
    assert kernel.shape == (7, 7) and torch.isclose(kernel.sum(), torch.tensor(1.0))
    grad = torch.randn(1, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    smoothed = smooth_gradient(grad, kernel)
    assert smoothed.shape == grad.shape

    def variation(t):
        return (t[..., 1:, :] - t[..., :-1, :]).abs().mean() + (t[..., 1:] - t[..., :-1]).abs().mean()

    assert variation(smoothed) < 0.5 * variation(grad)
    constant = smooth_gradient(torch.ones(1, 2, 16, 16), kernel)
    assert torch.allclose(constant[..., 3:-3, 3:-3], torch.tensor(1.0))  # a constant interior is kept


def test_default_direction_is_smoothing_then_momentum():
    cfg = load_config().layer2
    direction = gradient_direction(cfg)
    grads = [torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    expected = Momentum(cfg.momentum)
    for grad in grads:
        assert torch.equal(direction(grad), expected(smooth_gradient(grad, gaussian_kernel(cfg.ti_kernel))))
    assert chain() is None


def test_diverse_input_keeps_the_size_and_pads_with_fill():
    crops = torch.rand(5, 6, 40, 40) * 2 - 1
    out = diverse_input(crops, torch.Generator().manual_seed(0), 1.0, 1.3, fill=-1.0)
    assert out.shape == crops.shape
    border = torch.cat([out[..., 0, :], out[..., -1, :], out[..., :, 0], out[..., :, -1]], -1)
    assert ((border == -1).flatten(1).any(1)).all()  # each crop shrunk: canvas shows at an edge
    never = diverse_input(crops, torch.Generator().manual_seed(0), 0.0, 1.3)
    assert never is crops


def test_alignment_sampler_shapes_and_cycle():
    variants = [np.eye(2, 3) * (i + 1) for i in range(3)]
    sampler = AlignmentSampler({"a": variants}, np.random.default_rng(0), 4, Jitter(0.0, 0.0, 0.0))
    matrices = sampler("a", 32)
    assert matrices.shape == (4, 2, 3) and matrices.dtype == torch.float32
    first = int(matrices[0, 0, 0]) - 1
    assert [int(m[0, 0]) - 1 for m in matrices] == [(first + i) % 3 for i in range(4)]
    jittered = AlignmentSampler({"a": variants[:1]}, np.random.default_rng(0), 2, Jitter(1.0, 1.0, 0.01))("a", 32)
    assert not torch.allclose(jittered[0], jittered[1]) and torch.allclose(jittered[0, :, :2], torch.eye(2), atol=0.1)


@pytest.mark.parametrize("full_resolution", [False, True])
def test_patch_warp_keeps_the_bound_and_the_footprint(tiny_face, full_resolution):
    problem, _, cfg = paper_problem(tiny_face)
    warp = PatchWarp(problem, 32, full_resolution)
    size = 32 if not full_resolution else problem.patch.shape[-1]
    assert warp.reference.shape[-1] == size
    assert torch.equal(warp(torch.zeros_like(warp.reference)), problem.patch.clamp(-1, 1))
    delta = (torch.rand(warp.reference.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1) * cfg.epsilon
    change = warp(delta) - problem.patch
    assert change.abs().max() <= cfg.epsilon + 1e-6 and (problem.patch + change).abs().max() <= 1
    assert (change == 0).any()  # pixels outside the aligned face's footprint stay


def test_objective_starts_at_one_and_reports_weighted_terms(tiny_face):
    problem, models, cfg = paper_problem(tiny_face, jitter_translation=0.0, jitter_rotation=0.0, jitter_scale=0.0)
    warp = PatchWarp(problem, 32, False)
    objective = identity_objective(problem, warp, models, cfg, np.random.default_rng(0))
    evaluation = objective(torch.zeros_like(warp.reference))
    assert abs(evaluation.value - 1.0) < 1e-5 and not evaluation.done  # clean face: cosine 1 for every encoder


def test_compose_projects_overlaps_and_quantize_keeps_the_bound(tiny_face):
    problem, _, _ = paper_problem(tiny_face)
    photo = tiny_face[0]
    run = FaceRun(torch.full_like(problem.patch, 0.04), {})
    total = compose_deltas(photo, [problem, problem], [run, run], 0.05)  # the same face twice: 0.08 clipped to 0.05
    x0, y0, x1, y1 = problem.box
    inside = total[..., y0:y1, x0:x1]
    assert inside.abs().max() <= 0.05 + 1e-7 and total[..., :y0, :].abs().max() == 0
    base = np.full((4, 4, 3), 250, np.uint8)
    out = quantize(base, np.full((4, 4, 3), 7.9), 6.4)
    assert out.max() == 255 and (out.astype(int) - 250).max() == 5  # clipped to 0..255 and floor(6.4) = 6
    assert (quantize(base, np.full((4, 4, 3), -7.9), 6.4).astype(int) - 250).min() == -6


def test_an_encoder_past_its_hinge_gets_no_backward(tiny_face):
    """Normalized + hinge: an encoder whose every sample is past threshold by the margin adds a zero term and no backward."""
    problem, models, cfg = paper_problem(tiny_face, weighting="normalized", hinge_margin=0.3, jitter_translation=0.0,
                                         jitter_rotation=0.0, jitter_scale=0.0)
    problem = dataclasses.replace(problem, clean_embeddings={**problem.clean_embeddings,
                                                             "b": -problem.clean_embeddings["b"]})  # cosine −1: far past
    warp = PatchWarp(problem, 32, False)
    objective = identity_objective(problem, warp, models, cfg, np.random.default_rng(0))
    backward_calls = []
    encoder_b = models.encoders["b"]
    original = encoder_b.forward

    def counted(crops):
        out = original(crops)
        if out.requires_grad:
            out.register_hook(lambda grad: backward_calls.append(1))
        return out

    encoder_b.forward = counted
    try:
        delta = torch.zeros_like(warp.reference).requires_grad_(True)
        evaluation = objective(delta + 0.01 * torch.randn(delta.shape, generator=torch.Generator().manual_seed(0)))
        (grad,) = torch.autograd.grad(evaluation.loss, delta)
    finally:
        encoder_b.forward = original
    assert backward_calls == [] and grad.abs().sum() > 0  # encoder a still pulls
    ensemble = objective.ensemble
    a, clean = torch.randn(3, 16), torch.randn(16)
    assert ensemble.saturated(-clean.expand(3, 16), clean, 0.3, "cosine")
    assert not ensemble.saturated(clean.expand(3, 16) + 0.01 * a, clean, 0.3, "cosine")
    assert not dataclasses.replace(ensemble, weighting="fixed").saturated(-clean.expand(3, 16), clean, 0.3, "cosine")
