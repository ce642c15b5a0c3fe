"""scripts/transfer_backward.py: LinBP and SGM change only the backward pass of the real in-loop encoders."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "transfer_backward.py"


@pytest.fixture(scope="module")
def backward():
    spec = importlib.util.spec_from_file_location("transfer_backward", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_patches_keep_the_forward_and_change_the_gradient(backward):
    report = backward.self_test()  # asserts forward equality, gradient change, norm keeping and undo itself
    assert report["dlib/linbp/keep_norm=False"]["linear_activations"] > 0
    assert report["dlib/sgm/keep_norm=False"]["residual_units"] == 14
    assert report["sface/sgm/keep_norm=True"]["residual_units"] == 0  # a MobileFaceNet graph without Add nodes
    for key in ("dlib/linbp", "dlib/sgm", "sface/linbp"):
        assert report[f"{key}/keep_norm=False"]["gradient_cosine_to_plain"] < 0.99
        assert report[f"{key}/keep_norm=True"]["gradient_norm_ratio"] == pytest.approx(1.0, abs=1e-4)


def test_linear_backward_passes_the_gradient_unmasked(backward):
    x = torch.tensor([-2.0, -0.5, 0.5, 2.0], requires_grad=True)
    slope = torch.tensor([0.25])
    with backward.activation_calls(linear_from=0):
        relu, prelu = torch.relu(x), torch.nn.functional.prelu(x, slope)
    assert torch.equal(relu, torch.relu(x.detach())) and torch.equal(prelu, torch.nn.functional.prelu(x.detach(), slope))
    (linear,) = torch.autograd.grad((relu + prelu).sum(), x, retain_graph=True)
    assert torch.equal(linear, torch.full((4,), 2.0))
    with backward.plain_backward():
        (plain,) = torch.autograd.grad((relu + prelu).sum(), x)
    assert torch.equal(plain, torch.tensor([0.25, 0.25, 2.0, 2.0]))


def test_linbp_start_counts_activation_calls(backward):
    net = torch.nn.Sequential(*(m for _ in range(4) for m in (torch.nn.Linear(3, 3), torch.nn.ReLU())))
    patch = backward.patch_backward(net, (1, 3), "linbp", linbp_start=0.5, keep_norm=False)
    assert (patch.activations, patch.linear_activations) == (4, 2)
    patch.remove()
    assert "forward" not in vars(net)
    with pytest.raises(ValueError, match="unknown backward technique"):
        backward.patch_backward(net, (1, 3), "ghost")
