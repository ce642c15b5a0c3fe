"""The preview strip and the self-contained HTML report."""

from __future__ import annotations

import re

import numpy as np
import pytest

from dladiff.preview import amplified_difference, face_lines, preview_image, verdict_word
from dladiff.report_html import checked_sentence, faces_table, png_data_uri, render_report_html

FACE = {
    "bbox": [170.0, 60.0, 290.0, 210.0],
    "encoders": {"dlib": {"ism_pro": 0.81, "same_person": False}},
    "native": {
        "dlib": {"png": {"detected": True, "same_person": False, "distance": 0.71, "threshold": 0.6},
                 "jpeg75": {"detected": True, "same_person": True, "distance": 0.55, "threshold": 0.6}},
        "sface": {"png": {"detected": True, "same_person": False, "cosine": 0.21, "threshold": 0.363},
                  "jpeg75": {"detected": False, "same_person": None}},
    },
}


@pytest.fixture()
def pair(real_photos):
    clean = real_photos["astronaut"]
    noise = np.random.default_rng(0).integers(-6, 7, clean.shape)
    return clean, np.clip(clean.astype(int) + noise, 0, 255).astype(np.uint8)


def test_amplified_difference_is_grey_where_nothing_changed():
    a = np.full((4, 4, 3), 100, np.uint8)
    b = a.copy()
    b[0, 0] = [103, 99, 100]
    diff = amplified_difference(a, b, gain=10)
    assert (diff[1:, 1:] == 128).all()
    assert diff[0, 0].tolist() == [158, 118, 128]


def test_verdict_words_cover_every_case():
    assert verdict_word(True) == "RECOGNIZED"
    assert verdict_word(False) == "protected"
    assert verdict_word(None, detected=False) == "face not found"
    assert verdict_word(None) == "not judged"


def test_face_lines_prefer_native_verdicts_and_fall_back_to_the_attack():
    lines = face_lines(0, FACE)
    assert len(lines) == 2 and lines[0].startswith("face 1 dlib: png: protected (distance 0.710")
    assert "jpeg75: RECOGNIZED" in lines[0] and "jpeg75: face not found" in lines[1]
    own_only = face_lines(1, {"encoders": {"dlib": {"ism_pro": 0.8, "same_person": True}}})
    assert own_only == ["face 2 dlib (attack's own crop): RECOGNIZED ism=0.8"]


def test_preview_has_three_panels_boxes_and_text(pair):
    clean, protected = pair
    strip = preview_image(clean, protected, [FACE], max_height=256)
    assert strip.dtype == np.uint8 and strip.shape[2] == 3
    assert strip.shape[1] >= 3 * 256 and strip.shape[0] > 256 + 2 * 18
    red = (strip[..., 0] > 200) & (strip[..., 1] < 100) & (strip[..., 2] < 100)
    third = strip.shape[1] // 3
    assert all(red[:, i * third:(i + 1) * third].sum() > 100 for i in range(3)), "each panel has the face box"


def test_preview_says_when_no_face_or_no_layer_2(pair):
    clean, protected = pair
    with_none = preview_image(clean, protected, [], max_height=64)
    without_l2 = preview_image(clean, protected, None, max_height=64)
    assert with_none.shape[1] > 3 * 64 and without_l2.shape[1] > 3 * 64
    assert not np.array_equal(with_none, without_l2), "the two cases are told apart in the text"


def _report(faces):
    return {"dladiff_version": "0", "created": "now", "layers": [1, 2], "bound_linf_255": {"checked_limit": 12.0},
            "images": [{"input": "a <b>.png", "output": "a.png", "width": 512, "height": 512, "psnr_db": 41.2,
                        "linf_255": 6.0, "layer2": {"faces": faces}}],
            "skipped": [{"file": "x.png", "reason": "not an image"}],
            "settings": {"model": {"id": "https://example.invalid/should-be-text"}}}


def test_report_html_is_self_contained(pair):
    clean, protected = pair
    page = render_report_html(_report([FACE]), {"a.png": png_data_uri(preview_image(clean, protected, [FACE]))})
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page, re.I)
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", page, re.I)
    assert "<script" not in page and "<link" not in page
    assert 'src="data:image/png;base64,' in page
    assert "a &lt;b&gt;.png" in page, "names are escaped"


def test_report_html_shows_scores_thresholds_and_verdicts():
    table = faces_table([FACE])
    assert table.index("as saved (PNG)") < table.index("after JPEG quality 75")
    assert "distance 0.710 (same below 0.6)" in table and "cosine 0.210 (same above 0.363)" in table
    assert table.count('class="protected"') == 2 and table.count('class="recognized"') == 1
    assert "face not found" in table and "ISM 0.81" in table and "not in the loop" in table


def test_checked_sentence_names_judges_and_limits():
    text = checked_sentence(_report([FACE]))
    assert "12/255" in text and "dlib, sface" in text and "dladiff evaluate" in text
    assert "Not checked" in checked_sentence({"layers": [2], "images": []})


def test_summary_line_counts_photos_faces_and_verdicts():
    from dladiff.protect import face_protected, summary_line

    still = {"native": {"dlib": {"png": {"detected": True, "same_person": True}}}}
    report = dict(_report([FACE, still]), output_dir="/o")
    report["images"].append({"input": "b.png", "output": "b.png", "layer2": {"faces": []}})
    assert face_protected(FACE) is True and face_protected(still) is False and face_protected({}) is None
    line = summary_line(report, 12.34)
    assert line.startswith("2 photo(s) protected, 1 skipped, 2 face(s): 1 no longer recognized")
    assert "1 still recognized" in line and "12.3 s" in line and line.endswith("/o/report.html")
