#!/usr/bin/env python
"""Backward-pass transfer techniques on layer 2's in-loop encoders; runs bench_layer2.py with them, prints its JSON.

    python scripts/transfer_backward.py --backward {none,linbp,sgm} [--linbp-start 0.5] [--sgm-gamma 0.5]
        [--free-norm] [bench_layer2.py's arguments ...]
    python scripts/transfer_backward.py --self-test

Both techniques leave every forward pass bit-identical and change only the gradient PGD signs
(issue 9 item 6, docs/transfer.md):

* ``linbp`` (Guo et al. 2020, "Backpropagating Linearly Improves Transferability of Adversarial
  Examples"): the ReLU/PReLU calls from relative depth ``--linbp-start`` on (share of the network's
  activation calls, in execution order) pass the gradient through unmasked, as if they were the
  identity. Without the paper's re-normalization of residual branches.
* ``sgm`` (Wu et al. 2020, "Skip Connections Matter"): the gradient through each residual branch
  is scaled by ``--sgm-gamma``, the skip path keeps its own. Residual units are the modules with a
  ``main`` and a ``shortcut`` (dlib's port); a network without them (SFace: a plain MobileFaceNet
  graph without ``Add`` nodes, mobileface through onnx2torch) is left unchanged, and the JSON says
  so (``backward.encoders.NAME.residual_units``).

Each patched encoder keeps, per sample, the input-gradient norm of its plain backward (one more
backward pass), so that the patch turns its gradient without re-weighting the ensemble;
``--free-norm`` drops that.

The patches live in this script (forward hooks on the residual branches, and a
``TorchFunctionMode`` around the network's forward that intercepts its activation calls), so the
encoders' modules are not edited. The printed JSON is bench_layer2.py's plus ``backward`` (the
settings and what each encoder got) and ``judge_values`` (per judge and condition, the cosine or
distance of each face and their mean).

Run from a git worktree with ``PYTHONPATH=.``: otherwise the installed (editable) ``dladiff`` runs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

ACTIVATIONS = (F.relu, torch.relu, F.prelu, torch.prelu)
"""The activation functions LinBP linearizes in the backward pass."""

_PLAIN = [False]
"""While True (:func:`plain_backward`), the patched backward rules give the network's own gradient."""


@contextlib.contextmanager
def plain_backward():
    """Within: :class:`LinearBackward` and :class:`ScaleBackward` backpropagate as the unpatched network."""
    _PLAIN[0] = True
    try:
        yield
    finally:
        _PLAIN[0] = False


def _slope_shape(slope: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """PReLU's slope broadcast like ``F.prelu``: one value, or one per channel (dim 1)."""
    if slope.nelement() == 1:
        return slope.reshape(())
    return slope.reshape((1, -1) + (1,) * (x.dim() - 2))


class LinearBackward(torch.autograd.Function):
    """``activation(x)`` forward; identity backward (LinBP), or the activation's own derivative under
    :func:`plain_backward` (ReLU: 1 where x > 0, else 0; PReLU: 1 where x > 0, else its slope, as ATen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, activation, slope: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, torch.zeros(()) if slope is None else _slope_shape(slope, x))
        return activation(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not _PLAIN[0]:
            return grad, None, None
        x, slope = ctx.saved_tensors
        return torch.where(x > 0, grad, grad * slope), None, None


class ScaleBackward(torch.autograd.Function):
    """Identity forward (a copy), gradient times ``gamma`` backward (SGM's decay on a residual branch)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, gamma: float) -> torch.Tensor:
        ctx.gamma = gamma
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (grad if _PLAIN[0] else grad * ctx.gamma), None


class ActivationCalls(TorchFunctionMode):
    """Counts the activation calls of one forward pass; those from index ``linear_from`` on get
    :class:`LinearBackward`. Calls made while one is being handled (an activation implemented
    through another) are not counted."""

    def __init__(self, linear_from: float = math.inf):
        super().__init__()
        self.linear_from, self.count, self.busy = linear_from, 0, False

    def activation(self, compute, x: torch.Tensor, slope: torch.Tensor | None) -> torch.Tensor:
        """``compute(x)``, counted, with a linear backward from index ``linear_from`` on."""
        if self.busy:
            return compute(x)
        index, self.count, self.busy = self.count, self.count + 1, True
        try:
            if index < self.linear_from or not (torch.is_grad_enabled() and x.requires_grad):
                return compute(x)
            return LinearBackward.apply(x, compute, slope)
        finally:
            self.busy = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in ACTIVATIONS:
            return func(*args, **kwargs)
        rest = args[1:]
        slope = (rest[0] if rest else kwargs.get("weight")) if func in (F.prelu, torch.prelu) else None
        return self.activation(lambda t: func(t, *rest, **kwargs), args[0], slope)


@contextlib.contextmanager
def activation_calls(linear_from: float = math.inf):
    """:class:`ActivationCalls` active for torch's activation functions and for the ``PRelu`` nodes of
    :class:`~dladiff.faces.onnx_convert.NativeGraph` (``onnx_convert._prelu``, which may run its own
    autograd function around ``F.prelu``)."""
    from dladiff.faces import onnx_convert

    mode, prelu = ActivationCalls(linear_from), onnx_convert._prelu
    onnx_convert._prelu = lambda x, slope: mode.activation(lambda t: prelu(t, slope), x, slope)
    try:
        with mode:
            yield mode
    finally:
        onnx_convert._prelu = prelu


def keep_input_gradient_norm(forward):
    """``forward`` whose input gradient is rescaled, per sample, to the L2 norm of the unpatched network's.

    A hook on the output runs the plain backward (:func:`plain_backward`) from there to the input
    first, so that a patched encoder keeps its share of the ensemble's summed gradient and only
    its direction changes. Costs one more backward pass through the network.
    """

    def wrapped(x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and x.requires_grad):
            return forward(x)
        entry = x.view_as(x)
        out = forward(entry)
        norms = {}

        def on_output(grad):
            if _PLAIN[0]:  # the plain pass below reaches this hook too
                return grad
            with plain_backward():
                (plain,) = torch.autograd.grad(out, entry, grad, retain_graph=True)
            norms["plain"] = plain.flatten(1).norm(dim=1)
            return grad

        def on_input(grad):
            if _PLAIN[0]:
                return grad
            scale = norms.pop("plain") / grad.flatten(1).norm(dim=1).clamp_min(1e-30)
            return grad * scale.reshape((-1,) + (1,) * (grad.dim() - 1))

        out.register_hook(on_output)
        entry.register_hook(on_input)
        return out

    return wrapped


@dataclass
class BackwardPatch:
    """What :func:`patch_backward` did to one network, and how to undo it."""

    technique: str
    activations: int = 0  # activation calls per forward pass
    linear_activations: int = 0  # of them with a linear backward (LinBP)
    residual_units: int = 0  # residual branches whose gradient is scaled (SGM)
    keep_norm: bool = False  # input gradient rescaled to the plain backward's norm
    _undo: list = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        return {"activations": self.activations, "linear_activations": self.linear_activations,
                "residual_units": self.residual_units, "keep_norm": self.keep_norm}

    def remove(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()


def count_activations(net: torch.nn.Module, input_shape: tuple[int, ...]) -> int:
    """Activation calls in one forward pass of ``net`` on zeros of ``input_shape``."""
    with torch.no_grad(), activation_calls() as mode:
        net(torch.zeros(input_shape))
    return mode.count


def residual_units(net: torch.nn.Module) -> list[torch.nn.Module]:
    """The residual units of ``net``: modules with a ``main`` branch and a ``shortcut`` (dlib's ``_Residual``)."""
    return [m for m in net.modules() if isinstance(getattr(m, "main", None), torch.nn.Module)
            and isinstance(getattr(m, "shortcut", None), torch.nn.Module)]


def patch_backward(net: torch.nn.Module, input_shape: tuple[int, ...], technique: str,
                   linbp_start: float = 0.5, sgm_gamma: float = 0.5, keep_norm: bool = True) -> BackwardPatch:
    """Patch ``net`` in place so that its forward is unchanged and its backward follows ``technique``.

    ``linbp``: activation calls with index ≥ ⌊linbp_start · N⌋ (N per forward pass, counted on
    zeros of ``input_shape``) backpropagate as the identity. ``sgm``: each residual branch's output
    gradient is scaled by ``sgm_gamma``. ``none``: nothing. ``keep_norm``: the input gradient keeps
    the unpatched network's norm per sample (:func:`keep_input_gradient_norm`). Undo with
    :meth:`BackwardPatch.remove`.
    """
    patch = BackwardPatch(technique, activations=count_activations(net, input_shape))
    if technique == "linbp":
        if not 0.0 <= linbp_start <= 1.0:
            raise ValueError(f"--linbp-start must be in [0, 1], got {linbp_start}")
        start = math.floor(linbp_start * patch.activations)
        patch.linear_activations = patch.activations - start
        forward = net.forward

        def linear_forward(*args, **kwargs):
            with activation_calls(start):
                return forward(*args, **kwargs)

        net.forward = linear_forward
        patch._undo.append(lambda: delattr(net, "forward"))
    elif technique == "sgm":
        if not 0.0 < sgm_gamma <= 1.0:
            raise ValueError(f"--sgm-gamma must be in (0, 1], got {sgm_gamma}")
        units = residual_units(net)
        patch.residual_units = len(units)
        for unit in units:
            handle = unit.main.register_forward_hook(lambda _m, _i, out: ScaleBackward.apply(out, sgm_gamma))
            patch._undo.append(handle.remove)
    elif technique != "none":
        raise ValueError(f"unknown backward technique {technique!r}: none, linbp or sgm")
    if keep_norm and (patch.linear_activations or patch.residual_units):
        patch.keep_norm = True
        inner, own = net.forward, "forward" in vars(net)
        net.forward = keep_input_gradient_norm(inner)
        patch._undo.append(lambda: setattr(net, "forward", inner) if own else delattr(net, "forward"))
    return patch


def patch_encoders(encoders: dict, technique: str, linbp_start: float, sgm_gamma: float,
                   keep_norm: bool = True) -> dict[str, BackwardPatch]:
    """:func:`patch_backward` on each encoder's network (``encoder.net``, fed ``(1, 3, s, s)``)."""
    return {name: patch_backward(encoder.net, (1, 3, encoder.crop_size, encoder.crop_size), technique,
                                 linbp_start, sgm_gamma, keep_norm) for name, encoder in encoders.items()}


def judge_values(rows: list[dict]) -> dict:
    """Per judge and condition: each face's cosine or distance (None: not detected) and the mean of those found."""
    out: dict = {}
    for row in rows:
        for face in row["native"]:
            for judge, conditions in face.items():
                for condition, verdict in conditions.items():
                    value = verdict.get("cosine", verdict.get("distance"))
                    out.setdefault(judge, {}).setdefault(condition, {"values": []})["values"].append(value)
    for conditions in out.values():
        for entry in conditions.values():
            found = [v for v in entry["values"] if v is not None]
            entry["mean"] = round(sum(found) / len(found), 4) if found else None
    return out


def run_bench(bench_args: list[str], technique: str, linbp_start: float, sgm_gamma: float, keep_norm: bool) -> dict:
    """bench_layer2.py's result with the encoders patched right after layer 2 loads them."""
    import dladiff.layer2

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_layer2

    prepare, patches = dladiff.layer2.prepare_layer2, {}

    def prepare_patched(cfg):
        models = prepare(cfg)
        patches.update(patch_encoders(models.encoders, technique, linbp_start, sgm_gamma, keep_norm))
        return models

    dladiff.layer2.prepare_layer2 = prepare_patched
    sys.argv = ["bench_layer2.py", *bench_args]
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            bench_layer2.main()
    finally:
        dladiff.layer2.prepare_layer2 = prepare
    result = json.loads(captured.getvalue())
    settings = {"technique": technique, "linbp_start": linbp_start if technique == "linbp" else None,
                "sgm_gamma": sgm_gamma if technique == "sgm" else None, "keep_norm": keep_norm,
                "bench_args": bench_args}
    return {"backward": {**settings, "encoders": {n: p.summary() for n, p in patches.items()}},
            "judge_values": judge_values(result["photos"]), **result}


def self_test() -> dict:
    """Each technique on dlib and SFace on a real face (the astronaut's, resized to the encoder's crop):
    forward outputs bit-identical, input gradients different (for SGM: dlib only, SFace has no
    residual units), with ``keep_norm`` the plain gradient's norm, and :meth:`BackwardPatch.remove`
    restores the plain gradient exactly. Raises AssertionError otherwise; returns the figures."""
    from skimage import data

    from dladiff.faces.encoders import load_encoder

    face = torch.from_numpy(data.astronaut()[30:230, 150:350].copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    target = torch.randn(1, 128, generator=torch.Generator().manual_seed(0))
    report = {}
    for name in ("dlib", "sface"):
        encoder = load_encoder(name, "~/.insightface/models")
        crops = F.interpolate(face, size=(encoder.crop_size, encoder.crop_size), mode="bilinear", align_corners=False)

        def run(encoder=encoder, crops=crops):
            x = crops.clone().requires_grad_(True)
            out = encoder(x)
            (grad,) = torch.autograd.grad((out[:, :128] * target).sum(), x)
            return out.detach(), grad

        plain_out, plain_grad = run()
        for technique in ("linbp", "sgm"):
            for keep_norm in (False, True):
                patch = patch_encoders({name: encoder}, technique, 0.5, 0.5, keep_norm)[name]
                out, grad = run()
                patch.remove()
                after_out, after_grad = run()
                changed = patch.linear_activations > 0 or patch.residual_units > 0
                entry = {**patch.summary(), "forward_equal": torch.equal(out, plain_out),
                         "gradient_cosine_to_plain": round(float(F.cosine_similarity(
                             grad.flatten(), plain_grad.flatten(), dim=0)), 4),
                         "gradient_norm_ratio": round(float(grad.norm() / plain_grad.norm()), 4),
                         "undone": torch.equal(after_out, plain_out) and torch.equal(after_grad, plain_grad)}
                report[f"{name}/{technique}/keep_norm={keep_norm}"] = entry
                assert entry["forward_equal"] and entry["undone"], (name, technique, entry)
                assert torch.equal(grad, plain_grad) != changed, (name, technique, entry)
                assert not (patch.keep_norm and abs(entry["gradient_norm_ratio"] - 1) > 1e-4), (name, technique, entry)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backward", choices=("none", "linbp", "sgm"), default="none")
    parser.add_argument("--linbp-start", type=float, default=0.5,
                        help="relative depth (share of activation calls) from which LinBP linearizes")
    parser.add_argument("--sgm-gamma", type=float, default=0.5, help="SGM's gradient decay on residual branches")
    parser.add_argument("--free-norm", action="store_true",
                        help="let the patch change each encoder's input-gradient norm (default: keep the plain one)")
    parser.add_argument("--self-test", action="store_true", help="check the patches on dlib and SFace, then exit")
    args, bench_args = parser.parse_known_args()
    if args.self_test:
        result = self_test()
    else:
        result = run_bench(bench_args, args.backward, args.linbp_start, args.sgm_gamma, not args.free_norm)
    json.dump(result, sys.stdout, indent=1, default=str)
    print()


if __name__ == "__main__":
    main()
