"""Purification transforms on known images, and their differentiable EOT twins."""

import numpy as np
import pytest
import torch

from dladiff.data import psnr, to_tensor
from dladiff.errors import DladiffError
from dladiff.pgd import pgd_update
from dladiff.config import EOTConfig
from dladiff.eot import diff_jpeg, diff_resize, eot_transform, gaussian_blur, quantization_table
from dladiff.purify import blur_uint8, jpeg_uint8, parse_purify, resize_uint8


@pytest.fixture(scope="module")
def face(real_photos) -> np.ndarray:
    """A 256² crop of the astronaut portrait (face and background texture)."""
    return np.ascontiguousarray(real_photos["astronaut"][0:256, 128:384])


def _uint8(x: torch.Tensor) -> np.ndarray:
    return np.clip(np.round((x[0].detach().permute(1, 2, 0).numpy() + 1) * 127.5), 0, 255).astype(np.uint8)


def _smooth_image(size=96) -> np.ndarray:
    """Low-frequency colour gradients: resampling should barely change it."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    channels = [0.5 + 0.4 * np.sin(2 * np.pi * xx), 0.5 + 0.4 * np.cos(2 * np.pi * yy), 0.3 + 0.5 * xx * yy]
    return np.round(np.stack(channels, axis=-1) * 255).astype(np.uint8)


def test_parse_purify_alone_and_in_sequence():
    transforms = parse_purify("jpeg:75, resize:0.5,blur:1.0,resize:0.5+jpeg:90")
    assert [t.name for t in transforms] == ["jpeg:75", "resize:0.5", "blur:1", "resize:0.5+jpeg:90"]
    assert transforms[3].steps == (("resize", 0.5), ("jpeg", 90.0))
    assert [t.name for t in parse_purify("jpeg,blur")] == ["jpeg:75", "blur:1"]


@pytest.mark.parametrize("spec, message", [
    ("", "at least one"), ("webp:80", "unknown transform"), ("jpeg:abc", "must be a number"),
    ("jpeg:101", "1..100"), ("jpeg:75.5", "1..100"), ("resize:0", r"\(0, 1\]"), ("blur:-1", "sigma > 0"),
])
def test_parse_purify_rejects_bad_specs(spec, message):
    with pytest.raises(DladiffError, match=message):
        parse_purify(spec)


def test_sequence_applies_steps_in_order(face):
    (chained,) = parse_purify("resize:0.5+jpeg:75")
    np.testing.assert_array_equal(chained(face), jpeg_uint8(resize_uint8(face, 0.5), 75))


def test_jpeg_quality_100_is_near_identity(face):
    assert psnr(jpeg_uint8(face, 100), face) > 38
    assert psnr(_uint8(diff_jpeg(to_tensor(face), 100)), face) > 38
    assert quantization_table(100).eq(1).all()


def test_quantization_table_follows_ijg_scaling():
    assert quantization_table(50)[0, 0] == 16 and quantization_table(75)[0, 0] == 8
    assert quantization_table(10, chroma=True).max() == 255


def test_differentiable_jpeg_matches_pil(face):
    """Same quality, same image: the approximation is far closer to PIL's output than JPEG is to the original."""
    x = to_tensor(face)
    for quality in (75, 50):
        pil = jpeg_uint8(face, quality)
        ours = _uint8(diff_jpeg(x, quality))
        assert psnr(ours, pil) > 40
        assert psnr(ours, pil) > psnr(pil, face) + 6
    assert psnr(_uint8(diff_jpeg(x, 75, rounding="cubic")), jpeg_uint8(face, 75)) > 38


def test_differentiable_jpeg_keeps_odd_sizes():
    x = torch.rand(2, 3, 37, 50) * 2 - 1
    assert diff_jpeg(x, 75).shape == x.shape


def test_resize_round_trip_error_is_small():
    smooth = _smooth_image()
    assert np.abs(resize_uint8(smooth, 0.5).astype(int) - smooth).max() <= 3
    assert np.abs(_uint8(diff_resize(to_tensor(smooth), 0.5)).astype(int) - smooth).max() <= 3
    np.testing.assert_array_equal(resize_uint8(smooth, 1.0), smooth)


def test_differentiable_resize_matches_pil(face):
    pil = resize_uint8(face, 0.5)
    assert psnr(_uint8(diff_resize(to_tensor(face), 0.5)), pil) > 38


def test_blur_of_a_constant_image_is_constant():
    flat = np.full((40, 30, 3), 173, dtype=np.uint8)
    np.testing.assert_array_equal(blur_uint8(flat, 1.5), flat)
    x = torch.full((1, 3, 40, 30), 0.3)
    torch.testing.assert_close(gaussian_blur(x, 2.0), x)


def test_blur_smooths_and_keeps_the_mean(face):
    blurred = blur_uint8(face, 1.0)
    assert abs(blurred.astype(float).mean() - face.astype(float).mean()) < 0.5
    assert np.abs(np.diff(blurred.astype(float), axis=1)).mean() < np.abs(np.diff(face.astype(float), axis=1)).mean()


ALWAYS = EOTConfig(enabled=True, probability=1.0)


def test_gradients_flow_through_every_transform(face):
    x = to_tensor(face[:64, :64]).requires_grad_(True)
    for transform in (lambda t: diff_jpeg(t, 75), lambda t: diff_jpeg(t, 75, "cubic"), lambda t: diff_resize(t, 0.5),
                      lambda t: gaussian_blur(t, 1.0), lambda t: eot_transform(t, torch.Generator().manual_seed(0), ALWAYS)):
        (grad,) = torch.autograd.grad(transform(x).square().sum(), x)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_eot_is_reproducible_random_and_bounded(face):
    x = to_tensor(face[:64, :64])
    first = eot_transform(x, torch.Generator().manual_seed(3), ALWAYS)
    torch.testing.assert_close(first, eot_transform(x, torch.Generator().manual_seed(3), ALWAYS))
    assert not torch.equal(first, eot_transform(x, torch.Generator().manual_seed(4), ALWAYS))
    assert first.shape == x.shape and first.min() >= -1 and first.max() <= 1
    never = EOTConfig(enabled=True, probability=0.0)
    torch.testing.assert_close(eot_transform(x, torch.Generator().manual_seed(3), never), x)


def test_eot_draws_a_fixed_amount_of_randomness():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    eot_transform(torch.zeros(1, 3, 16, 16), g1, ALWAYS)
    eot_transform(torch.zeros(1, 3, 16, 16), g2, EOTConfig(enabled=True, probability=0.0))
    assert torch.equal(g1.get_state(), g2.get_state())


def test_eot_gradient_differs_and_pgd_step_keeps_the_bound(face):
    """A PGD step through EOT follows another gradient than the plain one, and Π still holds."""
    x = to_tensor(face[:64, :64])
    target = torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    delta = torch.zeros_like(x, requires_grad=True)

    def grad_of(transform):
        (grad,) = torch.autograd.grad((transform(x + delta) - target).square().mean(), delta)
        return grad

    plain = grad_of(lambda t: t)
    through = grad_of(lambda t: eot_transform(t, torch.Generator().manual_seed(1), ALWAYS))
    assert (plain.sign() != through.sign()).float().mean() > 0.05
    stepped = pgd_update(delta.detach(), through, x, 0.02, 0.015)
    assert stepped.abs().max() <= 0.015 + 1e-7 and (x + stepped).abs().max() <= 1 + 1e-7
