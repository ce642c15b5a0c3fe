"""Purification transforms that social networks apply to uploaded photos (``dladiff evaluate --purify``).

uint8 transforms (``(H, W, 3) uint8 → (H, W, 3) uint8``): what an attacker's download of a protected
photo has been through. Built by :func:`parse_purify` from a spec:

- ``jpeg:Q`` — JPEG at quality Q (1-100, PIL/libjpeg, 4:2:0 chroma subsampling; default 75);
- ``resize:S`` — resize by S in (0, 1] (PIL bicubic, antialiased) and back to the original size
  (default 0.5);
- ``blur:σ`` — Gaussian blur of standard deviation σ pixels (default 1.0).

Commas separate transforms evaluated **each alone**; ``+`` chains transforms **in sequence**:
``jpeg:75,resize:0.5,blur:1.0,resize:0.5+jpeg:75`` gives four purifications, the last one resizing
then compressing. Their differentiable twins, used while protecting (EOT), are in :mod:`dladiff.eot`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from PIL import Image

from dladiff.eot import gaussian_blur
from dladiff.errors import DladiffError

DEFAULT_PARAMETERS = {"jpeg": 75.0, "resize": 0.5, "blur": 1.0}


# ---------------------------------------------------------------- uint8 transforms

def jpeg_uint8(image: np.ndarray, quality: int) -> np.ndarray:
    """JPEG-compress and decode ``(H, W, 3) uint8`` with PIL (libjpeg, default 4:2:0 subsampling)."""
    buffer = io.BytesIO()
    Image.fromarray(image, "RGB").save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB")).copy()


def resize_uint8(image: np.ndarray, scale: float) -> np.ndarray:
    """Resize by ``scale`` and back to the original size (PIL bicubic, antialiased)."""
    h, w = image.shape[:2]
    small = (max(1, round(w * scale)), max(1, round(h * scale)))
    down = Image.fromarray(image, "RGB").resize(small, Image.Resampling.BICUBIC)
    return np.asarray(down.resize((w, h), Image.Resampling.BICUBIC)).copy()


def blur_uint8(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur (:func:`gaussian_blur`, edge replication) of ``(H, W, 3) uint8``, rounded back."""
    x = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1).unsqueeze(0)
    y = gaussian_blur(x, sigma)[0].permute(1, 2, 0).numpy()
    return np.clip(np.round(y), 0, 255).astype(np.uint8)


UINT8_TRANSFORMS: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    "jpeg": jpeg_uint8, "resize": resize_uint8, "blur": blur_uint8,
}


@dataclass(frozen=True)
class Transform:
    """A purification: one or more (kind, parameter) steps applied in order to ``(H, W, 3) uint8``."""

    steps: tuple[tuple[str, float], ...] = field(default_factory=tuple)

    @property
    def name(self) -> str:
        """The spec that builds it, e.g. ``jpeg:75`` or ``resize:0.5+jpeg:75``."""
        return "+".join(f"{kind}:{_format_parameter(kind, p)}" for kind, p in self.steps)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        for kind, parameter in self.steps:
            image = UINT8_TRANSFORMS[kind](image, parameter)
        return image


def _format_parameter(kind: str, parameter: float) -> str:
    return str(int(parameter)) if kind == "jpeg" else f"{parameter:g}"


def _parse_step(text: str) -> tuple[str, float]:
    kind, _, value = text.strip().partition(":")
    kind = kind.strip().lower()
    if kind not in UINT8_TRANSFORMS:
        raise DladiffError(f"--purify: unknown transform {text.strip()!r}; use jpeg:Q, resize:S or blur:SIGMA")
    try:
        parameter = float(value) if value.strip() else DEFAULT_PARAMETERS[kind]
    except ValueError:
        raise DladiffError(f"--purify: {text.strip()!r}: the parameter must be a number") from None
    valid = {"jpeg": 1 <= parameter <= 100 and parameter == int(parameter), "resize": 0 < parameter <= 1, "blur": parameter > 0}
    if not valid[kind]:
        rules = {"jpeg": "an integer quality in 1..100", "resize": "a scale in (0, 1]", "blur": "a sigma > 0 (pixels)"}
        raise DladiffError(f"--purify: {text.strip()!r}: {kind} takes {rules[kind]}")
    return kind, parameter


def parse_purify(spec: str) -> list[Transform]:
    """``jpeg:75,resize:0.5,blur:1.0`` → three transforms; ``resize:0.5+jpeg:75`` → one sequence."""
    parts = [p for p in (spec or "").split(",") if p.strip()]
    if not parts:
        raise DladiffError("--purify: give at least one transform, e.g. jpeg:75,resize:0.5,blur:1.0")
    return [Transform(tuple(_parse_step(step) for step in part.split("+"))) for part in parts]
