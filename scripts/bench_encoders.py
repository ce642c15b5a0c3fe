"""Milliseconds of one forward + backward pass of each offline encoder on one crop; prints JSON.

    OMP_NUM_THREADS=1 python scripts/bench_encoders.py [--threads 1] [--rounds 10] [--compare-unfolded]

One PGD step of layer 2 is about one such pass per encoder (plus warps, EOT and DI). Median over
``--rounds`` rounds of 4 passes each, after a warm-up. ``--compare-unfolded`` also builds each
encoder as it was before the kernel changes of docs/layer2.md ("Speed"): batch norms / dlib's
``affine_`` layers kept apart from their convolutions and ATen's PReLU backward; both versions
are timed in the same process, alternating round by round, and their outputs compared.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import dladiff.faces.dlib_resnet as dlib_resnet
import dladiff.faces.onnx_convert as onnx_convert
from dladiff.faces.opencv_zoo import float_sface_path


def aten_prelu(x: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    """ONNX PRelu through ``F.prelu`` and its ATen backward (the kernel before ``_FrozenPReLU``)."""
    return torch.nn.functional.prelu(x, slope.reshape(-1))


def build(unfolded: bool) -> dict[str, tuple[torch.nn.Module, int]]:
    """SFace (112² input) and dlib's ResNet (150²), folded as the package builds them or unfolded."""
    fold_graph, fold_dlib = onnx_convert.fold_batch_norms, dlib_resnet._fold_affines
    if unfolded:
        onnx_convert.fold_batch_norms = lambda nodes, constants, output: nodes
        dlib_resnet._fold_affines = list
    try:
        return {"sface": (onnx_convert.onnx_to_torch(float_sface_path()), 112),
                "dlib": (dlib_resnet.load_dlib_resnet(), 150)}
    finally:
        onnx_convert.fold_batch_norms, dlib_resnet._fold_affines = fold_graph, fold_dlib


def passes_ms(net: torch.nn.Module, x: torch.Tensor, repeats: int = 4) -> float:
    """Mean milliseconds of ``repeats`` forward + backward passes to the input."""
    torch.autograd.grad(net(x).sum(), x)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.autograd.grad(net(x).sum(), x)
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--compare-unfolded", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    current = build(unfolded=False)
    before = build(unfolded=True) if args.compare_unfolded else {}
    prelu = onnx_convert._prelu
    result = {"torch_threads": torch.get_num_threads(), "rounds": args.rounds, "encoders": {}}
    for name, (net, size) in current.items():
        x = (torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 255).requires_grad_(True)
        times = {"now": [], "unfolded": []}
        for _ in range(args.rounds):
            times["now"].append(passes_ms(net, x))
            if name in before:
                onnx_convert._prelu = aten_prelu
                try:
                    times["unfolded"].append(passes_ms(before[name][0], x))
                finally:
                    onnx_convert._prelu = prelu
        row = {"ms_forward_backward": round(statistics.median(times["now"]), 1)}
        if name in before:
            with torch.no_grad():
                difference = (net(x) - before[name][0](x)).abs().max().item()
            row.update(ms_forward_backward_unfolded=round(statistics.median(times["unfolded"]), 1),
                       max_abs_output_difference=difference)
        result["encoders"][name] = row
    json.dump(result, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
