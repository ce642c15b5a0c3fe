"""``dladiff evaluate --purify``: how much protection survives what social networks do to photos.

Each transform of the spec (``jpeg:75,resize:0.5,blur:1.0``: each alone; ``resize:0.5+jpeg:75``:
in sequence) is applied to every protected photo, the attacks run on the purified copies, and one
comparison table puts the unpurified run and every transform side by side.
"""

from __future__ import annotations

import logging
from pathlib import Path

from dladiff.data import load_portrait, save_png
from dladiff.errors import InputError
from dladiff.evaluate.config import EvaluateConfig
from dladiff.evaluate.report import write_comparison
from dladiff.evaluate.run import EvaluationOutcome, evaluate
from dladiff.data import IMAGE_SUFFIXES
from dladiff.purify import Transform, parse_purify

log = logging.getLogger("dladiff")

SKIPPED_FOLDERS = {"surrogate", "class_images"}


def photo_files(root: Path) -> list[Path]:
    """Image files under ``root`` (any depth), leaving out hidden folders and surrogate/class-image folders."""
    root = Path(root)
    files = []
    for path in sorted(root.rglob("*")):
        parts = path.relative_to(root).parts
        if any(p.startswith(".") or p in SKIPPED_FOLDERS for p in parts):
            continue
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            files.append(path)
    return files


def purify_tree(source: Path, target: Path, transform: Transform) -> Path:
    """Write ``transform`` of every photo of ``source`` to the same relative place under ``target`` (PNG).

    Photos already written are kept, so an interrupted purification resumes.
    """
    files = photo_files(source)
    if not files:
        raise InputError(f"{source}: no photos to purify")
    for path in files:
        out = (Path(target) / path.relative_to(source)).with_suffix(".png")
        if not out.is_file():
            save_png(transform(load_portrait(path).pixels), out)
    return Path(target)


def folder_name(transform: Transform) -> str:
    """A file-system name for a transform: ``jpeg:75`` → ``jpeg-75``."""
    return transform.name.replace(":", "-")


def evaluate_purified(photos: Path, clean: Path, out: Path, cfg: EvaluateConfig, dataset: bool = False,
                      method: str | None = None, dataset_label: str | None = None, merge_only: bool = False,
                      quiet: bool = False, purify: str | None = None, scorers=None) -> list[EvaluationOutcome]:
    """:func:`~dladiff.evaluate.run.evaluate`, once per purification when ``purify`` is given.

    Without ``purify`` this is one evaluation into ``out``. With it: ``out/none`` (no transform),
    ``out/<transform>`` for each transform, and ``out/results_purify.md`` comparing them.
    """
    if not purify:
        return [evaluate(photos, clean, out, cfg, dataset, method, dataset_label, merge_only, quiet, scorers)]
    transforms = parse_purify(purify)
    label = method or Path(photos).name
    outcomes = [evaluate(photos, clean, Path(out) / "none", cfg, dataset, label, dataset_label, merge_only, quiet, scorers)]
    for transform in transforms:
        name = folder_name(transform)
        purified = purify_tree(photos, Path(out) / "purified" / name, transform)
        outcomes.append(evaluate(purified, clean, Path(out) / name, cfg, dataset, f"{label} | {transform.name}",
                                 dataset_label, merge_only, quiet, scorers))
    write_comparison([o.out_dir for o in outcomes], Path(out) / "results_purify.md")
    return outcomes
