"""``dladiff verify CLEAN PROTECTED``: an independent re-judging of protected photos.

Every recognizer available on this machine judges each protected photo against its clean
original through its own native pipeline (its own detector, landmarks and alignment; never
layer 2's code or crops: :mod:`dladiff.faces.verdicts`), in three views of the protected photo:

* ``png``: as saved;
* ``jpeg75``: after a JPEG round trip at quality 75 (what sharing a photo does);
* ``resize0.5``: after halving its size (area resampling), judged at that size.

A face passes when every recognizer that finds it in the clean photo still finds it in every
view (detection check) and no longer sees the same person there (past its threshold). The photos
may come from any tool (dladiff, Fawkes, Anti-DreamBooth, ...): only pixels are compared. A
protected photo of another size is compared at the clean photo's size when the aspect ratio
matches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from dladiff.errors import DladiffError
from dladiff.faces.verdicts import Judge, JudgedFace, compare, jpeg, match_box

VIEWS = ("png", "jpeg75", "resize0.5")
ASPECT_TOLERANCE = 0.01


@dataclass
class PhotoVerdict:
    """The verdicts on one (clean, protected) pair: per face, ``{judge: {view: verdict}}``."""

    clean: Path
    protected: Path
    faces: list[dict] = field(default_factory=list)
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and all(face_passed(face) for face in self.faces)


def face_passed(face: dict) -> bool:
    """Every judge that saw the face in the clean photo still detects it and sees another person, in every view."""
    return all(v["detected"] is None or (v["detected"] and v["same_person"] is False)
               for per in face["native"].values() for v in per.values())


def half_size(image: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8 → ``(H/2, W/2, 3)`` by area averaging."""
    pil = Image.fromarray(image)
    return np.asarray(pil.resize((max(1, pil.width // 2), max(1, pil.height // 2)), Image.Resampling.BOX))


def protected_views(protected: np.ndarray) -> dict[str, tuple[np.ndarray, float]]:
    """The views judged, each with the factor that maps its pixels back to the photo's."""
    return {"png": (protected, 1.0), "jpeg75": (jpeg(protected, 75), 1.0), "resize0.5": (half_size(protected), 2.0)}


def rescaled(faces: list[JudgedFace], factor: float) -> list[JudgedFace]:
    """Faces with their boxes scaled by ``factor`` (descriptors unchanged)."""
    return faces if factor == 1.0 else [JudgedFace(f.bbox * factor, f.descriptor) for f in faces]


def reference_boxes(clean_seen: dict[str, list[JudgedFace]]) -> list[np.ndarray]:
    """The faces of the clean photo: every judge's detections, merged where boxes overlap."""
    boxes: list[JudgedFace] = []
    for faces in clean_seen.values():
        for face in faces:
            if match_box(face.bbox, boxes) is None:
                boxes.append(face)
    return [face.bbox for face in boxes]


def judge_view(judge: Judge, clean_faces: list[JudgedFace], found: list[JudgedFace], box: np.ndarray) -> dict:
    """One judge's verdict on one face in one view (see :func:`dladiff.faces.verdicts.judge_faces`)."""
    reference = match_box(box, clean_faces)
    if reference is None:
        return {"detected": None, "same_person": None}
    match = match_box(reference.bbox, found)
    if match is None:
        return {"detected": False, "same_person": None}
    return {"detected": True, **compare(judge, reference.descriptor, match.descriptor)}


def verify_pixels(clean: np.ndarray, protected: np.ndarray, judges: dict[str, Judge]) -> list[dict]:
    """Per face of ``clean``: ``{"bbox": [x1, y1, x2, y2], "native": {judge: {view: verdict}}}``.

    ``clean``, ``protected``: ``(H, W, 3)`` uint8 RGB of the same size.
    """
    clean_seen = {name: judge.faces(clean) for name, judge in judges.items()}
    boxes = reference_boxes(clean_seen)
    faces = [{"bbox": [round(float(v), 1) for v in box], "native": {name: {} for name in judges}} for box in boxes]
    for view, (image, factor) in protected_views(protected).items():
        for name, judge in judges.items():
            found = rescaled(judge.faces(image), factor)
            for face, box in zip(faces, boxes):
                face["native"][name][view] = judge_view(judge, clean_seen[name], found, box)
    return faces


def read_rgb(path: Path) -> np.ndarray:
    """A photo as ``(H, W, 3)`` uint8 RGB (EXIF orientation, ICC and bit depth as protect reads them)."""
    from dladiff.data import load_portrait

    return load_portrait(path).pixels


def same_frame(clean: np.ndarray, protected: np.ndarray, where: Path) -> np.ndarray:
    """``protected`` at ``clean``'s size (resized when only the scale differs), else a clear error."""
    if protected.shape[:2] == clean.shape[:2]:
        return protected
    (h, w), (ph, pw) = clean.shape[:2], protected.shape[:2]
    if abs(w / h - pw / ph) > ASPECT_TOLERANCE * (w / h):
        raise DladiffError(f"{where}: {pw}x{ph} has another aspect ratio than its clean photo ({w}x{h}); "
                           "crop the clean photo the same way before verifying")
    return np.asarray(Image.fromarray(protected).resize((w, h), Image.Resampling.LANCZOS))


def photo_pairs(clean: Path, protected: Path) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """``(clean, protected)`` pairs matched by file stem, and the clean photos without a protected one."""
    from dladiff.data import list_photo_files

    clean, protected = Path(clean), Path(protected)
    if clean.is_file() and protected.is_file():
        return [(clean, protected)], []
    if not (clean.is_dir() and protected.is_dir()):
        raise DladiffError(f"give two photos or two folders: {clean} and {protected}")
    by_stem = {path.stem: path for path in list_photo_files(protected)}
    pairs = [(path, by_stem[path.stem]) for path in list_photo_files(clean) if path.stem in by_stem]
    missing = [path for path in list_photo_files(clean) if path.stem not in by_stem]
    if not pairs:
        raise DladiffError(f"no photo of {protected} has the name of a photo in {clean}; pair them by file name")
    return pairs, missing


def verify_pair(clean_path: Path, protected_path: Path, judges: dict[str, Judge]) -> PhotoVerdict:
    """Verdicts on one pair; an unreadable or mismatched file gives a verdict with ``error`` set."""
    try:
        clean = read_rgb(clean_path)
        protected = same_frame(clean, read_rgb(protected_path), protected_path)
    except (DladiffError, OSError) as exc:
        return PhotoVerdict(clean_path, protected_path, error=str(exc))
    return PhotoVerdict(clean_path, protected_path, verify_pixels(clean, protected, judges))


def available_judges(model_root: str | Path, det_size: int = 640) -> dict[str, Judge]:
    """The native pipeline of every registered recognizer whose files are on this machine."""
    from dladiff.faces.encoders import ENCODERS
    from dladiff.faces.verdicts import native_judge

    judges = {name: native_judge(name, model_root, det_size) for name in ENCODERS}
    judges = {name: judge for name, judge in judges.items() if judge is not None}
    if not judges:
        raise DladiffError("no face recognizer is available on this machine (dlib and SFace come with the install)")
    return judges


def verdicts_json(results: list[PhotoVerdict], judges: dict[str, Judge], missing: list[Path]) -> dict:
    """The whole verification as plain JSON data."""
    return {
        "judges": {name: {"threshold": j.threshold, "threshold_kind": j.threshold_kind} for name, j in judges.items()},
        "views": list(VIEWS),
        "passed": all(r.passed for r in results) and not missing,
        "photos": [{"clean": str(r.clean), "protected": str(r.protected), "passed": r.passed, "error": r.error,
                    "faces": [dict(face, passed=face_passed(face)) for face in r.faces]} for r in results],
        "missing": [str(path) for path in missing],
    }


def cell_text(verdict: dict) -> str:
    """One table cell: the verdict word and the score against the threshold."""
    from dladiff.preview import verdict_word

    word = verdict_word(verdict.get("same_person"), verdict.get("detected"))
    if verdict.get("detected") is None:
        return "not seen in clean"
    if "distance" in verdict:
        return f"{word}\nd={verdict['distance']:.3f}"
    if "cosine" in verdict:
        return f"{word}\ncos={verdict['cosine']:.3f}"
    return word


def verdict_table(results: list[PhotoVerdict], judges: dict[str, Judge]):
    """A rich table: a heading row per photo, then one row per face and recognizer, one column per view."""
    from rich.table import Table

    thresholds = ", ".join(f"{n} {'<' if j.threshold_kind == 'euclidean' else '>'} {j.threshold} is the same person"
                           for n, j in judges.items())
    table = Table(title="dladiff verify", caption=thresholds)
    for column in ("face (x,y)", "recognizer", *VIEWS, "pass"):
        table.add_column(column)
    for result in results:
        problem = result.error or ("" if result.faces else "no face found")
        table.add_row(f"[bold]{result.protected.name}[/bold]", "", *[""] * len(VIEWS), problem, end_section=not result.faces)
        for index, face in enumerate(result.faces):
            where = "{} ({:.0f},{:.0f})".format(index + 1, *face["bbox"][:2])
            for name, per in face["native"].items():
                ok = face_passed({"native": {name: per}})
                table.add_row(where, name, *(cell_text(per[v]) for v in VIEWS), "[green]yes[/green]" if ok else "[red]NO[/red]")
        table.add_section()
    return table
