"""Atomic writers: a full disk is a clear error naming the file, the old file survives, no temporary is left."""

import errno
import json
from pathlib import Path

import numpy as np
import pytest

from dladiff.data import atomic_write, save_json, save_png
from dladiff.errors import DladiffError


def test_disk_full_while_writing_report_names_the_file(tmp_path, monkeypatch):
    report = tmp_path / "report.json"
    save_json({"run": 1}, report)

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(DladiffError) as info:
        save_json({"run": 2}, report)
    message = str(info.value)
    assert str(report) in message and "disk is full" in message and "free some space" in message
    assert json.loads(report.read_text()) == {"run": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_failed_rename_removes_the_temporary(tmp_path, monkeypatch):
    import dladiff.data as data

    def refuse(src, dst):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(data.os, "replace", refuse)
    with pytest.raises(DladiffError, match="photo.png.*writable"):
        save_png(np.zeros((8, 8, 3), np.uint8), tmp_path / "photo.png")
    assert list(tmp_path.iterdir()) == []


def test_keep_previous_keeps_the_replaced_file(tmp_path):
    path, previous = tmp_path / "state", tmp_path / "state.prev"
    atomic_write(path, lambda tmp: tmp.write_text("one"), keep_previous=previous)
    assert not previous.exists()
    atomic_write(path, lambda tmp: tmp.write_text("two"), keep_previous=previous)
    assert path.read_text() == "two" and previous.read_text() == "one"
