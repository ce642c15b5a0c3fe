#!/usr/bin/env python
"""What layer 2's perturbation looks like, and what it still protects, per budget; prints JSON.

    python scripts/bench_quality.py [--config default] [--set layer2.steps=50 ...] [--only t1,astronaut]
        [--photos DIR ...] [--mobileface PATH] [--threads 1]

Photos: insightface's ``t1.jpg`` (6 people) and scikit-image's astronaut, from the installed
packages; layer 2 alone (``--layers 2`` semantics: the clean photo is layer 2's input). Each photo
is protected three times, the config's other settings unchanged:

* ``uniform``: the paper's η over each face's warped-back crop (``budget.face_mask`` and
  ``budget.perceptual`` off);
* ``face_mask``: the grown, feathered landmark hull, uniform η inside;
* ``face_mask+perceptual``: the hull and the texture bound (the config's ``budget`` section).

Per photo and setting: PSNR (dB) and SSIM (scikit-image, RGB, data range 255); the hull is the
config's grown face hull (:func:`dladiff.budget.layer2_bound`, the same pixels for the three
settings): the share of changed pixels that lie outside it; the largest |δ| step (0-255) between
4-neighbours across its edge, and anywhere; mean |δ| (0-255, over channels) on the hull's flat
pixels (local luminance std ≤ ``--flat-std``, 2.0, in a ``--texture-window``² box, 7 px: fixed, so
that every budget rule is judged on the same pixels) and its textured ones (std ≥ ``--textured-std``, 12); and the identity verdicts: white-box = the native
pipelines of the in-loop encoders (dlib's C++ pipeline, OpenCV's SFace), leave-one-out = mobileface
through YuNet + alignCrop + onnxruntime (``--mobileface PATH``, never in the loop; cosine < 0.35
= another person), on the saved pixels and after JPEG 75.

``--margins 0,0.15,0.3``: instead, per face, the share of the in-loop encoders' input-gradient mass
inside the grown hull for each margin (how much of what the recognizers look at the region keeps).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

MOBILEFACE_THRESHOLD = 0.35
"""mobileface's README: same person about 0.39, different people at most 0.30."""

SETTINGS = {"uniform": {"face_mask": False, "perceptual": False},
            "face_mask": {"face_mask": True, "perceptual": False},
            "face_mask+perceptual": {"face_mask": True, "perceptual": True}}


def real_photos(extra: list[Path]) -> dict[str, np.ndarray]:
    """insightface's t1.jpg and scikit-image's astronaut (installed packages), then ``extra`` photos, RGB uint8.

    ``extra``: files, or folders whose ``*.jpg`` / ``*.png`` are taken, named by their stem.
    """
    import insightface
    from skimage import data

    t1 = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
    photos = {"t1": np.asarray(Image.open(t1).convert("RGB")), "astronaut": data.astronaut()}
    for path in extra:
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".jpg", ".png")) if path.is_dir() else [path]
        photos.update({f.stem: np.asarray(Image.open(f).convert("RGB")) for f in files})
    return photos


def quality(clean: np.ndarray, protected: np.ndarray, region: np.ndarray, texture: np.ndarray,
            flat_std: float, textured_std: float) -> dict:
    """PSNR, SSIM and where δ is, against the hull ``region (H, W)`` bool and the local std ``texture (H, W)``.

    Flat: hull pixels with ``texture ≤ flat_std``; textured: ``texture ≥ textured_std`` (0-255 luminance std).
    """
    from skimage.metrics import structural_similarity

    from dladiff.budget import edge_step
    from dladiff.data import psnr

    delta = protected.astype(np.int16) - clean.astype(np.int16)
    size = np.abs(delta).mean(axis=2)
    changed = np.abs(delta).max(axis=2) > 0
    flat, textured = region & (texture <= flat_std), region & (texture >= textured_std)
    steps = [np.abs(np.diff(delta, axis=a)).max() for a in (0, 1)]
    return {"psnr_db": round(psnr(protected, clean), 2),
            "ssim": round(float(structural_similarity(clean, protected, channel_axis=2, data_range=255)), 5),
            "changed_pixels": int(changed.sum()),
            "changed_outside_hull_share": round(float((changed & ~region).sum() / max(changed.sum(), 1)), 5),
            "edge_step_255": edge_step(delta, region),
            "max_neighbour_step_255": int(max(steps)),
            "flat_mean_abs_delta_255": round(float(size[flat].mean()), 3) if flat.any() else None,
            "textured_mean_abs_delta_255": round(float(size[textured].mean()), 3) if textured.any() else None,
            "flat_pixels": int(flat.sum()), "textured_pixels": int(textured.sum())}


def margin_coverage(clean: np.ndarray, faces: list, models, budget, margins: list[float]) -> list[dict]:
    """Per face: share of the in-loop encoders' input-gradient mass (|∂ cos(E(crop), r)/∂x|, r a fixed random
    unit vector) that falls inside the grown hull, for each margin (eye gaps): how much of what the
    encoders look at the region keeps."""
    import dataclasses

    import torch

    from dladiff.budget import layer2_bound
    from dladiff.data import to_tensor
    from dladiff.faces.align import alignment_matrix, warp_to_crop

    x = to_tensor(clean).requires_grad_(True)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for face in faces:
        total = 0.0
        for encoder in models.encoders.values():
            M = torch.as_tensor(alignment_matrix(face.landmarks, encoder.template), dtype=torch.float32)
            embedding = encoder(warp_to_crop(x, M, encoder.crop_size))[0]
            direction = torch.randn(embedding.shape, generator=generator)
            total = total + torch.nn.functional.cosine_similarity(embedding, direction, dim=0)
        (grad,) = torch.autograd.grad(total, x)
        mass = grad[0].abs().sum(0).numpy()
        row = {"bbox": [round(float(v), 1) for v in face.bbox]}
        for margin in margins:
            bound, _ = layer2_bound(clean, [face], 1.0, dataclasses.replace(budget, face_mask=True, perceptual=False, margin=margin))
            row[f"margin_{margin:g}"] = round(float(mass[bound > 0].sum() / mass.sum()), 4)
        rows.append(row)
    return rows


def identity(faces: list[dict]) -> dict:
    """Per judge and view: faces judged, the share judged another person / still detected, the mean score.

    The score is the judge's distance (dlib: another person above 0.6) or cosine (another person below its threshold).
    """
    out: dict = {}
    for face in faces:
        for judge, views in face["native"].items():
            for view, verdict in views.items():
                if verdict["detected"] is None:
                    continue
                row = out.setdefault(judge, {}).setdefault(view, {"faces": 0, "other_person": 0, "detected": 0, "scores": []})
                row["faces"] += 1
                row["scores"].append(verdict.get("distance", verdict.get("cosine")))
                row["other_person"] += verdict["same_person"] is False
                row["detected"] += bool(verdict["detected"])
    for views in out.values():
        for row in views.values():
            row["other_person_share"] = round(row["other_person"] / row["faces"], 3)
            scores = [v for v in row.pop("scores") if v is not None]
            row["mean_score"] = round(float(np.mean(scores)), 4) if scores else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="default")
    parser.add_argument("--set", action="append", default=[], help="override, e.g. layer2.steps=50")
    parser.add_argument("--only", help="comma-separated photo names to keep")
    parser.add_argument("--photos", type=Path, action="append", default=[],
                        help="more photos: a file, or a folder of .jpg/.png (repeatable)")
    parser.add_argument("--settings", help="comma-separated settings to run (default: all three)")
    parser.add_argument("--mobileface", type=Path, help="mobileface.onnx: a leave-one-out judge (never in the loop)")
    parser.add_argument("--margins", help="comma-separated hull margins (eye gaps): only measure the encoders' "
                        "gradient mass inside the grown hull for each, no protection run")
    parser.add_argument("--flat-std", type=float, default=2.0, help="0-255 luminance std at or below which a "
                        "hull pixel counts as flat (fixed, whatever the budget rule measured)")
    parser.add_argument("--textured-std", type=float, default=12.0, help="0-255 std at or above which it is textured")
    parser.add_argument("--texture-window", type=int, default=7, help="pixels, side of the box the std is read in")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()

    import dataclasses

    import torch

    from dladiff.budget import layer2_bound, local_std, luminance
    from dladiff.config import load_config, parse_overrides, with_overrides
    from dladiff.faces.verdicts import OnnxJudge, native_verdicts
    from dladiff.layer2 import prepare_layer2, protect_image

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    overrides = parse_overrides(args.set)
    cfg = with_overrides(cfg, **overrides) if overrides else cfg
    models = prepare_layer2(cfg.layer2)
    extra = {"mobileface": OnnxJudge("mobileface", args.mobileface, MOBILEFACE_THRESHOLD)} if args.mobileface else {}
    photos = real_photos(args.photos)
    if args.only:
        photos = {k: v for k, v in photos.items() if k in args.only.split(",")}
    chosen = args.settings.split(",") if args.settings else list(SETTINGS)
    rows = []
    for name, clean in photos.items():
        faces = models.detector.detect(clean)
        if args.margins:
            margins = [float(m) for m in args.margins.split(",")]
            rows.append({"photo": name, "coverage": margin_coverage(clean, faces, models, cfg.budget, margins)})
            continue
        hull_budget = dataclasses.replace(cfg.budget, face_mask=True, perceptual=False)
        bound, _ = layer2_bound(clean, faces, cfg.layer2.epsilon, hull_budget)
        region = bound > 0 if bound is not None else np.zeros(clean.shape[:2], bool)
        texture = local_std(luminance(clean), args.texture_window)
        for setting in chosen:
            budget = dataclasses.replace(cfg.budget, **SETTINGS[setting])
            start = time.perf_counter()
            protected, reports = protect_image(clean, clean, models, cfg.layer2, cfg.runtime.seed, cfg.eot, budget)
            seconds = time.perf_counter() - start
            verdicts = [dict(face["native"]) for face in reports]
            if extra and reports:
                for entry, more in zip(verdicts, native_verdicts(clean, protected, extra, [f["bbox"] for f in reports])):
                    entry.update(more)
            rows.append({"photo": name, "setting": setting, "faces": len(reports), "seconds": round(seconds, 1),
                         **quality(clean, protected, region, texture, args.flat_std, args.textured_std),
                         "identity": identity([{"native": v} for v in verdicts]),
                         "steps": [f["steps"] for f in reports], "bound_scale": [f["bound_scale"] for f in reports]})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    result = {"budget": dataclasses.asdict(cfg.budget),
              "flat": {"std_at_most": args.flat_std, "textured_std_at_least": args.textured_std, "window": args.texture_window}, "layer2_epsilon_255": cfg.layer2.epsilon * 127.5,
              "encoders": models.weights, "white_box_judges": list(models.judges), "leave_one_out_judges": list(extra),
              "torch_threads": torch.get_num_threads(), "photos": rows}
    json.dump(result, sys.stdout, indent=1, default=str)
    print()


if __name__ == "__main__":
    main()
