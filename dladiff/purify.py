"""Purification transforms that social networks apply to uploaded photos, and their differentiable twins.

Two families, one parameterization:

* **uint8 transforms** (``(H, W, 3) uint8 → (H, W, 3) uint8``) for ``dladiff evaluate --purify``: what an
  attacker's download of a protected photo has been through. Built by :func:`parse_purify` from a spec:

  - ``jpeg:Q`` — JPEG at quality Q (1-100, PIL/libjpeg, 4:2:0 chroma subsampling; default 75);
  - ``resize:S`` — resize by S in (0, 1] (PIL bicubic, antialiased) and back to the original size
    (default 0.5);
  - ``blur:σ`` — Gaussian blur of standard deviation σ pixels (default 1.0).

  Commas separate transforms evaluated **each alone**; ``+`` chains transforms **in sequence**:
  ``jpeg:75,resize:0.5,blur:1.0,resize:0.5+jpeg:75`` gives four purifications, the last one resizing
  then compressing.

* **differentiable transforms** on ``(N, 3, H, W)`` tensors in [-1, 1] for expectation over
  transformations (EOT, Athalye et al. 2018) during PGD: :func:`diff_jpeg` (8×8 DCT, IJG quantization
  tables scaled by quality, straight-through or cubic rounding — Shin & Song 2017), :func:`diff_resize`,
  :func:`gaussian_blur`; :func:`eot_transform` draws a random composition of them.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dladiff.config import EOTConfig
from dladiff.errors import DladiffError

# IJG / JPEG Annex K base quantization tables (quality 50).
LUMA_TABLE = (
    (16, 11, 10, 16, 24, 40, 51, 61), (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56), (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77), (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101), (72, 92, 95, 98, 112, 100, 103, 99),
)
CHROMA_TABLE = (
    (17, 18, 24, 47, 99, 99, 99, 99), (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99), (47, 66, 99, 99, 99, 99, 99, 99),
) + ((99,) * 8,) * 4

# JFIF full-range RGB ↔ YCbCr (BT.601), on 0-255 values; chroma is offset by 128.
RGB_TO_YCBCR = ((0.299, 0.587, 0.114), (-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))
YCBCR_TO_RGB = ((1.0, 0.0, 1.402), (1.0, -0.344136, -0.714136), (1.0, 1.772, 0.0))

DEFAULT_PARAMETERS = {"jpeg": 75.0, "resize": 0.5, "blur": 1.0}


# ---------------------------------------------------------------- differentiable transforms

def quantization_table(quality: int, chroma: bool = False) -> torch.Tensor:
    """The 8×8 IJG table for ``quality`` (1-100): base·s/100 rounded, s = 5000/q (q < 50) or 200 − 2q, in [1, 255]."""
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    base = torch.tensor(CHROMA_TABLE if chroma else LUMA_TABLE, dtype=torch.float64)
    return torch.floor((base * scale + 50) / 100).clamp(1, 255).float()


def dct_matrix(size: int = 8) -> torch.Tensor:
    """Orthonormal DCT-II matrix D (``D @ b @ Dᵀ`` is JPEG's 2-D forward DCT of a block b)."""
    k = torch.arange(size, dtype=torch.float64)
    d = torch.cos((2 * k[None, :] + 1) * k[:, None] * math.pi / (2 * size)) * math.sqrt(2 / size)
    d[0] /= math.sqrt(2)
    return d.float()


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Exact rounding forward, identity gradient (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def round_cubic(x: torch.Tensor) -> torch.Tensor:
    """Shin & Song's smooth rounding ⌊x⌉ + (x − ⌊x⌉)³ (forward is approximate too)."""
    r = torch.round(x)
    return r + (x - r) ** 3


ROUNDINGS = {"ste": round_ste, "cubic": round_cubic}


def _color(x: torch.Tensor, matrix) -> torch.Tensor:
    m = torch.tensor(matrix, dtype=x.dtype, device=x.device)
    return torch.einsum("ij,njhw->nihw", m, x)


def _pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Replicate the last row/column up to a multiple of ``multiple`` (as libjpeg pads its MCUs)."""
    h, w = x.shape[-2:]
    return F.pad(x, (0, -w % multiple, 0, -h % multiple), mode="replicate")


def _quantize_blocks(plane: torch.Tensor, table: torch.Tensor, rounding) -> torch.Tensor:
    """DCT of every 8×8 block of ``plane`` (N, C, H, W), quantize by ``table`` (8×8), dequantize, inverse DCT."""
    n, c, h, w = plane.shape
    d = dct_matrix().to(plane)
    blocks = plane.reshape(n, c, h // 8, 8, w // 8, 8).permute(0, 1, 2, 4, 3, 5)
    coefficients = d @ blocks @ d.T
    table = table.to(plane)
    restored = d.T @ (rounding(coefficients / table) * table) @ d
    return restored.permute(0, 1, 2, 4, 3, 5).reshape(n, c, h, w)


def diff_jpeg(x: torch.Tensor, quality: int, rounding: Literal["ste", "cubic"] = "ste") -> torch.Tensor:
    """Differentiable JPEG (baseline, 4:2:0) of ``x`` ``(N, 3, H, W)`` in [-1, 1]; same shape and range.

    RGB → YCbCr, chroma averaged over 2×2 and restored with bilinear ("fancy") upsampling, level shift
    −128, 8×8 DCT, division by the quality-scaled IJG tables, rounding (``ste`` or ``cubic``),
    dequantization, inverse DCT, back to RGB. The final clamp to [-1, 1] is the only other non-linearity.
    """
    h, w = x.shape[-2:]
    ycc = _color(_pad_to((x + 1) * 127.5, 16), RGB_TO_YCBCR)
    luma, chroma = ycc[:, :1], F.avg_pool2d(ycc[:, 1:], 2)
    rnd = ROUNDINGS[rounding]
    luma = _quantize_blocks(luma - 128, quantization_table(quality), rnd) + 128
    chroma = _quantize_blocks(chroma, quantization_table(quality, chroma=True), rnd)
    chroma = F.interpolate(chroma, scale_factor=2, mode="bilinear", align_corners=False)
    rgb = _color(torch.cat([luma, chroma], dim=1), YCBCR_TO_RGB)[..., :h, :w]
    return (rgb / 127.5 - 1).clamp(-1, 1)


def diff_resize(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Resize ``(N, C, H, W)`` by ``scale`` (bicubic, antialiased when shrinking) and back to (H, W)."""
    h, w = x.shape[-2:]
    small = (max(1, round(h * scale)), max(1, round(w * scale)))
    if small == (h, w):
        return x
    down = F.interpolate(x, size=small, mode="bicubic", align_corners=False, antialias=True)
    return F.interpolate(down, size=(h, w), mode="bicubic", align_corners=False).clamp(-1, 1)


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """1-D Gaussian of standard deviation ``sigma`` pixels, radius ⌈3σ⌉, summing to 1."""
    radius = max(1, math.ceil(3 * sigma))
    k = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-(k**2) / (2 * sigma**2))
    return (g / g.sum()).float()


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(N, C, H, W)`` with edge replication; ``sigma <= 0`` is the identity."""
    if sigma <= 0:
        return x
    g = gaussian_kernel(sigma).to(x)
    c, r = x.shape[1], (len(g) - 1) // 2
    x = F.pad(x, (r, r, r, r), mode="replicate")
    x = F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


# ---------------------------------------------------------------- expectation over transformations

def eot_transform(x: torch.Tensor, generator: torch.Generator, cfg: EOTConfig) -> torch.Tensor:
    """One random draw of the EOT composition applied to ``x`` ``(N, 3, H, W)`` in [-1, 1] (differentiable).

    Always consumes six numbers of the CPU ``generator`` (three coin flips, three parameters), so a
    run's random stream does not depend on which transforms were drawn. Runs in fp32 outside autocast
    (a bf16 DCT would be far coarser than JPEG's own quantization); returns ``x``'s dtype.
    """
    coins = torch.rand(3, generator=generator).tolist()
    u = torch.rand(3, generator=generator).tolist()
    q_lo, q_hi = cfg.jpeg_quality
    with torch.autocast(x.device.type, enabled=False):
        y = x.float()
        if coins[0] < cfg.probability:
            y = diff_jpeg(y, q_lo + min(int(u[0] * (q_hi - q_lo + 1)), q_hi - q_lo), cfg.rounding)
        if coins[1] < cfg.probability:
            y = diff_resize(y, cfg.resize_scale[0] + u[1] * (cfg.resize_scale[1] - cfg.resize_scale[0]))
        if coins[2] < cfg.probability:
            y = gaussian_blur(y, cfg.blur_sigma[0] + u[2] * (cfg.blur_sigma[1] - cfg.blur_sigma[0]))
    return y.to(x.dtype)


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
