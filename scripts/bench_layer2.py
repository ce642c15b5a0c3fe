#!/usr/bin/env python
"""Benchmark layer 2 on real faces and judge it with every recognizer's native pipeline; prints JSON.

    python scripts/bench_layer2.py [--config default] [--set layer2.weighting=fixed ...] [--threads 1]
        [--photos DIR] [--mobileface PATH [--mobileface-in-loop]] [--only t1,astronaut]

Photos: insightface's ``t1.jpg`` (6 people) and scikit-image's astronaut, from the installed
packages, plus every JPEG/PNG of ``--photos DIR`` (for experiments: the ``demo/`` photos of the npm
package @vladmandic/face-api; never in tests). Layer 2 runs with ``--layers 2`` semantics (the
clean photo is layer 2's input).

Judges: the native pipeline of every in-loop encoder (dlib's C++ pipeline, OpenCV's YuNet +
SFace, insightface's FaceAnalysis; :mod:`dladiff.faces.verdicts`) and, with ``--mobileface
PATH``, mobileface through YuNet + alignCrop + onnxruntime (cosine < 0.35 = another person). With
``--mobileface-in-loop`` mobileface is also put in the loop (as ``onnx:`` encoder, by path), and
``--judge NAME`` adds the native pipeline of a registered recognizer kept out of the loop:
leave-one-out rows name the in-loop encoders with ``--set layer2.encoders=...``.

Reported, per judge: share of the clean photo's faces it no longer sees as the same person, on
the saved pixels and after JPEG 75, and the share it still detects; photo PSNR and L∞ (0..255);
seconds per face split by phase (detection, alignment, pgd, inverse_warp, retries, verdicts) plus
start-up (imports and model loading) apart; CPU seconds per face (the process's user + system time: a
fairer figure than wall time on a shared machine), also split by phase, and PGD CPU seconds per step (first
attempts; retries are their own phase); peak resident memory. Timings on a shared CPU are noisy.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time

START = time.perf_counter()

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

MOBILEFACE_THRESHOLD = 0.35
"""mobileface's README: same person about 0.39, different people at most 0.30."""


def real_photos() -> dict[str, np.ndarray]:
    """insightface's t1.jpg and scikit-image's astronaut, RGB uint8, from the installed packages."""
    import insightface
    from skimage import data

    t1 = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
    return {"t1": np.asarray(Image.open(t1).convert("RGB")), "astronaut": data.astronaut()}


def folder_photos(folder: Path) -> dict[str, np.ndarray]:
    """Every .jpg/.jpeg/.png of ``folder`` (sorted), RGB uint8."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    return {p.stem: np.asarray(Image.open(p).convert("RGB")) for p in files}


def mobileface_encoder(path: Path) -> str:
    """The ``onnx:`` encoder name of mobileface, its sidecar written into a temporary folder."""
    folder = Path(tempfile.mkdtemp(prefix="mobileface-"))
    sidecar = {"model": str(path.resolve()), "input_size": 112, "channel_order": "RGB", "value_range": [0, 255],
               "template": "arcface", "embedding_dim": 256, "threshold": MOBILEFACE_THRESHOLD, "name": "mobileface"}
    (folder / "mobileface.json").write_text(json.dumps(sidecar))
    return f"onnx:{folder / 'mobileface.json'}"


def summarize(verdicts: list[dict]) -> dict:
    """Per judge and condition: faces judged, share judged another person, share still detected."""
    out: dict = {}
    for face in verdicts:
        for judge, conditions in face.items():
            for condition, verdict in conditions.items():
                if verdict["detected"] is None:
                    continue
                row = out.setdefault(judge, {}).setdefault(condition, {"faces": 0, "other_person": 0, "detected": 0})
                row["faces"] += 1
                row["other_person"] += verdict["same_person"] is False
                row["detected"] += bool(verdict["detected"])
    for conditions in out.values():
        for row in conditions.values():
            row["other_person_share"] = round(row["other_person"] / row["faces"], 3)
            row["detected_share"] = round(row["detected"] / row["faces"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="default")
    parser.add_argument("--set", action="append", default=[], help="override, e.g. layer2.epsilon=0.05")
    parser.add_argument("--photos", type=Path, help="extra folder of photos (experiments only)")
    parser.add_argument("--only", help="comma-separated photo names to keep")
    parser.add_argument("--mobileface", type=Path, help="mobileface.onnx: judge (and with --mobileface-in-loop, encoder)")
    parser.add_argument("--mobileface-in-loop", action="store_true")
    parser.add_argument("--judge", action="append", default=[],
                        help="extra native judge not in the loop: dlib, sface, arcface-r50, arcface-r100 (leave-one-out)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--save", type=Path, help="folder to write the protected PNGs into")
    args = parser.parse_args()

    import torch

    from dladiff.config import load_config, parse_overrides, with_overrides
    from dladiff.data import linf_255, psnr
    from dladiff.faces.verdicts import OnnxJudge, native_judge, native_verdicts
    from dladiff.layer2 import prepare_layer2, protect_image

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    overrides = parse_overrides(args.set)
    if args.mobileface_in_loop:
        encoders = overrides.get("layer2", {}).get("encoders") or cfg.layer2.encoders
        names = list(encoders) if isinstance(encoders, dict) else []
        mobile = mobileface_encoder(args.mobileface)
        overrides.setdefault("layer2", {})["encoders"] = {**{n: float(encoders[n]) for n in names}, mobile: 1.0}
    cfg = with_overrides(cfg, **overrides) if overrides else cfg
    models = prepare_layer2(cfg.layer2)
    extra = {}
    if args.mobileface and not args.mobileface_in_loop:
        extra["mobileface"] = OnnxJudge("mobileface", args.mobileface, MOBILEFACE_THRESHOLD)
    for name in args.judge:
        extra[name] = native_judge(name, cfg.layer2.model_root, cfg.layer2.det_size)
    startup = time.perf_counter() - START

    photos = {**real_photos(), **(folder_photos(args.photos) if args.photos else {})}
    if args.only:
        photos = {k: v for k, v in photos.items() if k in args.only.split(",")}
    verdicts, rows, faces_total, steps_total = [], [], 0, 0
    extra_seconds, cpu_start = 0.0, time.process_time()
    for name, clean in photos.items():
        start = time.perf_counter()
        protected, faces = protect_image(clean, clean, models, cfg.layer2, cfg.runtime.seed, cfg.eot, cfg.budget)
        seconds = time.perf_counter() - start
        faces_total += len(faces)
        if args.save:
            args.save.mkdir(parents=True, exist_ok=True)
            Image.fromarray(protected).save(args.save / f"{name}.png")
        judged = [dict(face["native"]) for face in faces]
        if extra and faces:
            begin = time.perf_counter()
            for entry, more in zip(judged, native_verdicts(clean, protected, extra, [f["bbox"] for f in faces])):
                entry.update(more)
            extra_seconds += time.perf_counter() - begin
        verdicts += judged
        steps_total += sum(f["steps"] for f in faces)
        rows.append({"photo": name, "faces": len(faces), "psnr_db": round(psnr(protected, clean), 2),
                     "linf_255": linf_255(protected, clean), "seconds": round(seconds, 2),
                     "steps": [f["steps"] for f in faces], "bound_scale": [f["bound_scale"] for f in faces],
                     "native": judged,
                     "attack_own": [{n: e.get("distance", e["ism_pro"]) for n, e in f["encoders"].items()} for f in faces]})
    cpu_per_face = (time.process_time() - cpu_start) / max(faces_total, 1)
    per_face = {phase: round(total / max(faces_total, 1), 3) for phase, total in models.seconds.items()}
    result = {
        "layer2": {k: v for k, v in vars(cfg.layer2).items() if k != "model_root"},
        "encoders": models.weights,
        "judges": list(models.judges) + list(extra),
        "torch_threads": torch.get_num_threads(),
        "faces": faces_total,
        "verdicts": summarize(verdicts),
        "min_psnr_db": min((r["psnr_db"] for r in rows), default=None),
        "max_linf_255": max((r["linf_255"] for r in rows), default=None),
        "startup_seconds": round(startup, 2),
        "seconds_per_face": {**per_face, "layer2_total": round(sum(models.seconds.values()) / max(faces_total, 1), 3),
                             "extra_judges": round(extra_seconds / max(faces_total, 1), 3)},
        "cpu_seconds_per_face": round(cpu_per_face, 2),
        "cpu_seconds_per_face_by_phase": {phase: round(total / max(faces_total, 1), 3)
                                          for phase, total in models.cpu_seconds.items()},
        "pgd_steps": steps_total,
        "pgd_cpu_seconds_per_step": round(models.cpu_seconds["pgd"] / max(steps_total, 1), 4),
        "startup_cpu_seconds": round(cpu_start, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "photos": rows,
    }
    json.dump(result, sys.stdout, indent=1, default=str)
    print()


if __name__ == "__main__":
    main()
