"""Loading and saving portraits.

Photos are read with PIL (JPEG, PNG, WebP, ...), EXIF orientation applied, and converted to 8-bit
RGB (RGBA is composited on white, greyscale replicated, 16-bit scaled down). In memory a photo is
an ``(H, W, 3) uint8`` array; tensors for the models are ``(N, 3, H, W) float32`` in [-1, 1].
Outputs are lossless PNG without metadata, written atomically (temporary file, then rename).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from dladiff.errors import InputError

log = logging.getLogger("dladiff")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


@dataclass(frozen=True)
class Portrait:
    """One input photo: its path, 8-bit RGB pixels ``(H, W, 3)`` and the SHA-256 of the file."""

    path: Path
    pixels: np.ndarray
    sha256: str

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def output_name(self) -> str:
        """``photo.jpg`` -> ``photo.png``."""
        return self.path.stem + ".png"


@dataclass(frozen=True)
class SkippedFile:
    """A file that could not be used, and why."""

    path: Path
    reason: str


def _to_rgb8(img: Image.Image) -> np.ndarray:
    """Convert any PIL mode (RGBA, LA, P, L, I;16, I, F, CMYK, ...) to ``(H, W, 3) uint8`` RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def load_portrait(path: Path) -> Portrait:
    """Read one photo; raises :class:`InputError` naming the file if PIL cannot decode it."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read the file ({exc.strerror})") from None
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            pixels = _to_rgb8(img)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"{path}: not a readable image ({exc}); remove it or convert it to PNG/JPEG") from None
    if pixels.shape[0] < 8 or pixels.shape[1] < 8:
        raise InputError(f"{path}: image is too small ({pixels.shape[1]}x{pixels.shape[0]} pixels)")
    return Portrait(path=path, pixels=pixels, sha256=hashlib.sha256(raw).hexdigest())


def scan_photo_folder(folder: Path) -> tuple[list[Path], list[SkippedFile]]:
    """Files of ``folder`` (not recursive), sorted by name, and the entries passed over with the reason.

    Every regular file is returned, not only known image suffixes, so that a file the user meant
    as a photo but that cannot be decoded is reported rather than silently ignored. Hidden files
    with an image suffix (``.x.png``, ``..png``) and dangling symbolic links are passed over and
    named; other hidden files (``.DS_Store``) and sub-folders are ignored.
    """
    folder = Path(folder)
    if not folder.exists():
        raise InputError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder; give a folder of photos")
    files, passed_over = [], []
    for path in sorted(folder.iterdir()):
        if path.is_symlink() and not path.exists():
            passed_over.append(SkippedFile(path, f"{path}: dangling symbolic link (its target does not exist); fix or remove it"))
        elif path.name.startswith("."):
            if path.is_file() and path.name.lower().endswith(tuple(IMAGE_SUFFIXES)):
                passed_over.append(SkippedFile(path, f"{path}: hidden file (name starts with '.'); rename it to protect it"))
        elif path.is_file():
            files.append(path)
    if not files and not passed_over:
        raise InputError(f"{folder}: the folder is empty; put the portraits to protect in it")
    return files, passed_over


def list_photo_files(folder: Path) -> list[Path]:
    """The files :func:`scan_photo_folder` would load (hidden files and dangling links left out)."""
    return scan_photo_folder(folder)[0]


def frame_count(path: Path) -> int:
    """Frames (pages) of an image file: more than 1 for animated GIF/WebP/PNG and multi-page TIFF."""
    try:
        with Image.open(path) as img:
            return int(getattr(img, "n_frames", 1))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return 1


def load_folder(folder: Path) -> tuple[list[Portrait], list[SkippedFile]]:
    """Load every photo of ``folder``; unreadable files are returned as skipped, not raised.

    A file with several frames (GIF, TIFF, ...) is protected as its first frame, with a warning.
    """
    files, skipped = scan_photo_folder(folder)
    portraits = []
    for path in files:
        try:
            portraits.append(load_portrait(path))
        except InputError as exc:
            skipped.append(SkippedFile(path, str(exc)))
            continue
        frames = frame_count(path)
        if frames > 1:
            log.warning("%s has %d frames; only the first one is protected (the output is a single PNG)", path, frames)
    names = [p.output_name for p in portraits]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        kept = []
        for p in portraits:
            if p.output_name in duplicates and p.path.suffix.lower() != ".png":
                skipped.append(SkippedFile(p.path, f"{p.path}: output name {p.output_name} clashes with another input; rename one"))
            else:
                kept.append(p)
        portraits = kept
    if not portraits:
        reasons = "; ".join(s.reason for s in skipped)
        raise InputError(f"{folder}: no readable photo ({reasons})")
    return portraits, skipped


def check_output_folder(inputs: Path, out: Path) -> None:
    """The output folder must not be the input folder (inputs are never written over), nor a file."""
    if Path(out).resolve() == Path(inputs).resolve():
        raise InputError(f"--out {out} is the input folder; choose another folder so the originals stay untouched")
    if Path(out).exists() and not Path(out).is_dir():
        raise InputError(f"--out {out} is a file, not a folder; give the name of a folder (it is created if missing)")


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """``(H, W, 3) uint8`` -> ``(1, 3, H, W) float32`` in [-1, 1]."""
    t = torch.from_numpy(np.array(pixels, dtype=np.float32)).permute(2, 0, 1)
    return (t / 127.5 - 1.0).unsqueeze(0)


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize ``(N, C, H, W)`` to ``size`` = (H, W) with a convex combination of pixels.

    Bilinear when enlarging and area averaging when shrinking: every output pixel is a convex
    combination of input pixels, so ``‖resize(δ)‖∞ ≤ ‖δ‖∞`` and [-1, 1] ranges are kept.
    """
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    h, w = x.shape[-2:]
    if size[0] <= h and size[1] <= w:
        return F.interpolate(x, size=size, mode="area")
    if size[0] >= h and size[1] >= w:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return F.interpolate(F.interpolate(x, size=(min(h, size[0]), min(w, size[1])), mode="area"), size=size, mode="bilinear", align_corners=False)


def model_batch(portraits: list[Portrait], resolution: int) -> torch.Tensor:
    """Stack photos resized to ``resolution``² into ``(N, 3, R, R)`` in [-1, 1]."""
    return torch.cat([resize(to_tensor(p.pixels), (resolution, resolution)) for p in portraits])


def apply_perturbation(pixels: np.ndarray, delta: torch.Tensor, bound_255: float) -> np.ndarray:
    """Add ``delta`` ((3, h, w), [-1,1] units, any size) to ``pixels`` and quantize to uint8.

    ``delta`` is resized to the photo's size (convex, bound-preserving), added in 0-255 units,
    rounded, and the difference is clipped to ``floor(bound_255)`` so that quantization can never
    push the saved photo past the bound.
    """
    h, w = pixels.shape[:2]
    d255 = resize(delta.detach().float().cpu().unsqueeze(0), (h, w))[0].permute(1, 2, 0).numpy() * 127.5
    base = pixels.astype(np.float64)
    out = np.clip(np.round(base + d255), 0, 255)
    limit = np.floor(bound_255 + 1e-6)
    out = np.clip(out, base - limit, base + limit)
    return out.astype(np.uint8)


def linf_255(a: np.ndarray, b: np.ndarray) -> float:
    """L∞ distance of two uint8 images in 0-255 units."""
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (peak 255); ``inf`` when identical. Higher = closer."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp)`` on a short temporary name beside ``path``, then rename it to ``path``.

    The temporary name (``.dladiff-tmp-<random>.tmp``) stays short, so any name the file system
    allows for ``path`` works; it is created with mode 0o666 less the umask, as ``open()`` would.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".dladiff-tmp-{secrets.token_hex(6)}.tmp"  # torch.save needs a dot after the first character
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_png(pixels: np.ndarray, path: Path) -> None:
    """Write ``(H, W, 3) uint8`` as a lossless PNG with no metadata, atomically."""
    atomic_write(Path(path), lambda tmp: Image.fromarray(pixels, "RGB").save(tmp, format="PNG"))


def strict_json_value(value):
    """``value`` with every NaN / ±Infinity float replaced by ``None`` (strict JSON has neither), recursively."""
    if isinstance(value, dict):
        return {k: strict_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json_value(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def save_json(data: dict, path: Path) -> None:
    """Write strict JSON atomically (indented, UTF-8); a non-finite number is written as ``null``."""
    text = json.dumps(strict_json_value(data), indent=2, default=str, allow_nan=False) + "\n"
    atomic_write(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_torch_save(obj, path: Path) -> None:
    """``torch.save`` through a temporary file and a rename, so a crash never leaves half a file."""
    atomic_write(Path(path), lambda tmp: torch.save(obj, tmp))
