#!/usr/bin/env python
"""Does layer 2 transfer? Leave-one-out: optimize with some recognizers, judge with one that was not in the loop.

    python scripts/transfer_experiment.py --mobileface /path/to/mobileface.onnx \\
        [--technique baseline --technique mi ...] [--set layer2.epsilon=0.0627 ...] [--out results/transfer]
    python scripts/transfer_experiment.py --self-judge --jpeg 75 --set eot.enabled=true   # EOT, white-box

Recognizers: ``dlib`` (our port in the loop; judged by dlib's own C++ pipeline, distance > 0.6 =
another person) and any ``onnx:PATH`` encoder (``--recognizer``, repeatable); ``--mobileface ONNX``
writes that model's sidecar (RGB 0..255, ArcFace-aligned, 256-D, another person below cosine 0.35)
into ``--out`` and adds it. For every technique and every recognizer R, layer 2 runs with R alone
in the loop and every other recognizer judges (both ways round with two recognizers), or, with
``--ensemble``, every recognizer judges layer 2 run with all the others at equal weights (Eq. 10);
``--self-judge`` adds the white-box case (R judged by itself: dlib by its own C++ pipeline) and
``--jpeg Q`` judges the protected photos after a JPEG re-encode at quality Q.

Photos: insightface's ``t1.jpg`` (6 people) and scikit-image's astronaut, loaded from the installed
packages; faces found by dlib's detector. Per run it reports the white-box ISM_pro (cosine of the
in-loop encoder between the clean and the protected face, re-detected), the judge's similarity
(cosine; dlib: descriptor distance), the share of faces past the judge's threshold, PSNR of the
photos and of the face boxes, the measured L∞ (0..255) and seconds per face, as JSON lines and as
a Markdown table row.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from dladiff.config import load_config, parse_overrides, with_overrides
from dladiff.data import linf_255, psnr
from dladiff.purify import jpeg_uint8
from dladiff.faces.dlib_reference import DlibReference
from dladiff.faces.encoders import load_encoder
from dladiff.layer2 import Layer2Models, measure_identity, prepare_layer2, protect_image

MOBILEFACE_SIDECAR = {"input_size": 112, "channel_order": "RGB", "value_range": [0, 255], "template": "arcface",
                      "embedding_dim": 256, "threshold": 0.35, "threshold_kind": "cosine", "name": "mobileface"}
"""The conventions of ``mobileface.onnx`` (its README): raw RGB 0..255, ArcFace 5-point alignment, 256-D;
same person about 0.39, different people at most 0.30, so cosine < 0.35 counts as another person."""

PLAIN = {"momentum": 0.0, "diversity_probability": 0.0, "ti_kernel": 0}
"""Plain jittered PGD (the paper's layer 2): every transfer switch off."""
MI_DI_TI = {"momentum": 1.0, "diversity_probability": 0.5, "diversity_shrink": 1.15, "ti_kernel": 7}
ALIGN = {"align_samples": 4, "align_templates": ["arcface", "dlib"], "jitter_translation": 2.0, "jitter_rotation": 3.0,
         "jitter_scale": 0.03}
FEATURE = {"feature_weight": 1.0, "feature_depths": [0.3, 0.6]}

TECHNIQUES: dict[str, dict] = {
    "baseline": PLAIN,
    "mi": {**PLAIN, "momentum": 1.0},
    "di": {**PLAIN, "diversity_probability": 0.5, "diversity_shrink": 1.15},
    "ti": {**PLAIN, "ti_kernel": 7},
    "align": {**PLAIN, **ALIGN},
    "feature": {**PLAIN, **FEATURE},
    "mi+di+ti": MI_DI_TI,
    "all": {**MI_DI_TI, **ALIGN, **FEATURE},
}
"""Layer-2 overrides of each technique (one switch each, then combinations)."""


def real_photos() -> dict[str, np.ndarray]:
    """insightface's t1.jpg and scikit-image's astronaut, RGB uint8, from the installed packages."""
    import insightface
    from skimage import data

    t1 = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
    return {"t1": np.asarray(Image.open(t1).convert("RGB")), "astronaut": data.astronaut()}


def write_mobileface_sidecar(onnx_path: Path, folder: Path) -> str:
    """Write ``mobileface.json`` (pointing at ``onnx_path``) into ``folder``; returns its encoder name."""
    folder.mkdir(parents=True, exist_ok=True)
    sidecar = folder / "mobileface.json"
    sidecar.write_text(json.dumps({"model": str(onnx_path.resolve()), **MOBILEFACE_SIDECAR}, indent=1))
    return f"onnx:{sidecar}"




def face_box_psnr(clean: np.ndarray, protected: np.ndarray, boxes: list[list[float]]) -> float:
    """PSNR (dB) over the pixels of the detected face boxes only (the region the perturbation targets)."""
    mask = np.zeros(clean.shape[:2], dtype=bool)
    for x0, y0, x1, y1 in boxes:
        mask[max(int(y0), 0):int(np.ceil(y1)), max(int(x0), 0):int(np.ceil(x1))] = True
    return psnr(protected[mask], clean[mask])




def dlib_cosines(reference: DlibReference, clean: np.ndarray, protected: np.ndarray, max_shift: float = 40.0
                 ) -> list[float | None]:
    """Per face of ``clean``: cosine of dlib's C++ descriptors of clean and protected (ISM_pro; None = lost)."""
    found = reference.faces(protected, min_score=0.0)
    out = []
    for centre, descriptor in reference.faces(clean):
        near = [d for c, d in found if np.linalg.norm(c - centre) < max_shift]
        out.append(float(near[0] @ descriptor / (np.linalg.norm(near[0]) * np.linalg.norm(descriptor))) if near else None)
    return out


def judge_faces(judge: str, clean: np.ndarray, protected: np.ndarray, faces: list[dict], detector,
                judge_models: Layer2Models | None, reference: DlibReference) -> list[float | None]:
    """Per clean face: the judge's similarity of clean and protected (dlib: C++ descriptor distance; None = lost)."""
    if judge == "dlib":
        return reference.distances(clean, protected)
    clean_faces, found = detector.detect(clean), detector.detect(protected)
    return [measure_identity(clean, protected, face, found, judge_models)["encoders"][judge]["ism_pro"]
            for face in clean_faces]


def past_threshold(judge: str, value: float | None, threshold: float) -> bool:
    """True when the judge no longer sees the same person (a lost face counts as not past)."""
    if value is None:
        return False
    return value > threshold if judge == "dlib" else value < threshold


def summarize(judge: str, values: list[float | None], ism: list[float | None], threshold: float) -> dict:
    """Mean judge value, faces past the threshold, faces lost, mean ISM_pro (dlib only) of one view."""
    found = [v for v in values if v is not None]
    seen_ism = [v for v in ism if v is not None]
    return {"judge_value": round(float(np.mean(found)), 3) if found else None,
            "past_threshold": f"{sum(past_threshold(judge, v, threshold) for v in values)}/{len(values)}",
            "lost": sum(v is None for v in values),
            "judge_ism": round(float(np.mean(seen_ism)), 3) if seen_ism else None,
            "per_face": [None if v is None else round(v, 4) for v in values]}


def run_case(technique: str, optimizers: list[str], judge: str, cfg, photos, reference: DlibReference,
             qualities: list[int]) -> dict:
    """Layer 2 with ``optimizers`` in the loop (equal weights, Eq. 10) on every photo, judged by ``judge`` on
    the PNG and after a JPEG re-encode at each of ``qualities``."""
    weights = {name: 1.0 / len(optimizers) for name in optimizers}
    l2 = with_overrides(cfg, layer2={"encoders": weights, "detector": "dlib"}).layer2
    models = prepare_layer2(l2)
    judge_models = None if judge == "dlib" else Layer2Models(models.detector, {judge: load_encoder(judge, l2.model_root)},
                                                             {judge: 1.0})
    threshold = reference.threshold if judge == "dlib" else judge_models.encoders[judge].threshold
    views = ["png"] + [f"jpeg{q}" for q in qualities]
    judged, ism = {v: [] for v in views}, {v: [] for v in views}
    white, seconds, count, psnrs, face_psnrs, linf = [], 0.0, 0, [], [], 0.0
    for clean in photos.values():
        start = time.perf_counter()
        protected, faces = protect_image(clean, clean, models, l2, cfg.runtime.seed, cfg.eot)
        seconds += time.perf_counter() - start
        count += len(faces)
        white += [np.mean([f["encoders"][name]["ism_pro"] for name in optimizers]) for f in faces]
        for view, seen in zip(views, [protected] + [jpeg_uint8(protected, q) for q in qualities]):
            judged[view] += judge_faces(judge, clean, seen, faces, models.detector, judge_models, reference)
            if judge == "dlib":
                ism[view] += dlib_cosines(reference, clean, seen)
        psnrs.append(psnr(protected, clean))
        face_psnrs.append(face_box_psnr(clean, protected, [f["bbox"] for f in faces]))
        linf = max(linf, linf_255(protected, clean))
    return {
        "technique": technique, "optimizer": "+".join(optimizers), "judge": judge,
        "judge_kind": "distance" if judge == "dlib" else "cosine", "threshold": threshold,
        "white_box_ism": round(float(np.mean(white)), 3),
        "views": {view: summarize(judge, judged[view], ism[view], threshold) for view in views},
        "psnr_db": round(float(min(psnrs)), 2), "face_psnr_db": round(float(min(face_psnrs)), 2),
        "linf_255": linf, "seconds_per_face": round(seconds / max(count, 1), 2),
    }


def short_name(encoders: str) -> str:
    """``dlib``, or the stem of an ``onnx:`` encoder's file (each of a ``+``-joined list)."""
    return "+".join(e if not e.startswith("onnx:") else Path(e[5:]).stem for e in encoders.split("+"))


def markdown_rows(result: dict) -> list[str]:
    """Rows per view: technique | optimizer → judge | white-box ISM | judge value | past threshold | PSNR | L∞ | s/face."""
    rows = []
    for view, seen in result["views"].items():
        judged = f"{seen['judge_value']} ({result['judge_kind']}"
        judged += f", ISM {seen['judge_ism']})" if seen["judge_ism"] is not None else ")"
        rows.append(f"| {result['technique']} | {short_name(result['optimizer'])} → {short_name(result['judge'])} "
                    f"({view}) | {result['white_box_ism']} | {judged} | {seen['past_threshold']} | "
                    f"{result['psnr_db']} / {result['face_psnr_db']} | {result['linf_255']:.0f} | "
                    f"{result['seconds_per_face']} |")
    return rows


def cases(recognizers: list[str], chosen: list[str] | None, ensemble: bool, self_judge: bool
          ) -> list[tuple[list[str], str]]:
    """(optimizers, judge) pairs: each recognizer alone against each other one, or all-but-the-judge."""
    if ensemble:
        return [([r for r in recognizers if r != judge], judge) for judge in recognizers]
    optimizers = [r for r in recognizers if not chosen or short_name(r) in chosen]
    return [([o], judge) for o in optimizers for judge in recognizers if judge != o or self_judge]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mobileface", type=Path, help="mobileface.onnx (a sidecar is written into --out)")
    parser.add_argument("--recognizer", action="append", default=[], help="another recognizer, e.g. onnx:face.json")
    parser.add_argument("--technique", action="append", choices=sorted(TECHNIQUES), help="rows to run (default: all)")
    parser.add_argument("--config", default="default")
    parser.add_argument("--set", action="append", default=[], help="override, e.g. layer2.epsilon=0.0627")
    parser.add_argument("--label", default="", help="suffix for the technique names (e.g. the --set used)")
    parser.add_argument("--optimizer", action="append", help="only these recognizers optimize (default: each in turn)")
    parser.add_argument("--ensemble", action="store_true",
                        help="for each judge, optimize with all the other recognizers at once (equal weights)")
    parser.add_argument("--self-judge", action="store_true", help="also judge each recognizer by itself (white-box)")
    parser.add_argument("--jpeg", type=int, action="append", default=[], help="also judge after a JPEG re-encode at this quality")
    parser.add_argument("--out", type=Path, default=Path("results/transfer"))
    args = parser.parse_args()

    recognizers = ["dlib"] + args.recognizer
    if args.mobileface:
        recognizers.append(write_mobileface_sidecar(args.mobileface, args.out))
    if len(recognizers) < 2 and not args.self_judge:
        parser.error("leave-one-out needs a second recognizer: --mobileface ONNX or --recognizer onnx:PATH")
    base = load_config(args.config)
    overrides = parse_overrides(args.set)
    base = with_overrides(base, **overrides) if overrides else base
    photos, reference = real_photos(), DlibReference()
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "results.jsonl", "a") as log:
        for technique in args.technique or list(TECHNIQUES):
            cfg = with_overrides(base, layer2=TECHNIQUES[technique])
            for optimizers, judge in cases(recognizers, args.optimizer, args.ensemble, args.self_judge):
                result = run_case(technique + args.label, optimizers, judge, cfg, photos, reference, args.jpeg)
                result["layer2"] = {k: v for k, v in asdict(cfg.layer2).items() if k not in ("model_root", "encoders")}
                result["eot"] = asdict(cfg.eot) if cfg.eot.enabled else None
                log.write(json.dumps(result, default=str) + "\n")
                log.flush()
                print("\n".join(markdown_rows(result)), flush=True)


if __name__ == "__main__":
    main()
