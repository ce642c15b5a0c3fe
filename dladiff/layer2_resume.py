"""Per-photo checkpoints of layer 2, so that an interrupted run keeps every photo it finished.

Each finished photo is stored in ``RUN_DIR/layer2/<key>.png`` (lossless, the layer-2 output) with
``<key>.json`` (its face report and the PNG's SHA-256). The key hashes everything that determines
the result: the clean photo's hash, the layer-2 input pixels (layer 1's output, or the clean photo),
the layer-2 and EOT settings, the encoders and their weights and the photo's seed. Nothing is
unpickled: a pair that does not match its key or its hash is ignored, and the photo is redone.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from dladiff.config import Config, config_to_dict
from dladiff.data import atomic_write, encode_png, file_sha256, save_json

log = logging.getLogger("dladiff")

FOLDER = "layer2"


def photo_key(clean_sha256: str, pixels: np.ndarray, cfg: Config, weights: dict[str, float], seed: int) -> str:
    """Hash of the inputs and settings of layer 2 on one photo."""
    payload = {"clean": clean_sha256, "input": hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest(),
               "shape": list(pixels.shape), "layer2": config_to_dict(cfg.layer2), "eot": config_to_dict(cfg.eot) if cfg.eot.on(2) else None, "budget": config_to_dict(cfg.budget),
               "weights": weights, "seed": seed}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class Layer2Checkpoints:
    """The finished photos of layer 2 in ``run_dir/layer2/``."""

    def __init__(self, run_dir: Path):
        self.folder = Path(run_dir) / FOLDER

    def load(self, key: str, shape: tuple[int, ...]) -> tuple[np.ndarray, dict] | None:
        """The stored (uint8 photo, report) for ``key``, or None when absent or not matching."""
        png, record = self.folder / f"{key}.png", self.folder / f"{key}.json"
        if not (png.is_file() and record.is_file()):
            return None
        try:
            data = json.loads(record.read_text(encoding="utf-8"))
            if data.get("key") != key or data.get("png_sha256") != file_sha256(png):
                raise ValueError("key or hash mismatch")
            with Image.open(png) as img:
                pixels = np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
            if pixels.shape != tuple(shape):
                raise ValueError(f"size {pixels.shape} instead of {tuple(shape)}")
            return pixels, data["report"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("layer-2 checkpoint %s is unusable (%s); redoing that photo", png, exc)
            return None

    def save(self, key: str, pixels: np.ndarray, report: dict) -> None:
        """Store one finished photo (PNG first, then the record that vouches for it)."""
        png = self.folder / f"{key}.png"
        atomic_write(png, lambda tmp: encode_png(pixels, tmp))  # lossless, the fast threaded encoder of the outputs
        save_json({"key": key, "png_sha256": file_sha256(png), "report": report}, self.folder / f"{key}.json")
