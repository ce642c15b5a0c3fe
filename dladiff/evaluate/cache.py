"""On-disk cache of the attacks: generated images, done-markers and locks, so reruns skip finished work.

Layout under the evaluation folder::

    EVAL_DIR/<identity>/<attack>/attack.json           settings fingerprint, written when the attack starts
    EVAL_DIR/<identity>/<attack>/<prompt-slug>/0000.png generated images, image k drawn with seed + k
    EVAL_DIR/<identity>/<attack>/done.json             the same fingerprint, written when every image exists

An attack whose ``done.json`` matches the current fingerprint is skipped; one that was interrupted or
whose settings changed is wiped and run again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import re
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from dladiff.data import save_json, save_png

STARTED, DONE = "attack.json", "done.json"


def prompt_slug(prompt: str) -> str:
    """A folder name for a prompt: ``a photo of sks person`` -> ``a_photo_of_sks_person``."""
    return re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:80] or "prompt"


def image_name(index: int) -> str:
    return f"{index:04d}.png"


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``, or None when absent or unreadable (a half-written marker)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_done(attack_dir: Path, fingerprint: str) -> bool:
    """True when the attack finished with these exact settings."""
    marker = read_json(Path(attack_dir) / DONE)
    return marker is not None and marker.get("fingerprint") == fingerprint


def start_attack(attack_dir: Path, fingerprint: str, settings: dict) -> None:
    """Wipe any earlier (unfinished or outdated) outputs and record the settings of this run."""
    attack_dir = Path(attack_dir)
    if attack_dir.exists():
        shutil.rmtree(attack_dir)
    attack_dir.mkdir(parents=True)
    save_json({"fingerprint": fingerprint, "settings": settings}, attack_dir / STARTED)


def finish_attack(attack_dir: Path, fingerprint: str, summary: dict) -> None:
    """Write the done-marker (last, so an interrupted attack never looks finished)."""
    save_json({"fingerprint": fingerprint, **summary}, Path(attack_dir) / DONE)


def save_generated(images: list[np.ndarray], folder: Path, first_index: int) -> None:
    """Write generated images as ``NNNN.png`` from ``first_index`` on (atomic, lossless)."""
    for offset, pixels in enumerate(images):
        save_png(np.ascontiguousarray(pixels), Path(folder) / image_name(first_index + offset))


def load_generated(folder: Path) -> list[np.ndarray]:
    """The generated images of one attack and prompt, in index order."""
    return [np.asarray(Image.open(p).convert("RGB")) for p in sorted(Path(folder).glob("[0-9][0-9][0-9][0-9].png"))]


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive ``flock`` on ``path`` (created if needed): serializes processes sharing a folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
