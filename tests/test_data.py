import numpy as np
import pytest
import torch
from PIL import Image

from dladiff.data import (apply_perturbation, check_output_folder, linf_255, load_folder, load_portrait, psnr, resize,
                          save_png, to_tensor)
from dladiff.errors import InputError


def test_exif_orientation_is_honoured(tmp_path):
    img = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert load_portrait(tmp_path / "rot.jpg").pixels.shape == (40, 20, 3)


def test_modes_are_converted_to_rgb8(tmp_path):
    Image.new("RGBA", (16, 16), (0, 0, 0, 0)).save(tmp_path / "a.png")
    Image.new("L", (16, 16), 77).save(tmp_path / "b.png")
    Image.fromarray(np.full((16, 16), 65535, np.uint16)).save(tmp_path / "c.png")
    rgba, grey, deep = (load_portrait(tmp_path / n).pixels for n in ("a.png", "b.png", "c.png"))
    assert rgba.dtype == np.uint8 and rgba.shape == (16, 16, 3) and (rgba == 255).all()  # composited on white
    assert (grey == 77).all()
    assert (deep == 255).all()


def test_bad_files_are_skipped_not_fatal(tmp_path, real_photos):
    Image.fromarray(real_photos["hanks"]).save(tmp_path / "good.png")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    portraits, skipped = load_folder(tmp_path)
    assert [p.name for p in portraits] == ["good.png"]
    assert {s.path.name for s in skipped} == {"notes.txt", "broken.jpg"}
    assert all(s.path.name in s.reason for s in skipped)


def test_empty_missing_and_same_folder_errors(tmp_path):
    with pytest.raises(InputError, match="empty"):
        load_folder(tmp_path)
    with pytest.raises(InputError, match="no such folder"):
        load_folder(tmp_path / "nope")
    with pytest.raises(InputError, match="input folder"):
        check_output_folder(tmp_path, tmp_path / "." )


def test_resize_keeps_linf_bound_both_ways():
    delta = (torch.rand(1, 3, 64, 64) * 2 - 1) * 0.05
    for size in [(512, 512), (17, 33), (300, 40)]:
        assert resize(delta, size).abs().max() <= 0.05 + 1e-7


def test_apply_perturbation_never_exceeds_bound(real_photos):
    pixels = real_photos["astronaut"]
    delta = torch.sign(torch.randn(3, 64, 64)) * 0.05  # 6.375/255
    out = apply_perturbation(pixels, delta, 0.05 * 127.5)
    assert out.shape == pixels.shape and linf_255(out, pixels) == 6
    assert 30 < psnr(out, pixels) < 60


def test_saved_png_is_lossless_without_metadata(tmp_path, real_photos):
    pixels = real_photos["hanks"]
    save_png(pixels, tmp_path / "x.png")
    with Image.open(tmp_path / "x.png") as img:
        assert not img.info.get("exif") and not img.getexif()
        assert np.array_equal(np.asarray(img), pixels)
    assert list(tmp_path.iterdir()) == [tmp_path / "x.png"]  # no temporary file left


def test_to_tensor_range(real_photos):
    t = to_tensor(real_photos["hanks"])
    assert t.shape == (1, 3, 112, 112) and t.min() >= -1 and t.max() <= 1
