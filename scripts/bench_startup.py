#!/usr/bin/env python
"""Benchmark start-up: seconds (wall and CPU) of the CLI's fixed costs, each in a fresh process, as JSON.

    python scripts/bench_startup.py                    # --help, protect --help, import, --layers 2 and --layers 1 runs
    python scripts/bench_startup.py --repeats 3 --out startup.json
    python scripts/bench.py --startup --phases-only    # the same, as bench.py's ``startup`` phase

``commands``: ``dladiff --help``, ``dladiff protect --help`` and ``import dladiff.cli``, each run
``--repeats`` times in a fresh interpreter; wall time and CPU seconds (user + sys of the child,
``getrusage(RUSAGE_CHILDREN)``), the best of the repeats.

``import dladiff.cli + protect + layer2 (torch)``: the imports of a ``--layers 2`` run on their own.

``layers2``: ``dladiff protect PHOTOS --layers 2`` on one photo (scikit-image's astronaut, written
to a temporary folder), split into parts: ``import dladiff.cli``, ``import torch`` (and the other
big libraries, each as it is first imported), ``config``, each model's loading (``encoder:dlib``
the dlib ResNet port, ``encoder:sface``, dlib's HOG detector, the shape predictors, YuNet, the
native-verdict judges), plus ``first_face_pgd`` (seconds from the process start until the first
face's PGD starts) and ``total`` (the whole process, ``getrusage`` of the child). ``layers1``:
``--layers 1 --config smoke`` (tiny SD loading, surrogate, layer 1, writing, total). A driver
(``child`` mode of this script) wraps the loaders as their modules are imported (an import hook:
nothing is imported ahead of the run, the package is unchanged); a part's seconds are its own,
without the wrapped parts it calls. A part run on another thread than the main one would be named
``... (background)`` and count that thread's CPU.
Set ``OMP_NUM_THREADS=1`` on a shared machine; the load average is reported with each run.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.abc
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LAYER2_PARTS = {
    # part name: (module, attribute); wrapped wherever the same function object is bound in dladiff.*
    "config": ("dladiff.cli", "_load"),
    "load_photos": ("dladiff.protect", "load_folder"),
    "encoder:": ("dladiff.faces.encoders", "_build_encoder"),  # one part per encoder (dlib ResNet, SFace)
    "dlib_hog_detector": ("dladiff.faces.detect", "frontal_face_detector"),
    "shape_predictor": ("dladiff.faces.detect", "load_shape_predictor"),
    "landmark_sources": ("dladiff.faces.landmarks", "make_sources"),
    "face_detector": ("dladiff.faces.detect", "make_detector"),
    "native_judges": ("dladiff.faces.verdicts", "native_judge"),
    "judge_dlib": ("dladiff.faces.verdicts", "DlibJudge.__init__"),
    "judge_sface": ("dladiff.faces.verdicts", "SFaceJudge.__init__"),
}
LAYER1_PARTS = {
    "config": ("dladiff.cli", "_load"),
    "load_photos": ("dladiff.protect", "load_folder"),
    "load_sd": ("dladiff.diffusion.loading", "load_sd"),
    "load_unet": ("dladiff.diffusion.loading", "load_unet"),
    "surrogate": ("dladiff.surrogate", "finetune_surrogate"),
    "layer1": ("dladiff.methods", "run_method"),
    "write_outputs": ("dladiff.protect", "_save_outputs"),
    "report": ("dladiff.protect", "_report"),
    "presentation": ("dladiff.protect", "write_presentation"),
    "apply_perturbation": ("dladiff.protect", "apply_perturbation"),
    "model_batch": ("dladiff.protect", "model_batch"),
    "save_state": ("dladiff.state_io", "save_state"),
}
TIMED_IMPORTS = ("torch", "dlib", "cv2", "onnx", "diffusers", "transformers")
"""Top-level libraries whose import (their ``__init__``, submodules included) is a part of its own."""


def now(thread_cpu: bool = False) -> dict:
    """Monotonic wall clock (comparable across processes) and CPU seconds (the process's, or this thread's)."""
    return {"wall": time.monotonic(), "cpu": time.thread_time() if thread_cpu else time.process_time()}


class Recorder:
    """Own (exclusive) wall and CPU seconds of wrapped calls, nested calls subtracted.

    Calls on other threads than the main one are parts of their own, named ``... (background)``,
    with that thread's CPU seconds.
    """

    def __init__(self):
        self.parts: dict[str, dict] = {}
        self.marks: dict[str, dict] = {}
        self.local = threading.local()
        self.lock = threading.Lock()

    def wrap(self, label: str, fn):
        """``fn`` timed as part ``label`` (a label ending in ``:`` gets the call's first argument appended)."""
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            with self.span(f"{label}{args[0]}" if label.endswith(":") and args else label):
                return fn(*args, **kwargs)
        return timed

    @contextlib.contextmanager
    def span(self, name: str):
        """Time the block as part ``name``."""
        background = threading.current_thread() is not threading.main_thread()
        name += " (background)" if background else ""
        stack = self.local.__dict__.setdefault("stack", [])
        start = now(background)
        stack.append({"wall": 0.0, "cpu": 0.0})
        try:
            yield
        finally:
            end = now(background)
            nested = stack.pop()
            wall, cpu = end["wall"] - start["wall"], end["cpu"] - start["cpu"]
            with self.lock:
                part = self.parts.setdefault(name, {"wall": 0.0, "cpu": 0.0, "calls": 0})
                part["wall"] += wall - nested["wall"]
                part["cpu"] += cpu - nested["cpu"]
                part["calls"] += 1
            if stack:
                stack[-1]["wall"] += wall
                stack[-1]["cpu"] += cpu

    def mark(self, name: str) -> None:
        self.marks.setdefault(name, now())


def patch_module(recorder: Recorder, module, parts: dict) -> None:
    """Wrap the parts defined in ``module``, right after it was imported."""
    for name, (module_name, attribute) in parts.items():
        if module_name != module.__name__:
            continue
        owner_name, _, attr = attribute.rpartition(".")
        owner = getattr(module, owner_name) if owner_name else module
        original = getattr(owner, attr, None)
        if original is not None:
            setattr(owner, attr, recorder.wrap(name, original))
    if module.__name__ == "dladiff.layer2":
        mark_first_pgd(recorder, module.Layer2Models)


class PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches dladiff modules as they are imported and times the import of big libraries.

    Nothing is imported ahead of the run, so the run imports what it imports when it does.
    """

    def __init__(self, recorder: Recorder, parts: dict):
        self.recorder, self.parts = recorder, parts

    def find_spec(self, name, path, target=None):
        if not (name.startswith("dladiff") or name in TIMED_IMPORTS):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module
        if name in TIMED_IMPORTS:
            spec.loader.exec_module = self.recorder.wrap(f"import {name}", exec_module)
        else:
            def exec_and_patch(module):
                exec_module(module)
                patch_module(self.recorder, module, self.parts)

            spec.loader.exec_module = exec_and_patch
        return spec


def mark_first_pgd(recorder: Recorder, models_class) -> None:
    """Record when layer 2 first enters its ``pgd`` phase (``Layer2Models.phase``); time the phases before it."""
    phase = models_class.phase

    @contextlib.contextmanager
    def marked(self, name):
        if name == "pgd":
            recorder.mark("first_face_pgd")
        if "first_face_pgd" in recorder.marks:
            with phase(self, name):
                yield
            return
        with recorder.span(f"layer2 {name} (before the first PGD)"), phase(self, name):
            yield

    models_class.phase = marked


def child(args) -> None:
    """Run ``dladiff protect`` in this process with the loaders wrapped; write the parts as JSON."""
    recorder = Recorder()
    start = now()
    sys.meta_path.insert(0, PatchOnImport(recorder, LAYER2_PARTS if args.layers == 2 else LAYER1_PARTS))
    from dladiff.cli import app

    imported = now()
    argv = ["protect", args.photos, "--out", args.out_dir, "--layers", str(args.layers), "--quiet"]
    argv += ["--config", args.config] if args.config else []
    code = 0
    try:
        app(argv)
    except SystemExit as exc:
        code = exc.code or 0
    end = now()
    result = {"exit_code": code, "start": start, "imported": imported, "end": end,
              "parts": recorder.parts, "marks": recorder.marks}
    Path(args.events).write_text(json.dumps(result), encoding="utf-8")


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_child_process(cmd: list[str]) -> dict:
    """Wall seconds, CPU seconds (user + sys) and peak RSS of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()[0]
    start = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode not in (0, 4):
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return {"start": start, "wall": wall, "load_average": round(load, 2),
            "cpu": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "max_rss_mb": round(after.ru_maxrss / 1024, 1)}


def dladiff_command() -> list[str]:
    script = Path(sys.executable).with_name("dladiff")
    return [str(script)] if script.is_file() else [sys.executable, "-c", "from dladiff.cli import app; app()"]


def best(runs: list[dict]) -> dict:
    return {"wall_s": round(min(r["wall"] for r in runs), 3), "cpu_s": round(min(r["cpu"] for r in runs), 3),
            "load_average": [r["load_average"] for r in runs], "runs": len(runs)}


def commands(repeats: int) -> dict:
    cmds = {"dladiff --help": dladiff_command() + ["--help"],
            "dladiff protect --help": dladiff_command() + ["protect", "--help"],
            "import dladiff.cli": [sys.executable, "-c", "import dladiff.cli"],
            "import dladiff.cli + protect + layer2 (torch)": [
                sys.executable, "-c", "import dladiff.cli, dladiff.protect, dladiff.layer2, dladiff.layer2_resume"]}
    return {name: best([run_child_process(cmd) for _ in range(repeats)]) for name, cmd in cmds.items()}


def split_run(layers: int, photos: Path, config: str | None) -> dict:
    """One instrumented ``protect`` run: its parts in seconds from the process start, and the whole process."""
    with tempfile.TemporaryDirectory() as tmp:
        events = Path(tmp) / "events.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "child", "--layers", str(layers), "--photos", str(photos),
               "--out-dir", str(Path(tmp) / "out"), "--events", str(events)] + (["--config", config] if config else [])
        process = run_child_process(cmd)
        data = json.loads(events.read_text(encoding="utf-8"))
    origin = process["start"]
    parts = {"interpreter": {"wall_s": round(data["start"]["wall"] - origin, 3),
                             "cpu_s": round(data["start"]["cpu"], 3)},
             "import dladiff.cli": {"wall_s": round(data["imported"]["wall"] - data["start"]["wall"], 3),
                         "cpu_s": round(data["imported"]["cpu"] - data["start"]["cpu"], 3)}}
    for name, part in data["parts"].items():
        parts[name] = {"wall_s": round(part["wall"], 3), "cpu_s": round(part["cpu"], 3), "calls": part["calls"]}
    marks = {name: {"wall_s": round(mark["wall"] - origin, 3), "cpu_s": round(mark["cpu"], 3)}
             for name, mark in data["marks"].items()}
    return {"exit_code": data["exit_code"], "parts": parts, "since_process_start": marks,
            "total": {"wall_s": round(process["wall"], 3), "cpu_s": round(process["cpu"], 3)},
            "max_rss_mb": process["max_rss_mb"], "load_average": process["load_average"]}


def astronaut_folder(folder: Path) -> Path:
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(data.astronaut()).save(folder / "astronaut.png")
    return folder


def startup_phase(repeats: int = 3, layer1: bool = True) -> dict:
    """The ``startup`` phase of bench.py's JSON."""
    result = {"omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cpu_count": os.cpu_count(),
              "commands": commands(repeats)}
    with tempfile.TemporaryDirectory() as tmp:
        photos = astronaut_folder(Path(tmp) / "photos")
        result["layers2_one_photo"] = [split_run(2, photos, None) for _ in range(repeats)]
        if layer1:
            result["layers1_smoke_one_photo"] = [split_run(1, photos, "smoke") for _ in range(max(1, repeats // 2))]
    return result


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode")
    run = sub.add_parser("run", help="measure (default)")
    for p in (parser, run):
        p.add_argument("--repeats", type=int, default=3, help="fresh processes per command (best is reported)")
        p.add_argument("--no-layer1", action="store_true", help="skip the --layers 1 smoke run")
        p.add_argument("--out", default=None, help="also write the JSON to this file")
    kid = sub.add_parser("child", help="internal: one instrumented protect run")
    kid.add_argument("--layers", type=int, choices=[1, 2], required=True)
    kid.add_argument("--photos", required=True)
    kid.add_argument("--out-dir", required=True)
    kid.add_argument("--events", required=True)
    kid.add_argument("--config", default=None)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.mode == "child":
        child(args)
        return
    text = json.dumps({"startup": startup_phase(args.repeats, not args.no_layer1)}, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
