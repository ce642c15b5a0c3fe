"""Purified copies for ``evaluate --purify`` are reused only while their source photos and transform are unchanged."""

import json

import numpy as np
from PIL import Image

from dladiff.data import save_png
from dladiff.evaluate.purified import SOURCE_RECORD, purify_tree
from dladiff.purify import parse_purify


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_purified_copies_follow_their_source(tmp_path, real_photos):
    source, target = tmp_path / "protected", tmp_path / "purified"
    save_png(real_photos["hanks"], source / "a.png")
    save_png(real_photos["astronaut"][:200, :200], source / "b.png")
    (jpeg,) = parse_purify("jpeg:75")
    purify_tree(source, target, jpeg)
    assert json.loads((target / SOURCE_RECORD).read_text())["transform"] == "jpeg:75"
    stamp = (target / "a.png").stat().st_mtime_ns
    purify_tree(source, target, jpeg)
    assert (target / "a.png").stat().st_mtime_ns == stamp  # unchanged source: the copies are reused

    save_png(real_photos["hanks"][::-1].copy(), source / "a.png")  # a new protected photo under the same name
    (source / "b.png").unlink()
    purify_tree(source, target, jpeg)
    assert np.array_equal(_pixels(target / "a.png"), jpeg(real_photos["hanks"][::-1].copy()))
    assert not (target / "b.png").exists()

    (blur,) = parse_purify("blur:2")
    purify_tree(source, target, blur)
    assert np.array_equal(_pixels(target / "a.png"), blur(real_photos["hanks"][::-1].copy()))
