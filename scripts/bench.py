#!/usr/bin/env python
"""Benchmark layer 1: seconds per stage-1, stage-2 and stage-3 step and peak memory, as JSON.

    python scripts/bench.py --config configs/default.yaml --arch sd21-base-random --images 4
    python scripts/bench.py --config smoke                     # the tiny model, CPU
    python scripts/bench.py --config smoke --out bench.json    # also write the JSON to a file
    python scripts/bench.py --config smoke --write             # plus the output step of one 3 MP photo
    python scripts/bench.py --startup --phases-only            # only the start-up phase (no layer-1 steps)

``--arch sd21-base-random`` builds the real SD-2.1-base architecture with random weights from the
config shipped in the package (no download; about 5 GB written once to the dladiff cache), so GPU
cost can be measured without the weights. ``--arch config`` uses the config's model.id. Peak
memory: ``torch.cuda.max_memory_allocated`` on CUDA, peak RSS of the process on the CPU; on any
device, ``autograd_saved_bytes`` is what autograd keeps for the backward pass during one PGD step
(the activations, weights not counted).

Estimates for one identity: layer 1 = E × (n1·t1 + n2·t2 + n3·t3); the static surrogate =
``surrogate.steps`` × t3 (a surrogate step is the same DreamBooth step as stage 3, on clean latents);
their sum is the whole layer-1 run.
``--write`` adds a ``write`` phase: seconds of each part of writing one full-size output (δ into
the photo, PNG encode, re-read and bound check, PSNR) and its peak RSS, measured by
``scripts/bench_io.py write`` in a fresh process. ``--startup`` adds a ``startup`` phase: seconds (wall
and CPU) of ``dladiff --help``, ``dladiff protect --help``, ``import dladiff.cli`` and of one-photo
``--layers 2`` and ``--layers 1 --config smoke`` runs split into imports, config, each model's loading
and the time until the first face's PGD, each in fresh processes (``scripts/bench_startup.py``).
``--phases-only`` skips the layer-1 step timings and prints only the phases asked for.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from dladiff.config import load_config, with_overrides
from dladiff.diffusion.loading import load_sd, load_unet
from dladiff.diffusion.tiny import build_random_sd, cache_dir
from dladiff.layer1 import ADFTProtector
from dladiff.runtime import frozen_dtype, select_device


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="default", help="config file or built-in name")
    parser.add_argument("--arch", choices=["config", "sd21-base-random"], default="config")
    parser.add_argument("--images", type=int, default=4, help="number of images protected together")
    parser.add_argument("--resolution", type=int, default=None, help="override model.resolution (pixels)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per stage (after one warm-up step)")
    parser.add_argument("--device", default=None, help="override runtime.device")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--out", default=None, help="also write the JSON to this file")
    parser.add_argument("--write", action="store_true", help="add the output-writing phase (one photo, see --write-size)")
    parser.add_argument("--write-size", default="2000x1500", help="WIDTHxHEIGHT of the photo of the write phase (pixels)")
    parser.add_argument("--startup", action="store_true", help="add the start-up phase (fresh processes, see bench_startup.py)")
    parser.add_argument("--startup-repeats", type=int, default=3, help="fresh processes per start-up measurement")
    parser.add_argument("--phases-only", action="store_true", help="only the phases asked for (--write, --startup)")
    return parser.parse_args()


def write_phase(size: str) -> dict:
    """The output step of one photo, measured by bench_io.py in a fresh process (its own peak RSS)."""
    width, height = size.lower().split("x")
    script = Path(__file__).with_name("bench_io.py")
    done = subprocess.run([sys.executable, str(script), "write", "--width", width, "--height", height],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def startup_phase(repeats: int) -> dict:
    """Start-up costs, measured by bench_startup.py in fresh processes."""
    script = Path(__file__).with_name("bench_startup.py")
    done = subprocess.run([sys.executable, str(script), "--repeats", str(repeats)], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout)["startup"]


def phases(args) -> dict:
    """The fresh-process phases asked for on the command line."""
    result = {}
    if args.write:
        result["write"] = write_phase(args.write_size)
    if args.startup:
        result["startup"] = startup_phase(args.startup_repeats)
    return result


def emit(result: dict, out: str | None) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n", encoding="utf-8")


def model_folder(args, cfg) -> str:
    if args.arch == "config":
        return cfg.model.id
    folder = cache_dir() / "sd21-base-random"
    if not (folder / "model_index.json").is_file():
        print(f"building random SD-2.1-base architecture into {folder}", file=sys.stderr)
        build_random_sd(folder)
    return str(folder)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, steps: int, device) -> float:
    """Seconds per call of ``step`` averaged over ``steps`` calls after one warm-up call."""
    step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - start) / steps


def autograd_saved_bytes(step, modules) -> int:
    """Bytes of the tensors autograd saves for backward during one call of ``step``, the modules' weights excluded."""
    weights = {p.untyped_storage().data_ptr() for m in modules if m is not None for p in m.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(saved.values())


def peak_memory(device) -> dict:
    if device.type == "cuda":
        return {"kind": "torch.cuda.max_memory_allocated", "bytes": torch.cuda.max_memory_allocated(device)}
    return {"kind": "peak RSS", "bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def estimates(timings: dict, cfg) -> dict:
    """Seconds of one epoch, of layer 1 (E epochs), of the static surrogate and of both, from per-step times."""
    l1 = cfg.layer1
    stage3 = timings.get("stage3", 0.0)
    epoch = l1.stage1_steps * timings["stage1"] + l1.stage2_steps * timings["stage2"] + l1.stage3_steps * stage3
    surrogate = cfg.surrogate.steps * stage3
    return {"seconds_per_epoch": epoch, "layer1_seconds_estimate": epoch * l1.epochs,
            "surrogate_seconds_estimate": surrogate, "full_layer1_run_seconds_estimate": epoch * l1.epochs + surrogate,
            "counted": {"epochs": l1.epochs, "steps_per_epoch": [l1.stage1_steps, l1.stage2_steps, l1.stage3_steps],
                        "surrogate_steps": cfg.surrogate.steps}}


def main() -> None:
    args = parse_args()
    if args.phases_only:
        emit(phases(args), args.out)
        return
    cfg = load_config(args.config)
    overrides = {"runtime": {"gradient_checkpointing": args.gradient_checkpointing or cfg.runtime.gradient_checkpointing}}
    if args.device:
        overrides["runtime"]["device"] = args.device
    if args.resolution:
        overrides["model"] = {"resolution": args.resolution}
    cfg = with_overrides(cfg, **overrides)
    device = select_device(cfg.runtime.device)
    folder = model_folder(args, cfg)
    components = load_sd(folder, device=device)
    static = load_unet(components.folder, device, frozen_dtype(device, cfg.runtime.precision))
    res = cfg.model.resolution
    x = torch.rand(args.images, 3, res, res, generator=torch.Generator().manual_seed(0)) * 2 - 1
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    protector = ADFTProtector(x, components, static, cfg, device)
    timings = {"stage1": time_steps(protector.stage1_step, args.steps, device),
               "stage2": time_steps(protector.stage2_step, args.steps, device)}
    modules = (protector.unet_d, protector.static_unet, protector.vae)
    saved = {"stage1": autograd_saved_bytes(protector.stage1_step, modules),
             "stage2": autograd_saved_bytes(protector.stage2_step, modules)}
    data = protector.perturbed_latent_set()
    if protector.trainer is not None:
        timings["stage3"] = time_steps(lambda: protector.stage3_step(data), args.steps, device)
    l1 = cfg.layer1
    memory = peak_memory(device)
    result = {
        "device": str(device),
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "arch": args.arch, "model": folder, "resolution": res, "images": args.images,
        "batch_size": l1.batch_size, "precision": cfg.runtime.precision if device.type == "cuda" else "fp32",
        "gradient_checkpointing": cfg.runtime.gradient_checkpointing,
        "captured_resolutions": list(l1.attention.resolutions),
        "seconds_per_step": timings,
        **estimates(timings, cfg),
        "peak_memory": {**memory, "gib": round(memory["bytes"] / 2**30, 3)},
        "autograd_saved_bytes": saved,
        "torch": torch.__version__,
    }
    result.update(phases(args))
    emit(result, args.out)


if __name__ == "__main__":
    main()
