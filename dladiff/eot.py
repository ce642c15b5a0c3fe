"""Differentiable twins of the purifications, for expectation over transformations (EOT) while protecting.

Transforms of ``(N, 3, H, W)`` tensors in [-1, 1] whose gradients PGD follows (Athalye et al. 2018):
:func:`diff_jpeg` (8×8 DCT, IJG quantization tables scaled by quality, 4:2:0 chroma, straight-through
or cubic rounding — Shin & Song 2017), :func:`diff_resize`, :func:`gaussian_blur`; :func:`eot_transform`
draws a random composition of them (``eot`` config section). The uint8 purifications an attacker's
download goes through are in :mod:`dladiff.purify`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from dladiff.config import EOTConfig

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
