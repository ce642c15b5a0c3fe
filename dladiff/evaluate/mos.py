"""The subjective study of the paper (§7.2, Fig. 5): blinded rating items, ratings, Mean Opinion Score.

A study folder is one evaluation folder of ``dladiff evaluate`` or a folder holding several (one per
method, or the per-transform folders of ``--purify``): every ``results.json`` under it names a method
and dataset, and its generated images lie in ``<identity>/<attack>/<prompt-slug>/NNNN.png``.

Files in the study folder:

* ``rating_items.json`` — item id → (dataset, method, identity, attack, prompt, file), the sampling
  settings, and each rater's shuffled order. Written once (item ids never change); the rating page
  never shows it. Item ids are random, so they say nothing about the method.
* ``ratings.csv`` — one line per rating, appended as it is given: ``rater,item,score,time`` (ISO 8601, UTC).

MOS per (dataset, method, attack, prompt) is the mean score; its 95 % confidence interval is the
t-interval over all ratings of the group, mean ± t(0.975, n−1)·s/√n with s the sample standard
deviation (ddof 1), as in ITU-R BT.500. It treats every rating as independent; ratings of one rater
are correlated, so with few raters the interval is narrower than one computed over raters.
"""

from __future__ import annotations

import csv
import datetime as dt
import logging
import math
import os
import random
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from dladiff.data import save_json
from dladiff.errors import InputError
from dladiff.evaluate.cache import file_lock, prompt_slug, read_json

log = logging.getLogger("dladiff")

ITEMS_FILE = "rating_items.json"
RATINGS_FILE = "ratings.csv"
LOCK_FILE = ".rating.lock"
ITEMS_FORMAT = "dladiff-rating-items/1"
CSV_FIELDS = ("rater", "item", "score", "time")
SCORES = (1, 2, 3, 4, 5)
FINETUNE_ATTACKS = ("dreambooth", "lora")
ATTACKS = ("dreambooth", "lora", "faceid", "instantid")
RATER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
SKIPPED_DIRS = {"_class_images", "features", "purified"}

CRITERIA = {
    5: "As good as images from a model fine-tuned on clean (unprotected) photos: no visible distortion.",
    4: "Slight distortions, such as artifacts, blurring, noise or blocky distortions.",
    3: "Distortions more severe than “4”, but the facial features such as eyes and mouth can still be recognized.",
    2: "The facial features and details are significantly destroyed.",
    1: "Unrecognizable, or disgusting, terrifying faces.",
}
"""The paper's five-point visual-quality scale (§7.2), shown on the rating page."""

GroupKey = tuple[str, str, str, str]
"""(dataset, method, attack, prompt): one MOS cell of Tables 1 and 2."""


@dataclass(frozen=True)
class Study:
    """The items of a study folder and each rater's order."""

    root: Path
    items: dict[str, dict]
    orders: dict[str, list[str]]
    settings: dict


@dataclass(frozen=True)
class MOS:
    """Mean opinion score of one group: mean, half-width of the 95 % CI, ratings, raters."""

    mean: float
    half_width: float
    n: int
    raters: int


def check_rater(rater: str) -> str:
    """A rater id goes into ``ratings.csv``: letters, digits and ``_ . @ -``, at most 64 characters."""
    if not RATER_ID.match(rater or ""):
        raise InputError(f"rater id {rater!r}: use 1-64 letters, digits, '_', '.', '@' or '-' (starting with a letter or digit)")
    return rater


def result_folders(root: Path) -> list[Path]:
    """Evaluation folders under ``root`` (``root`` itself included): those holding a ``results.json``."""
    found = []
    for path in sorted(Path(root).rglob("results.json")):
        parts = path.relative_to(root).parts[:-1]
        if not any(p.startswith(".") or p in SKIPPED_DIRS for p in parts):
            found.append(path.parent)
    return found


def generated_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("[0-9][0-9][0-9][0-9].png"))


def discover_images(root: Path, attacks: Iterable[str]) -> list[dict]:
    """Every generated image of ``attacks`` in the evaluations under ``root``, described (no id yet)."""
    root, attacks = Path(root), tuple(attacks)
    found = []
    for folder in result_folders(root):
        results = read_json(folder / "results.json")
        if results is None:
            log.warning("%s: unreadable results.json, left out of the study", folder)
            continue
        rows = [r for r in results.get("rows", []) if r.get("identity") not in (None, "ALL") and r.get("attack") in attacks]
        for row in rows:
            images = folder / row["identity"] / row["attack"] / prompt_slug(row["prompt"])
            for path in generated_files(images):
                found.append({"dataset": results.get("dataset", ""), "method": results.get("method", ""),
                              "identity": row["identity"], "attack": row["attack"], "prompt": row["prompt"],
                              "file": path.relative_to(root).as_posix()})
    return found


def group_of(item: dict) -> GroupKey:
    return item["dataset"], item["method"], item["attack"], item["prompt"]


def sample_images(images: list[dict], per_group: int | None, seed: int) -> list[dict]:
    """At most ``per_group`` images of each (dataset, method, attack, prompt), drawn at random with ``seed``
    (the paper rates 50 faces per method)."""
    if per_group is None:
        return images
    groups: dict[GroupKey, list[dict]] = {}
    for image in images:
        groups.setdefault(group_of(image), []).append(image)
    rng = random.Random(seed)
    chosen = []
    for key in sorted(groups):
        members = groups[key]
        chosen += members if len(members) <= per_group else rng.sample(members, per_group)
    return chosen


def new_ids(count: int) -> list[str]:
    """``count`` distinct random ids (8 hex digits): they carry no information about the item."""
    ids: set[str] = set()
    while len(ids) < count:
        ids.add(secrets.token_hex(4))
    return list(ids)


def rater_order(item_ids: Iterable[str], rater: str, seed: int) -> list[str]:
    """The items in the rater's order: a shuffle seeded by (seed, rater), so it mixes methods and identities."""
    order = sorted(item_ids)
    random.Random(f"{seed}:{rater}").shuffle(order)
    return order


def _study(root: Path, record: dict) -> Study:
    items = {item["id"]: item for item in record["items"]}
    return Study(root, items, dict(record.get("orders", {})), record["settings"])


def _read_record(path: Path) -> dict:
    record = read_json(path)
    if record is None or record.get("format") != ITEMS_FORMAT or not isinstance(record.get("items"), list):
        raise InputError(f"{path}: not a rating items file of this version; move it away to start a new study "
                         f"(the ratings in {RATINGS_FILE} refer to its item ids)")
    return record


def open_study(root: Path, attacks: Iterable[str] = FINETUNE_ATTACKS, per_group: int | None = None, seed: int = 0) -> Study:
    """The study of ``root``: read ``rating_items.json``, or build it from the generated images (first run).

    A later run must ask for the same attacks, sample size and seed, since the ratings refer to the items.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: no such folder (give the output folder of `dladiff evaluate`)")
    settings = {"attacks": sorted(set(attacks)), "sample": per_group, "seed": seed}
    unknown = [a for a in settings["attacks"] if a not in ATTACKS]
    if unknown or not settings["attacks"]:
        raise InputError(f"attacks {unknown or 'none'}: choose from {', '.join(ATTACKS)}")
    path = root / ITEMS_FILE
    with file_lock(root / LOCK_FILE):
        if path.exists():
            record = _read_record(path)
            if record["settings"] != settings:
                raise InputError(f"{path} was built with {record['settings']}, not {settings}: use the same options, "
                                 f"or move the file (and {RATINGS_FILE}) away to start a new study")
        else:
            images = sample_images(discover_images(root, settings["attacks"]), per_group, seed)
            if not images:
                raise InputError(f"{root}: no generated images of {', '.join(settings['attacks'])} found "
                                 f"(expected results.json and <identity>/<attack>/<prompt>/0000.png from `dladiff evaluate`)")
            items = [{"id": i, **image} for i, image in zip(new_ids(len(images)), images)]
            record = {"format": ITEMS_FORMAT, "settings": settings, "items": items, "orders": {}}
            save_json(record, path)
    study = _study(root, record)
    missing = [item["file"] for item in study.items.values() if not (root / item["file"]).is_file()]
    if missing:
        raise InputError(f"{root}: {len(missing)} image(s) of {ITEMS_FILE} are missing, e.g. {missing[0]}; "
                         f"restore them, or move {ITEMS_FILE} away to start a new study")
    return study


def order_for(study: Study, rater: str) -> list[str]:
    """The rater's order, computed and stored in ``rating_items.json`` on the rater's first visit."""
    check_rater(rater)
    if rater in study.orders:
        return study.orders[rater]
    path = study.root / ITEMS_FILE
    with file_lock(study.root / LOCK_FILE):
        record = _read_record(path)
        order = record.setdefault("orders", {}).get(rater)
        if order is None:
            order = rater_order(study.items, rater, study.settings["seed"])
            record["orders"][rater] = order
            save_json(record, path)
    study.orders[rater] = order
    return order


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def append_rating(root: Path, rater: str, item: str, score: int) -> dict:
    """Append one rating line to ``ratings.csv`` (header first on a new file), flushed to disk at once."""
    row = {"rater": check_rater(rater), "item": item, "score": check_score(score), "time": now_iso()}
    path = Path(root) / RATINGS_FILE
    with file_lock(Path(root) / LOCK_FILE):
        new = not path.exists() or path.stat().st_size == 0
        with open(path, "a", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
            if new:
                writer.writeheader()
            writer.writerow(row)
            handle.flush()
            os.fsync(handle.fileno())
    return row


def check_score(score) -> int:
    if isinstance(score, bool) or not isinstance(score, int) or score not in SCORES:
        raise InputError(f"score {score!r}: give an integer from 1 to 5")
    return score


def read_ratings(path: Path) -> list[dict]:
    """The rows of a ``ratings.csv``; a malformed line (e.g. cut by a crash) is left out with a warning."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{path}: cannot read the ratings ({exc.strerror})") from None
    reader = csv.DictReader(text.splitlines())
    if reader.fieldnames is None:
        return []
    if not set(CSV_FIELDS) <= set(reader.fieldnames):
        raise InputError(f"{path}: not a ratings file (columns {reader.fieldnames}, expected {list(CSV_FIELDS)})")
    rows = []
    for line, row in enumerate(reader, start=2):
        try:
            rows.append({"rater": check_rater(row["rater"]), "item": row["item"] or "",
                         "score": check_score(int(row["score"])), "time": row["time"] or ""})
        except (InputError, TypeError, ValueError):
            log.warning("%s line %d: malformed rating %s, left out", path, line, dict(row))
    return rows


def rated_items(root: Path, rater: str) -> set[str]:
    """Items the rater has already rated in ``root/ratings.csv``."""
    path = Path(root) / RATINGS_FILE
    if not path.exists():
        return set()
    return {row["item"] for row in read_ratings(path) if row["rater"] == rater}


def next_position(order: list[str], rated: set[str]) -> int:
    """Index of the first item of ``order`` not yet rated (``len(order)`` when all are)."""
    return next((i for i, item in enumerate(order) if item not in rated), len(order))


def t_quantile(p: float, dof: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(p, dof))


def mean_ci(scores: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """(mean, half-width) of the t-interval: mean ± t((1+c)/2, n−1)·s/√n; half-width NaN for n < 2."""
    n = len(scores)
    if n == 0:
        return math.nan, math.nan
    mean = sum(scores) / n
    if n < 2:
        return mean, math.nan
    s = math.sqrt(sum((x - mean) ** 2 for x in scores) / (n - 1))
    return mean, t_quantile((1 + confidence) / 2, n - 1) * s / math.sqrt(n)


def ratings_source(path: Path) -> tuple[Path, Path]:
    """(ratings.csv, rating_items.json) for a ratings file or a study folder given on the command line."""
    path = Path(path)
    csv_path = path / RATINGS_FILE if path.is_dir() else path
    items_path = csv_path.parent / ITEMS_FILE
    for needed in (csv_path, items_path):
        if not needed.is_file():
            raise InputError(f"{needed}: not found (ratings are read from a study folder of `dladiff rate`, "
                             f"holding {RATINGS_FILE} and {ITEMS_FILE})")
    return csv_path, items_path


def mos_by_group(sources: Iterable[Path], confidence: float = 0.95) -> dict[GroupKey, MOS]:
    """MOS per (dataset, method, attack, prompt) from one or more raters' ratings files.

    Each ratings file is read with the ``rating_items.json`` beside it. A rater who rated the same
    image twice (or a file given twice) counts once, with the last rating.
    """
    latest: dict[tuple, tuple[GroupKey, int]] = {}
    files_of: dict[str, set[Path]] = {}
    for source in sources:
        csv_path, items_path = ratings_source(source)
        items = {item["id"]: item for item in _read_record(items_path)["items"]}
        for row in read_ratings(csv_path):
            files_of.setdefault(row["rater"], set()).add(csv_path.resolve())
            item = items.get(row["item"])
            if item is None:
                log.warning("%s: item %r is not in %s, left out", csv_path, row["item"], items_path)
                continue
            image = (item["dataset"], item["method"], item["identity"], item["attack"], item["prompt"], item["file"])
            latest[(row["rater"], image)] = (group_of(item), row["score"])
    for rater, files in sorted(files_of.items()):
        if len(files) > 1:
            log.warning("rater %s has ratings in %d files (%s); if these are different people, their ratings of the same "
                        "image count once: give each person an own --rater", rater, len(files), ", ".join(sorted(map(str, files))))
    groups: dict[GroupKey, list[tuple[str, int]]] = {}
    for (rater, _), (key, score) in latest.items():
        groups.setdefault(key, []).append((rater, score))
    out = {}
    for key, ratings in groups.items():
        mean, half = mean_ci([score for _, score in ratings], confidence)
        out[key] = MOS(mean, half, len(ratings), len({rater for rater, _ in ratings}))
    return out
