"""``dladiff evaluate --purify``: how much protection survives what social networks do to photos.

Each transform of the spec (``jpeg:75,resize:0.5,blur:1.0``: each alone; ``resize:0.5+jpeg:75``:
in sequence) is applied to every protected photo, the attacks run on the purified copies, and one
comparison table puts the unpurified run and every transform side by side. Purified copies are
reused only while ``.purify-source.json`` in their folder matches the source photos and the transform.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from dladiff import __version__
from dladiff.data import load_portrait, save_json, save_png
from dladiff.errors import InputError
from dladiff.evaluate.cache import read_json
from dladiff.evaluate.config import EvaluateConfig
from dladiff.evaluate.report import write_comparison
from dladiff.evaluate.run import EvaluationOutcome, evaluate
from dladiff.data import IMAGE_SUFFIXES
from dladiff.purify import Transform, parse_purify

log = logging.getLogger("dladiff")

SKIPPED_FOLDERS = {"surrogate", "class_images"}
SOURCE_RECORD = ".purify-source.json"


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


def source_fingerprint(source: Path, files: list[Path], transform: Transform) -> str:
    """SHA-256 of the transform spec, the dladiff version and every source photo (relative path and bytes)."""
    digest = hashlib.sha256(json.dumps({"transform": transform.name, "dladiff": __version__}).encode())
    for path in files:
        digest.update(path.relative_to(source).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def purify_tree(source: Path, target: Path, transform: Transform) -> Path:
    """Write ``transform`` of every photo of ``source`` to the same relative place under ``target`` (PNG).

    ``target/.purify-source.json`` records the :func:`source_fingerprint` the copies were made from.
    When it matches, photos already written are kept (an interrupted purification resumes); when
    the source photos or the transform changed, ``target`` is emptied and every copy made again.
    """
    source, target = Path(source), Path(target)
    files = photo_files(source)
    if not files:
        raise InputError(f"{source}: no photos to purify")
    fingerprint = source_fingerprint(source, files, transform)
    record = read_json(target / SOURCE_RECORD)
    if record is None or record.get("fingerprint") != fingerprint:
        if target.exists():
            log.info("purified copies in %s are not of these photos or this transform; making them again", target)
            shutil.rmtree(target)
        save_json({"fingerprint": fingerprint, "source": str(source), "transform": transform.name}, target / SOURCE_RECORD)
    for path in files:
        out = (target / path.relative_to(source)).with_suffix(".png")
        if not out.is_file():
            save_png(transform(load_portrait(path).pixels), out)
    return target


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
