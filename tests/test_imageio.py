"""The image input/output path: pixel limit, frames, greyscale, ICC profiles, the loader's crop, PNG writing."""

import io
import logging
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms
from torchvision import transforms

from dladiff.config import ConfigError, load_config, with_overrides
from dladiff.data import (
    STRIP_ROWS,
    apply_perturbation,
    delta_strips,
    linf_255,
    load_folder,
    load_portrait,
    model_batch,
    model_frame,
    psnr,
    resize,
)
from dladiff.errors import InputError
from dladiff.png import adler32_combine, write_png
from dladiff.protect import save_checked_png


def header_only_png(path, width: int, height: int) -> None:
    """A PNG whose header claims ``width`` x ``height`` but holds (almost) no pixel data: decoding it fails."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def photo(real_photos, width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(real_photos["astronaut"]).resize((width, height), Image.Resampling.BICUBIC))


# --- pixel limit (issue 10 item 4) -------------------------------------------------------------------------------

def test_decompression_bomb_and_huge_header_are_skipped_and_the_good_photo_kept(tmp_path, real_photos):
    Image.fromarray(real_photos["hanks"]).save(tmp_path / "good.png")
    header_only_png(tmp_path / "bomb.png", 30000, 30000)  # above PIL's own ceiling: DecompressionBombError
    header_only_png(tmp_path / "zeros.png", 12000, 12000)  # 144 MP: refused from the header, never decoded
    portraits, skipped = load_folder(tmp_path)
    assert [p.name for p in portraits] == ["good.png"]
    reasons = {s.path.name: s.reason for s in skipped}
    assert set(reasons) == {"bomb.png", "zeros.png"}
    assert "bomb.png" in reasons["bomb.png"] and "too many pixels" in reasons["bomb.png"]
    assert "zeros.png" in reasons["zeros.png"] and "144.0 megapixels" in reasons["zeros.png"]
    assert "input.max_megapixels" in reasons["zeros.png"]  # says which setting to change, not a decode error


def test_pixel_limit_comes_from_the_config_and_is_validated(tmp_path, real_photos):
    Image.fromarray(real_photos["hanks"]).save(tmp_path / "good.png")  # 112 x 112 = 0.0125 MP
    with pytest.raises(InputError, match="good.png.*above the limit of 0.01"):
        load_portrait(tmp_path / "good.png", max_megapixels=0.01)
    assert load_config().input.max_megapixels == 100.0
    for bad in (0, -1, 500):
        with pytest.raises(ConfigError, match="input.max_megapixels"):
            with_overrides(load_config(), input={"max_megapixels": bad})
    with pytest.raises(ConfigError, match="max_pixels"):
        with_overrides(load_config(), input={"max_pixels": 5})


# --- frames, greyscale, ICC (issue 10 item 9) -----------------------------------------------------------------------

def test_multi_frame_file_warns_with_its_name_and_frame_count(tmp_path, caplog):
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    with caplog.at_level(logging.WARNING, logger="dladiff"):
        portrait = load_portrait(tmp_path / "anim.gif")
    assert "anim.gif" in caplog.text and "3 frames" in caplog.text and "first" in caplog.text
    assert tuple(portrait.pixels[0, 0]) == (255, 0, 0)
    caplog.clear()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(tmp_path / "one.gif")
    with caplog.at_level(logging.WARNING, logger="dladiff"):
        load_portrait(tmp_path / "one.gif")
    assert "frames" not in caplog.text


@pytest.mark.parametrize("mode", ["L", "LA", "I;16"])
def test_greyscale_input_comes_back_greyscale_within_the_bound(tmp_path, real_photos, mode):
    grey = np.asarray(Image.fromarray(real_photos["astronaut"]).convert("L").resize((96, 80)))
    if mode == "I;16":
        Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "in.png")
    else:
        Image.fromarray(grey).convert(mode).save(tmp_path / "in.png")
    portrait = load_portrait(tmp_path / "in.png")
    delta = torch.sign(torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(0))) * 0.05
    layer1 = apply_perturbation(portrait.pixels, delta, 0.05 * 127.5)
    assert np.array_equal(layer1[..., 0], layer1[..., 1]) and np.array_equal(layer1[..., 0], layer1[..., 2])
    assert linf_255(layer1, portrait.pixels) > 0
    coloured = np.clip(layer1.astype(int) + np.random.default_rng(0).integers(-6, 7, layer1.shape), 0, 255)
    coloured = np.clip(coloured, portrait.pixels.astype(int) - 12, portrait.pixels.astype(int) + 12).astype(np.uint8)
    measured = save_checked_png(coloured, portrait.pixels, 12, tmp_path / "out.png")  # layer 2 adds per-channel noise
    with Image.open(tmp_path / "out.png") as img:
        assert img.mode == "L"
        saved = np.asarray(img)
    assert measured == linf_255(saved, portrait.pixels[..., 0]) <= 12


def _profile(red, green, blue, gamma: float) -> bytes:
    """A minimal ICC v2 RGB matrix/TRC display profile (D50 PCS) with the given colorants (XYZ)."""
    def s15(v):
        return struct.pack(">i", round(v * 65536))

    def xyz(v):
        return b"XYZ \0\0\0\0" + b"".join(s15(c) for c in v)

    curve = b"curv\0\0\0\0" + struct.pack(">IH", 1, round(gamma * 256)) + b"\0\0"
    text = b"Wide test RGB\0"
    desc = b"desc\0\0\0\0" + struct.pack(">I", len(text)) + text + b"\0" * 4 + b"\0" * 4 + b"\0\0\0" + b"\0" * 67
    tags = [(b"desc", desc), (b"wtpt", xyz((0.9642, 1.0, 0.8249))), (b"rXYZ", xyz(red)), (b"gXYZ", xyz(green)),
            (b"bXYZ", xyz(blue)), (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]
    offset = 128 + 4 + 12 * len(tags)
    table, body = b"", b""
    for sig, data in tags:
        data += b"\0" * (-len(data) % 4)
        table += sig + struct.pack(">II", offset + len(body), len(data))
        body += data
    size = offset + len(body)
    header = (struct.pack(">I", size) + b"lcms" + bytes([2, 0x10, 0, 0]) + b"mntrRGB XYZ " + b"\0" * 12 + b"acsp"
              + b"\0" * 24 + b"\0" * 4 + s15(0.9642) + s15(1.0) + s15(0.8249) + b"\0" * 48)
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + body


ADOBE_LIKE = _profile((0.6097, 0.3111, 0.0195), (0.2053, 0.6257, 0.0609), (0.1492, 0.0632, 0.7446), 2.2)


def test_embedded_icc_profile_is_converted_to_srgb(tmp_path, real_photos):
    pixels = real_photos["astronaut"][::4, ::4]
    Image.fromarray(pixels).save(tmp_path / "wide.png", icc_profile=ADOBE_LIKE)
    expected = ImageCms.profileToProfile(Image.fromarray(pixels), ImageCms.ImageCmsProfile(io.BytesIO(ADOBE_LIKE)),
                                         ImageCms.createProfile("sRGB"), outputMode="RGB")
    loaded = load_portrait(tmp_path / "wide.png").pixels
    assert np.array_equal(loaded, np.asarray(expected))
    assert np.abs(loaded.astype(int) - pixels).max() > 20  # a wide-gamut photo read as sRGB would shift colours
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.fromarray(pixels).save(tmp_path / "srgb.png", icc_profile=srgb)
    assert np.array_equal(load_portrait(tmp_path / "srgb.png").pixels, pixels)


def test_unreadable_icc_profile_is_ignored_with_a_warning(tmp_path, real_photos, caplog):
    pixels = real_photos["hanks"]
    Image.fromarray(pixels).save(tmp_path / "bad.png", icc_profile=b"not a profile" * 10)
    with caplog.at_level(logging.WARNING, logger="dladiff"):
        loaded = load_portrait(tmp_path / "bad.png").pixels
    assert np.array_equal(loaded, pixels) and "bad.png" in caplog.text and "ICC" in caplog.text


# --- the loader's frame for non-square photos (issue 10 item 17) ----------------------------------------------------

def dreambooth_loader(resolution: int):
    """The instance-image transform of diffusers' train_dreambooth.py with --center_crop."""
    return transforms.Compose([transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
                               transforms.CenterCrop(resolution), transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])


@pytest.mark.parametrize("size", [(900, 600), (577, 901), (300, 100), (512, 512), (50, 60)])
def test_model_frame_is_exactly_what_dreambooth_loader_gives(real_photos, size):
    pixels = photo(real_photos, *size)
    expected = dreambooth_loader(64)(Image.fromarray(pixels))
    assert torch.equal(model_frame(pixels, 64)[0], expected)


def test_model_batch_is_not_stretched(real_photos):
    pixels = photo(real_photos, 900, 600)
    stretched = resize(torch.from_numpy(pixels.astype(np.float32)).permute(2, 0, 1)[None], (64, 64)) / 127.5 - 1
    frame = model_batch([type("P", (), {"pixels": pixels})()], 64)
    assert (frame - stretched).abs().mean() > 0.1  # the stretch and the crop differ, and the batch is the crop
    assert torch.equal(frame[0], dreambooth_loader(64)(Image.fromarray(pixels)))


@pytest.mark.parametrize("size", [(900, 600), (577, 901), (2000, 1500)])
def test_delta_reaches_the_attackers_frame_undistorted(real_photos, size):
    pixels = photo(real_photos, *size)
    loader = dreambooth_loader(64)
    g = torch.Generator().manual_seed(0)
    smooth = resize(torch.sign(torch.randn(1, 3, 8, 8, generator=g)) * 0.05, (64, 64))[0]
    noise = torch.sign(torch.randn(3, 64, 64, generator=g)) * 0.05
    clean = loader(Image.fromarray(pixels))
    for delta, min_corr, max_mean_255 in ((smooth, 0.95, 1.0), (noise, 0.8, 4.5)):
        out = apply_perturbation(pixels, delta, 0.05 * 127.5)
        assert linf_255(out, pixels) <= 6
        seen = loader(Image.fromarray(out)) - clean
        assert torch.corrcoef(torch.stack([seen.flatten(), delta.flatten()]))[0, 1] > min_corr
        assert (seen - delta).abs().mean() * 127.5 < max_mean_255
    changed = np.flatnonzero((out != pixels).any(axis=(0, 2)) if size[0] > size[1] else (out != pixels).any(axis=(1, 2)))
    resized = int(64 * max(size) / min(size))  # torchvision's long side after Resize(64)
    scale, offset = max(size) / resized, round((resized - 64) / 2)
    assert abs(changed[0] - offset * scale) <= 1 and abs(changed[-1] + 1 - (offset + 64) * scale) <= 1  # only the crop changes


def test_delta_strips_of_a_square_photo_equal_the_convex_resize():
    delta = torch.randn(3, 64, 64)
    for height in (64, 300, STRIP_ROWS * 2 + 5):
        strips = list(delta_strips(delta, height, height))
        assert len(strips) == -(-height // STRIP_ROWS) and all(top % STRIP_ROWS == 0 and left == 0 for top, left, _ in strips)
        full = torch.from_numpy(np.concatenate([s for _, _, s in strips])).permute(2, 0, 1)
        assert torch.allclose(full, resize(delta[None], (height, height))[0], atol=1e-4)  # float32 rounding
        assert full.abs().max() <= delta.abs().max() + 1e-6


# --- full-size pixel functions and PNG writing (issue 13) -----------------------------------------------------------

def test_strip_wise_psnr_and_linf_match_the_formulas():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (STRIP_ROWS * 2 + 7, 33, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-9, 10, a.shape), 0, 255).astype(np.uint8)
    mse = np.mean((a.astype(float) - b) ** 2)
    assert psnr(a, b) == pytest.approx(10 * np.log10(255**2 / mse), rel=1e-12)
    assert linf_255(a, b) == np.abs(a.astype(int) - b).max() == 9
    assert psnr(a, a) == float("inf")


@pytest.mark.parametrize("shape", [(1, 1, 3), (300, 257, 3), (129, 7), (128, 128, 3)])
def test_png_writer_is_lossless_for_every_decoder(shape):
    import cv2

    pixels = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    buffer = io.BytesIO()
    write_png(pixels, buffer, threads=2)
    data = buffer.getvalue()
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode == ("RGB" if len(shape) == 3 else "L") and not img.info
        assert np.array_equal(np.asarray(img), pixels)
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(decoded[..., ::-1] if len(shape) == 3 else decoded, pixels)


def test_adler32_combine_matches_zlib():
    a, b = b"dladiff" * 1000, bytes(range(256)) * 300
    assert adler32_combine(zlib.adler32(a), zlib.adler32(b), len(b)) == zlib.adler32(a + b)
    assert adler32_combine(1, zlib.adler32(b), len(b)) == zlib.adler32(b)


def test_png_writer_compresses_a_perturbed_photo_like_pil(real_photos):
    pixels = apply_perturbation(photo(real_photos, 600, 400), torch.sign(torch.randn(3, 64, 64)) * 0.05, 6.375)
    ours, pil = io.BytesIO(), io.BytesIO()
    write_png(pixels, ours)
    Image.fromarray(pixels).save(pil, format="PNG")
    assert len(ours.getvalue()) < 1.2 * len(pil.getvalue())


def test_bound_violation_writes_nothing(tmp_path, real_photos):
    pixels = real_photos["hanks"]
    worse = np.clip(pixels.astype(int) + 9, 0, 255).astype(np.uint8)
    with pytest.raises(Exception, match="bound"):
        save_checked_png(worse, pixels, 6, tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def test_the_evaluation_attacker_trains_on_the_loaders_crop(tmp_path, tiny_sd, real_photos, monkeypatch):
    from dladiff.diffusion.loading import load_sd
    from dladiff.evaluate import dreambooth
    from dladiff.evaluate.attack import AttackContext
    from dladiff.evaluate.config import load_evaluate_config

    Image.fromarray(photo(real_photos, 300, 200)).save(tmp_path / "wide.png")
    photos, _ = load_folder(tmp_path)
    cfg = load_evaluate_config("smoke")
    seen = []

    def capture(vae, batch, *args, **kwargs):
        seen.append(batch)
        raise StopIteration

    monkeypatch.setattr(dreambooth, "encode_images", capture)
    ctx = AttackContext("alice", photos, tmp_path / "db", tmp_path, cfg, torch.device("cpu"), quiet=True)
    with pytest.raises(StopIteration):
        dreambooth.finetune(load_sd(str(tiny_sd)), cfg.dreambooth, ctx, None, False, None, "test")
    expected = dreambooth_loader(cfg.model.resolution)(Image.open(tmp_path / "wide.png").convert("RGB"))
    assert torch.equal(seen[0][0], expected)
