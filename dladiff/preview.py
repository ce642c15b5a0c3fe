"""What a person looks at after ``dladiff protect``: a preview strip per photo.

``OUT/preview/<photo>.png`` is three panels side by side, each scaled to at most
``max_height`` pixels high:

    clean | protected | 128 + gain · (protected − clean)   (the difference, amplified around grey)

Every face is boxed on all three panels; where layer 2 was limited to the face, the region it
could change (the grown landmark hull, :mod:`dladiff.budget`) is outlined on the difference
panel. Its verdicts are written under the strip, one line
per face: the recognizer, its similarity (or distance) against its threshold, and whether it
still recognizes the person (``RECOGNIZED``: not protected against it) or not (``protected``), as
saved and after JPEG re-encoding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

DIFF_GAIN = 10.0
MAX_HEIGHT = 480
LINE_HEIGHT = 18
FONT_SIZE = 14
PAD = 8
BOX_COLOURS = [(255, 64, 64), (64, 200, 255), (255, 200, 0), (120, 255, 120), (255, 120, 255), (255, 160, 60)]


def amplified_difference(clean: np.ndarray, protected: np.ndarray, gain: float = DIFF_GAIN) -> np.ndarray:
    """``128 + gain·(protected − clean)`` clipped to uint8; ``(H, W, C)`` uint8 in, same shape out."""
    diff = protected.astype(np.int16) - clean.astype(np.int16)
    if float(gain).is_integer() and abs(gain) <= 100:  # exact in int16 (|diff| ≤ 255): same result, 4x less memory
        diff *= int(gain)
        diff += 128
        return np.clip(diff, 0, 255).astype(np.uint8)
    return np.clip(128.0 + gain * diff, 0, 255).astype(np.uint8)


def _scale_for(height: int, max_height: int) -> float:
    return min(1.0, max_height / max(height, 1))


def _resized(pixels: np.ndarray, scale: float) -> Image.Image:
    image = Image.fromarray(pixels).convert("RGB")
    if scale >= 1.0:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BOX)


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default(size=FONT_SIZE)


def verdict_word(same_person: bool | None, detected: bool | None = True) -> str:
    """``RECOGNIZED`` (same person: not protected), ``protected`` (another person), ``face not found``."""
    if detected is False:
        return "face not found"
    if same_person is None:
        return "not judged"
    return "RECOGNIZED" if same_person else "protected"


def _score_text(verdict: dict) -> str:
    if "distance" in verdict:
        return f"(distance {verdict['distance']:.3f}; same person below {verdict['threshold']})"
    if "cosine" in verdict:
        return f"(cosine {verdict['cosine']:.3f}; same person above {verdict['threshold']})"
    return ""


def face_lines(index: int, face: dict) -> list[str]:
    """Text lines for one face of a layer-2 report: its native verdicts, else the attack's own."""
    lines = []
    for name, views in (face.get("native") or {}).items():
        parts = []
        for view, verdict in views.items():
            word = verdict_word(verdict.get("same_person"), verdict.get("detected"))
            parts.append(f"{view}: {word} {_score_text(verdict)}".rstrip())
        lines.append(f"face {index + 1} {name}: " + "; ".join(parts))
    if not lines:
        for name, entry in (face.get("encoders") or {}).items():
            lines.append(f"face {index + 1} {name} (attack's own crop): {verdict_word(entry.get('same_person'))} "
                         f"ism={entry.get('ism_pro')}")
    return lines or [f"face {index + 1}: no verdict recorded"]


def _draw_boxes(draw: ImageDraw.ImageDraw, faces: list[dict], scale: float, origin: tuple[int, int]) -> None:
    """Box and number each face on a panel whose top-left corner is ``origin``."""
    ox, oy = origin
    for index, face in enumerate(faces):
        if "bbox" not in face:
            continue
        x0, y0, x1, y1 = (float(v) * scale for v in face["bbox"])
        colour = BOX_COLOURS[index % len(BOX_COLOURS)]
        draw.rectangle([x0 + ox, y0 + oy, x1 + ox, y1 + oy], outline=colour, width=2)
        draw.text((x0 + ox + 3, y0 + oy + 2), str(index + 1), fill=colour, font=_font())


def _draw_regions(draw: ImageDraw.ImageDraw, faces: list[dict], scale: float, origin: tuple[int, int]) -> None:
    """Outline each face's ``region`` polygon (photo pixels) on a panel whose top-left corner is ``origin``."""
    ox, oy = origin
    for index, face in enumerate(faces):
        if face.get("region"):
            points = [(float(x) * scale + ox, float(y) * scale + oy) for x, y in face["region"]]
            draw.line(points + points[:1], fill=BOX_COLOURS[index % len(BOX_COLOURS)], width=1)


def _text_width(lines: list[str]) -> int:
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    return int(max((draw.textlength(line, font=_font()) for line in lines), default=0))


def report_lines(faces: list[dict] | None) -> list[tuple[int | None, str]]:
    """``(face index or None, text)`` for every line written under the strip."""
    if faces is None:
        return [(None, "layer 2 was not run on this photo")]
    lines = [(i, line) for i, face in enumerate(faces) for line in face_lines(i, face)]
    return lines or [(None, "no face found: layer 2 left this photo as it was")]


def preview_image(clean: np.ndarray, protected: np.ndarray, faces: list[dict] | None, gain: float = DIFF_GAIN,
                  max_height: int = MAX_HEIGHT) -> np.ndarray:
    """The preview strip ``(H', 3·W' + gaps, 3)`` uint8 with boxed faces and their verdicts.

    ``clean``, ``protected``: ``(H, W, 3)`` uint8 RGB of the same size; ``faces``: the per-face
    layer-2 report entries (``bbox`` and, when masked, ``region`` in photo pixels, ``verdicts``
    and/or ``encoders``), or None
    when layer 2 did not run.
    """
    scale = _scale_for(clean.shape[0], max_height)
    panels = [_resized(clean, scale), _resized(protected, scale), _resized(amplified_difference(clean, protected, gain), scale)]
    width, height = panels[0].size
    titles = ["clean", "protected", f"difference x{gain:g} around grey"]
    lines = report_lines(faces)
    strip_width = max(3 * width + 4 * PAD, _text_width([line for _, line in lines] + titles) + 2 * PAD)
    strip = Image.new("RGB", (strip_width, height + 3 * PAD + LINE_HEIGHT * (len(lines) + 1)), (24, 24, 24))
    draw = ImageDraw.Draw(strip)
    top = PAD + LINE_HEIGHT
    for i, (panel, title) in enumerate(zip(panels, titles)):
        x = PAD + i * (width + PAD)
        strip.paste(panel, (x, top))
        draw.text((x, PAD), title, fill=(230, 230, 230), font=_font())
        _draw_boxes(draw, faces or [], scale, (x, top))
    _draw_regions(draw, faces or [], scale, (PAD + 2 * (width + PAD), top))
    for j, (face_index, line) in enumerate(lines):
        colour = (230, 230, 230) if face_index is None else BOX_COLOURS[face_index % len(BOX_COLOURS)]
        draw.text((PAD, top + height + PAD + j * LINE_HEIGHT), line, fill=colour, font=_font())
    return np.asarray(strip)


def preview_path(out_dir: Path, output_name: str) -> Path:
    """``OUT/preview/<output name>``: where the preview of one protected photo goes."""
    return Path(out_dir) / "preview" / Path(output_name).name
