"""Loading and saving portraits.

Photos are read with PIL (JPEG, PNG, WebP, ...), EXIF orientation applied, embedded ICC profiles
converted to sRGB, and converted to 8-bit RGB (RGBA is composited on white, greyscale replicated,
16-bit scaled down; a greyscale photo's output is greyscale too). A photo above
``input.max_megapixels`` is refused from its header, before any pixel is decoded. In memory a photo is an ``(H, W, 3) uint8`` array; tensors
for the models are ``(N, 3, R, R) float32`` in [-1, 1]: each photo as DreamBooth's data loader
gives it (resize of the short side to R, then centre crop), and δ1 goes back into that window.
Full-size work (δ brought back to the photo, PSNR, L∞) runs in row strips of
:data:`STRIP_ROWS` so that memory stays a few copies of the uint8 photo.
Outputs are lossless PNG without metadata, written atomically (temporary file, fsync, then rename);
a failed write (a full disk) is a clear error that names the file.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import math
import os
import secrets
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from dladiff.config import InputConfig
from dladiff.errors import DladiffError, InputError
from dladiff.png import write_png

log = logging.getLogger("dladiff")

log = logging.getLogger("dladiff")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
STRIP_ROWS = 64
ORIENTATION = 0x0112
"""Rows of a photo processed at once by the full-size pixel functions."""


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
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(np.round(arr * np.float32(255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return np.array(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)


SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def _to_srgb(img: Image.Image, path: Path) -> Image.Image:
    """``img`` converted from its embedded RGB or CMYK ICC profile to sRGB (unchanged without one).

    Profiles describing sRGB are left alone; grey profiles too (the output stays greyscale).
    """
    icc = img.info.get("icc_profile")
    if not icc:
        return img
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    except (OSError, ImageCms.PyCMSError) as exc:
        log.warning("%s: unreadable ICC profile ignored (%s); colours read as sRGB", path, exc)
        return img
    space = source.profile.xcolor_space.strip()
    if "srgb" in (source.profile.profile_description or "").lower() or (space, img.mode) not in (
            ("RGB", "RGB"), ("RGB", "RGBA"), ("RGB", "P"), ("CMYK", "CMYK")):
        return img
    if img.mode == "P":
        img = img.convert("RGBA")
    alpha = img.getchannel("A") if img.mode == "RGBA" else None
    converted = ImageCms.profileToProfile(img.convert("RGB") if alpha else img, source, SRGB, outputMode="RGB")
    if alpha is not None:
        converted.putalpha(alpha)
    return converted


def check_pixel_count(path: Path, size: tuple[int, int], max_megapixels: float) -> None:
    """Refuse a photo above ``max_megapixels`` (10⁶ pixels) from its header size, before decoding."""
    width, height = size
    if width * height > max_megapixels * 1e6:
        raise InputError(f"{path}: {width}x{height} is {width * height / 1e6:.1f} megapixels, above the limit of "
                         f"{max_megapixels:g} (input.max_megapixels); downscale the photo or raise the limit")


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_portrait(path: Path, max_megapixels: float = InputConfig.max_megapixels) -> Portrait:
    """Read one photo; raises :class:`InputError` naming the file if it cannot be used.

    The pixel count is checked from the header first (``max_megapixels``; PIL's decompression-bomb
    ceiling, 2 × ``Image.MAX_IMAGE_PIXELS``, is reported the same way). A file with several frames
    (GIF, TIFF, WebP) gives a warning and its first frame is used.
    """
    path = Path(path)
    try:
        sha256 = file_sha256(path)
    except OSError as exc:
        raise InputError(f"{path}: cannot read the file ({exc.strerror})") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_megapixels decides, below
            with Image.open(path) as img:
                check_pixel_count(path, img.size, max_megapixels)
                frames = getattr(img, "n_frames", 1)
                if frames > 1:
                    log.warning("%s: the file holds %d frames; only the first is protected", path, frames)
                img.load()
                if img.getexif().get(ORIENTATION, 1) != 1:  # exif_transpose would copy an upright photo too
                    img = ImageOps.exif_transpose(img)
                pixels = _to_rgb8(_to_srgb(img, path))
    except Image.DecompressionBombError as exc:
        raise InputError(f"{path}: too many pixels ({exc}); downscale the photo") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, ImageCms.PyCMSError) as exc:
        raise InputError(f"{path}: not a readable image ({exc}); remove it or convert it to PNG/JPEG") from None
    if pixels.shape[0] < 8 or pixels.shape[1] < 8:
        raise InputError(f"{path}: image is too small ({pixels.shape[1]}x{pixels.shape[0]} pixels)")
    return Portrait(path=path, pixels=pixels, sha256=sha256)


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


def load_folder(folder: Path, max_megapixels: float = InputConfig.max_megapixels) -> tuple[list[Portrait], list[SkippedFile]]:
    """Load every photo of ``folder``; unreadable files are returned as skipped, not raised.

    A file with several frames (GIF, TIFF, ...) is protected as its first frame, with a warning
    (:func:`load_portrait`).
    """
    files, skipped = scan_photo_folder(folder)
    portraits = []
    for path in files:
        try:
            portraits.append(load_portrait(path, max_megapixels))
        except InputError as exc:
            skipped.append(SkippedFile(path, str(exc)))
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


def loader_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """(H, W) after ``torchvision.transforms.Resize(resolution)``: the short side becomes
    ``resolution``, the long side ``int(resolution · long / short)``."""
    if height <= width:
        return resolution, int(resolution * width / height)
    return int(resolution * height / width), resolution


def _loader_crop(height: int, width: int, resolution: int) -> tuple[int, int, int, int]:
    """(new_h, new_w, top, left): torchvision's Resize(R) size and CenterCrop(R) offsets."""
    new_h, new_w = loader_size(height, width, resolution)
    return new_h, new_w, round((new_h - resolution) / 2.0), round((new_w - resolution) / 2.0)


def _axis_taps(n_photo: int, n_loader: int, offset: int, resolution: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """Photo pixels covered by the loader's crop along one axis, and their bilinear taps in the model frame.

    Model pixel ``k`` covers photo coordinates ``[(offset + k)·s, (offset + k + 1)·s)`` with
    ``s = n_photo / n_loader``. Returns ``(first, i0, i1, w1)``: photo pixels ``first ..
    first + len(i0) − 1`` have centres inside the crop, and each reads ``(1 − w1)·δ[i0] + w1·δ[i1]``
    (bilinear, ``align_corners=False``, clamped at the crop's edges): a convex combination.
    """
    scale = n_photo / n_loader
    start, stop = offset * scale, (offset + resolution) * scale
    first, last = max(0, int(np.ceil(start - 0.5))), min(n_photo - 1, int(np.floor(stop - 0.5)))
    u = np.clip((np.arange(first, last + 1) + 0.5 - start) / scale - 0.5, 0, resolution - 1)
    i0 = np.floor(u).astype(np.int64)
    return first, i0, np.minimum(i0 + 1, resolution - 1), (u - i0).astype(np.float32)


def model_frame(pixels: np.ndarray, resolution: int) -> torch.Tensor:
    """``(1, 3, R, R)`` in [-1, 1]: the photo as DreamBooth's data loader gives it to the model.

    Exactly ``Resize(R, BILINEAR)`` then ``CenterCrop(R)`` of torchvision on the PIL image (the
    pipeline of diffusers' ``train_dreambooth.py``): PIL's antialiased bilinear resize of the whole
    photo to :func:`loader_size`, then the centre ``R``² (torchvision's rounding), then
    ``x / 127.5 - 1``. Layer 1 optimizes δ1 in this frame, and the evaluation's attacker trains on it.
    """
    height, width = pixels.shape[:2]
    new_h, new_w, top, left = _loader_crop(height, width, resolution)
    image = Image.fromarray(pixels, "RGB")
    if (new_h, new_w) != (height, width):
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    crop = np.asarray(image.crop((left, top, left + resolution, top + resolution)))
    return torch.from_numpy(crop.astype(np.float32)).permute(2, 0, 1)[None] / 127.5 - 1.0


def model_batch(portraits: list[Portrait], resolution: int) -> torch.Tensor:
    """Stack the photos' model frames (:func:`model_frame`) into ``(N, 3, R, R)`` in [-1, 1]."""
    return torch.cat([model_frame(p.pixels, resolution) for p in portraits])


def delta_strips(delta: torch.Tensor, height: int, width: int):
    """δ ``(C, R, R)`` (model frame) mapped back into a ``height`` x ``width`` photo, a strip at a time.

    Yields ``(top, left, strip)``: ``strip`` ``(rows, cols, C)`` float32 is δ at the photo pixels
    from (top, left), inside the window the loader crops (:func:`model_frame`); δ is 0 elsewhere.
    Each value is a convex combination of δ's (bilinear taps of :func:`_axis_taps`), so the bound
    holds, and cropping the result as the loader does gives back δ up to the loader's resampling.
    """
    resolution = delta.shape[-1]
    new_h, new_w, top, left = _loader_crop(height, width, resolution)
    y0, r0, r1, rw = _axis_taps(height, new_h, top, resolution)
    x0, c0, c1, cw = _axis_taps(width, new_w, left, resolution)
    frame = delta.detach().float().cpu().permute(1, 2, 0).numpy()  # (R, R, C), the photo's layout
    cols = np.take(frame, c0, axis=1) * (1 - cw)[:, None] + np.take(frame, c1, axis=1) * cw[:, None]  # (R, cols, C)
    for start in range(0, len(r0), STRIP_ROWS):
        rows = slice(start, start + STRIP_ROWS)
        weight = rw[rows, None, None]
        strip = np.take(cols, r0[rows], axis=0)
        strip *= 1 - weight
        strip += np.take(cols, r1[rows], axis=0) * weight
        yield y0 + start, x0, strip


def _strips(*arrays: np.ndarray):
    """The same strips of rows of arrays of equal height."""
    for r0 in range(0, arrays[0].shape[0], STRIP_ROWS):
        yield tuple(a[r0:r0 + STRIP_ROWS] for a in arrays)


def is_greyscale(pixels: np.ndarray) -> bool:
    """Whether an ``(H, W, 3)`` photo has R = G = B everywhere (a greyscale input)."""
    return all(np.array_equal(s[..., 0], s[..., 1]) and np.array_equal(s[..., 0], s[..., 2]) for (s,) in _strips(pixels))


def grey_of(pixels: np.ndarray) -> np.ndarray:
    """``(H, W)`` uint8: the rounded mean of the three channels.

    If every channel of ``pixels`` is within ``k`` (an integer) of a grey photo ``g``, so is the mean,
    and rounding keeps it within ``k`` since ``g`` is an integer: the bound survives.
    """
    total = pixels.sum(axis=2, dtype=np.uint16)
    return ((total + 1) // 3).astype(np.uint8)


def apply_perturbation(pixels: np.ndarray, delta: torch.Tensor, bound_255: float, budget=None) -> np.ndarray:
    """Add δ1 ``(3, R, R)`` ([-1, 1] units, the model frame) to the photo and quantize to uint8.

    δ goes back into the window of the photo that the attacker's loader crops (:func:`delta_strips`,
    convex, bound-preserving); outside it the photo is unchanged. It is rounded in 0-255 units and
    clipped to ``floor(bound_255)``, so that quantization can never push the saved photo past the
    bound. On a greyscale photo δ is averaged over the channels, so the output stays grey. Runs in
    strips of rows: memory is the output plus a few strips.

    ``budget``: a :class:`~dladiff.config.BudgetConfig`; with ``perceptual`` on for layer 1, δ is clipped per
    pixel to the texture bound of the photo (:func:`dladiff.budget.texture_budget`), on the
    photo's own grid, before rounding.
    """
    from dladiff.budget import texture_budget_rows

    limit = np.floor(bound_255 + 1e-6)
    delta = delta.detach().float().cpu()
    if is_greyscale(pixels):
        delta = delta.mean(0, keepdim=True).expand(3, -1, -1)
    out = pixels.copy()
    for top, left, strip in delta_strips(delta * 127.5, *pixels.shape[:2]):
        rows = out[top:top + strip.shape[0], left:left + strip.shape[1]]
        np.rint(strip, out=strip)
        if budget is not None and budget.perceptual_on(1):
            local = texture_budget_rows(pixels, top, top + strip.shape[0], bound_255, budget.floor * 127.5, budget)
            local = np.floor(local[:, left:left + strip.shape[1], None] + 1e-6)
            np.clip(strip, -local, local, out=strip)
        np.clip(strip, -limit, limit, out=strip)
        strip += rows
        rows[...] = np.clip(strip, 0, 255, out=strip)
    return out


def linf_255(a: np.ndarray, b: np.ndarray) -> float:
    """L∞ distance of two uint8 images in 0-255 units."""
    return float(max(np.abs(x.astype(np.int16) - y).max() for x, y in _strips(a, b)))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (peak 255); ``inf`` when identical. Higher = closer."""
    sse = sum(int(np.square(x.astype(np.int32) - y).sum(dtype=np.int64)) for x, y in _strips(a, b))
    mse = sse / a.size
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def atomic_write(path: Path, write, keep_previous: Path | None = None) -> None:
    """Write ``path`` by ``write(tmp)`` on a temporary file beside it, fsync, then rename it over ``path``.

    A crash never leaves half a file. The temporary name (``.dladiff-tmp-<random>.tmp``) stays
    short, so any name the file system allows for ``path`` works; it is created with mode 0o666
    less the umask, as ``open()`` would. ``keep_previous``: the file being replaced is renamed to it
    first. An ``OSError`` (disk full, no permission, ...) removes the temporary file and becomes a
    :class:`~dladiff.errors.DladiffError` that names ``path`` and says what to do.
    """
    path, tmp = Path(path), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = short_temporary_file(path.parent)
        write(tmp)
        _fsync(tmp)
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
        tmp = None
        _fsync(path.parent)
    except OSError as exc:
        raise DladiffError(write_error_message(path, exc)) from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def short_temporary_file(folder: Path) -> Path:
    """A new empty file ``.dladiff-tmp-<random>.tmp`` in ``folder``, mode 0o666 less the umask."""
    tmp = folder / f".dladiff-tmp-{secrets.token_hex(6)}.tmp"  # torch.save needs a dot after the first character
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    return tmp


def _fsync(path) -> None:
    """Flush a file (or a folder's entries) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_error_message(path: Path, exc: OSError) -> str:
    """What went wrong writing ``path`` and what to do about it."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"{path}: cannot write it, the disk is full ({exc.strerror or exc}); free some space (or choose an "
                f"output folder on another disk) and run the command again")
    return f"{path}: cannot write it ({exc.strerror or exc}); check that its folder is writable and run the command again"


def encode_png(pixels: np.ndarray, target) -> None:
    """Encode ``(H, W, 3)`` (RGB) or ``(H, W)`` (greyscale) uint8 as PNG without metadata (:mod:`dladiff.png`)."""
    write_png(pixels, target)


def save_png(pixels: np.ndarray, path: Path) -> None:
    """Write ``(H, W, 3) uint8`` as a lossless PNG with no metadata, atomically."""
    atomic_write(Path(path), lambda tmp: encode_png(pixels, tmp))


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

