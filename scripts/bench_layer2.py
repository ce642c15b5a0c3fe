#!/usr/bin/env python
"""Benchmark layer 2 on real faces from installed packages and judge it with dlib's own pipeline.

    python scripts/bench_layer2.py [--config default] [--set layer2.epsilon=0.05 ...] [--jpeg 75]

Photos: insightface's ``t1.jpg`` (6 people) and scikit-image's astronaut. For every face that
dlib's own detector finds on the clean photo it reports the dlib descriptor distance between
clean and protected (dlib's detector, 68-point landmarks and ``compute_face_descriptor`` on the
saved PNG, and after a JPEG re-encode), the share of faces past dlib's 0.6 threshold, PSNR,
seconds per face and the measured L∞ bound, as JSON.
"""

import argparse
import json
import time

import numpy as np
from PIL import Image

from dladiff.config import load_config, parse_overrides, with_overrides
from dladiff.data import linf_255, psnr
from dladiff.purify import jpeg_uint8
from dladiff.faces.dlib_reference import DlibReference
from dladiff.layer2 import prepare_layer2, protect_image


def real_photos() -> dict[str, np.ndarray]:
    from pathlib import Path

    import insightface
    from skimage import data

    t1 = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
    return {"t1": np.asarray(Image.open(t1).convert("RGB")), "astronaut": data.astronaut()}






def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="default")
    parser.add_argument("--set", action="append", default=[], help="override, e.g. layer2.epsilon=0.05")
    parser.add_argument("--jpeg", type=int, default=75, help="JPEG quality of the re-encode check")
    args = parser.parse_args()
    cfg = load_config(args.config)
    overrides = parse_overrides(args.set)
    cfg = with_overrides(cfg, **overrides) if overrides else cfg
    models = prepare_layer2(cfg.layer2)
    judge = DlibReference()
    rows, png_d, jpg_d, seconds, faces_total, ism = [], [], [], 0.0, 0, {}
    for name, clean in real_photos().items():
        start = time.perf_counter()
        protected, faces = protect_image(clean, clean, models, cfg.layer2, cfg.runtime.seed)
        seconds += time.perf_counter() - start
        faces_total += len(faces)
        for face in faces:
            for encoder, entry in face["encoders"].items():
                ism.setdefault(encoder, []).append(entry["ism_pro"])
        d_png = judge.distances(clean, protected)
        d_jpg = judge.distances(clean, jpeg_uint8(protected, args.jpeg))
        png_d += d_png
        jpg_d += d_jpg
        rows.append({"photo": name, "faces_protected": len(faces), "psnr_db": round(psnr(protected, clean), 2),
                     "linf_255": linf_255(protected, clean), "dlib_distance_png": d_png, "dlib_distance_jpeg": d_jpg,
                     "steps": [f["steps"] for f in faces]})

    def share(ds):
        return sum(d is not None and d > 0.6 for d in ds) / max(len(ds), 1)

    result = {
        "layer2": {k: v for k, v in vars(cfg.layer2).items() if k not in ("model_root",)},
        "faces_judged": len(png_d),
        "share_past_0.6_png": share(png_d),
        f"share_past_0.6_jpeg{args.jpeg}": share(jpg_d),
        "still_detected_png": sum(d is not None for d in png_d) / max(len(png_d), 1),
        "mean_distance_png": float(np.mean([d for d in png_d if d is not None])),
        "seconds_per_face": seconds / max(faces_total, 1),
        "mean_ism_pro": {encoder: float(np.mean(values)) for encoder, values in ism.items()},
        "photos": rows,
    }
    print(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
