"""Transfer techniques of layer 2 (MI, DI, TI, alignment diversity, feature losses) and its EOT option."""

import dataclasses

import numpy as np
import pytest
import torch

from dladiff.config import EOTConfig, load_config, with_overrides
from dladiff.data import to_tensor
from dladiff.layer2 import prepare_layer2
from dladiff.layer2.attack import attack_face
from dladiff.layer2.objective import FeatureTap, feature_similarity
from dladiff.layer2.problem import build_problem, template_variants
from dladiff.layer2.transforms import (
    diverse_input,
    gaussian_kernel,
    momentum,
    smooth_gradient,
)


def test_momentum_accumulates_l1_normalized_gradients():
    grad = torch.tensor([[1.0, -3.0]])
    first = momentum(grad, None, 1.0)
    assert torch.allclose(first, torch.tensor([[0.5, -1.5]]))  # ∇ / mean|∇|
    second = momentum(torch.tensor([[-2.0, 0.0]]), first, 0.5)
    assert torch.allclose(second, 0.5 * first + torch.tensor([[-2.0, 0.0]]))


def test_gradient_smoothing_is_a_normalized_gaussian():
    kernel = gaussian_kernel(7)
    assert kernel.shape == (7, 7) and torch.isclose(kernel.sum(), torch.tensor(1.0))
    assert kernel[3, 3] == kernel.max() and torch.equal(kernel, kernel.T)
    grad = torch.zeros(1, 3, 21, 21)
    grad[:, :, 10, 10] = 1.0
    smoothed = smooth_gradient(grad, kernel)
    assert smoothed.shape == grad.shape
    assert torch.allclose(smoothed[0, 0, 7:14, 7:14], kernel)


def test_diverse_inputs_shrink_and_pad_with_the_given_probability():
    crops = torch.rand(4, 3, 32, 32) * 2 - 1
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(diverse_input(crops, generator, 0.0, 1.2), crops)
    out = diverse_input(crops, generator, 1.0, 1.5)
    assert out.shape == crops.shape and not torch.equal(out, crops)
    assert (out == -1).flatten(1).any(1).all()  # every crop was shrunk: black padding shows


def test_template_variants_keep_the_own_template_first():
    own = np.array([[38.0, 52.0], [74.0, 52.0], [56.0, 72.0], [42.0, 92.0], [70.0, 92.0]])
    other = own * 1.3 + 5 + np.array([[0, 0], [0, 0], [0, 4.0], [0, 0], [0, 0]])
    variants = template_variants(own, [other])
    assert np.array_equal(variants[0], own)
    assert np.abs(variants[1] - own).max() < 4 and not np.allclose(variants[1], own)
    assert np.allclose(variants[1].mean(0), own.mean(0))


def test_feature_tap_records_conv_outputs_at_relative_depths():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 5, 3), torch.nn.Conv2d(5, 6, 3))
    x = torch.rand(2, 3, 16, 16)
    with FeatureTap(net, (0.3, 1.0)) as tap:
        net(x)
        maps = tap.collect()
    assert [m.shape[1] for m in maps] == [4, 6]
    assert not net[0]._forward_hooks  # hooks are removed on exit
    assert torch.isclose(feature_similarity(maps, maps), torch.tensor(1.0))


@pytest.fixture(scope="module")
def hanks_problem(real_photos):
    """Tom Hanks' aligned portrait with the dlib encoder and plain PGD (no jitter, no technique): a face problem.

    Weighting is the paper's fixed cosine: without jitter the first crop equals the clean one, where dlib's
    Euclidean distance (the normalized weighting's metric) has no gradient at all.
    """
    cfg = with_overrides(load_config(), layer2={"encoders": {"dlib": 1.0}, "detector": "dlib", "steps": 3,
                                                "weighting": "fixed", "native_verdicts": False,
                                                "jitter_translation": 0.0, "jitter_rotation": 0.0, "jitter_scale": 0.0,
                                                "momentum": 0.0, "diversity_probability": 0.0, "ti_kernel": 0})
    models = prepare_layer2(cfg.layer2)
    image = real_photos["hanks"]
    face = models.detector.detect(image)[0]
    x = to_tensor(image)
    return build_problem(face, face, x, x, models.encoders, cfg.layer2), models, cfg.layer2, (face, x)


def attack(problem, models, cfg, eot=None, **changes):
    return attack_face(problem, models, dataclasses.replace(cfg, **changes), 1.0, np.random.default_rng(0), eot).patch_delta


TECHNIQUES = {  # (the plain run's settings, the same with the technique switched on)
    "momentum": ({}, {"momentum": 1.0}),
    "input diversity": ({}, {"diversity_probability": 1.0, "diversity_shrink": 1.2}),
    "gradient smoothing": ({}, {"ti_kernel": 5}),
    "alignment samples": ({"jitter_translation": 1.0}, {"jitter_translation": 1.0, "align_samples": 2}),
    "feature loss": ({}, {"feature_weight": 1.0, "feature_depths": (0.5,)}),
}


def assert_changed_within_bound(problem, cfg, plain, changed):
    assert changed.shape == plain.shape
    assert not torch.allclose(changed, plain, atol=1e-4)
    assert changed.abs().max() <= cfg.epsilon + 1e-5
    assert ((problem.patch + changed).abs() <= 1 + 1e-6).all()


@pytest.mark.parametrize("technique", list(TECHNIQUES))
def test_each_technique_changes_the_update_and_keeps_the_bound(hanks_problem, technique):
    problem, models, cfg, _ = hanks_problem
    plain_changes, technique_changes = TECHNIQUES[technique]
    plain = attack(problem, models, cfg, **plain_changes)
    assert_changed_within_bound(problem, cfg, plain, attack(problem, models, cfg, **technique_changes))


def test_alignment_templates_change_the_update_and_keep_the_bound(hanks_problem):
    problem, models, cfg, (face, x) = hanks_problem
    several = dataclasses.replace(cfg, align_templates=("arcface",), align_samples=2)
    varied = build_problem(face, face, x, x, models.encoders, several)
    assert [len(v) for v in varied.alignments.values()] == [2]
    assert_changed_within_bound(varied, cfg, attack(problem, models, several), attack(varied, models, several))


def test_eot_changes_the_gradient_path_and_keeps_the_bound(hanks_problem):
    problem, models, cfg, _ = hanks_problem
    plain = attack(problem, models, cfg)
    never = EOTConfig(enabled=True, probability=0.0)
    assert torch.equal(attack(problem, models, cfg, eot=never), plain)  # no transform drawn: the same path
    assert torch.equal(attack(problem, models, cfg, eot=EOTConfig(enabled=False, probability=1.0)), plain)
    always = EOTConfig(enabled=True, probability=1.0, jpeg_quality=(60, 60), resize_scale=(0.7, 0.7), blur_sigma=(0.5, 0.5))
    through = attack(problem, models, cfg, eot=always)
    assert not torch.allclose(through, plain, atol=1e-4)
    assert through.abs().max() <= cfg.epsilon + 1e-5


def test_transfer_switches_are_validated():
    from dladiff.errors import ConfigError

    for bad in ({"momentum": -1.0}, {"diversity_shrink": 1.0}, {"align_samples": 0}, {"align_templates": ["vgg"]},
                {"feature_depths": [0.0]}, {"ti_kernel": -1}):
        with pytest.raises(ConfigError, match="layer2"):
            with_overrides(load_config(), layer2=bad)
