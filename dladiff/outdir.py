"""The output folder of ``dladiff protect``: one run at a time, and no file dladiff did not write is replaced.

* Lock: ``OUT/.dladiff-run/lock`` is held with ``fcntl.flock`` for the whole run. The kernel drops
  the lock when the process ends, however it ends, so a killed run never blocks the next one; a
  second run into the same folder stops at once with a message naming the first one's pid.
* Manifest: ``OUT/.dladiff-manifest.json`` lists the files dladiff wrote into the folder with their
  SHA-256. An existing file with an output's name is replaced only if the manifest lists it and it
  is unchanged since, or when the user says ``--overwrite``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from pathlib import Path

from dladiff import __version__
from dladiff.data import file_sha256, save_json
from dladiff.errors import DladiffError

log = logging.getLogger("dladiff")

LOCK = "lock"
MANIFEST = ".dladiff-manifest.json"


def _holds_path(fd: int, path: Path) -> bool:
    """True if the open file ``fd`` is still the file at ``path`` (not removed or replaced meanwhile)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def output_lock(run_dir: Path):
    """Hold ``run_dir/lock`` exclusively for the block; raises :class:`DladiffError` if another run holds it.

    On leaving, a run folder that holds nothing but the lock is removed.
    """
    run_dir = Path(run_dir)
    path = run_dir / LOCK
    while True:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise DladiffError(f"{run_dir.parent}: another dladiff run (pid {holder}) is writing into this folder; "
                               "wait for it to finish, or choose another --out") from None
        if _holds_path(fd, path):
            break
        os.close(fd)  # the run that held it finished and removed its folder: lock the new file
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        if run_dir.is_dir() and [p.name for p in run_dir.iterdir()] == [LOCK]:
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                run_dir.rmdir()
        os.close(fd)


class Manifest:
    """The files dladiff wrote into ``out_dir`` (name → SHA-256), kept in ``out_dir/.dladiff-manifest.json``."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / MANIFEST
        self.files: dict[str, str] = {}
        if self.path.is_file():
            try:
                files = json.loads(self.path.read_text(encoding="utf-8")).get("files", {})
                self.files = {str(k): str(v) for k, v in files.items()}
            except (ValueError, AttributeError, OSError):
                log.warning("%s is damaged; the files it listed count as not written by dladiff", self.path)

    def owns(self, name: str) -> bool:
        """True if ``name`` is a file dladiff wrote here and nobody changed since."""
        path = self.out_dir / name
        return name in self.files and path.is_file() and file_sha256(path) == self.files[name]

    def record(self, name: str) -> None:
        """Note that dladiff just wrote ``out_dir/name``."""
        self.files[name] = file_sha256(self.out_dir / name)
        save_json({"dladiff_version": __version__, "files": dict(sorted(self.files.items()))}, self.path)


def foreign_files(out_dir: Path, names: list[str], manifest: Manifest) -> list[str]:
    """The names among ``names`` that exist in ``out_dir`` but are not unchanged outputs of dladiff."""
    return [n for n in names if (Path(out_dir) / n).exists() and not manifest.owns(n)]


def refuse_foreign_files(out_dir: Path, names: list[str], manifest: Manifest, overwrite: bool) -> None:
    """Raise :class:`DladiffError` naming the files a run would replace that dladiff did not write."""
    foreign = foreign_files(out_dir, names, manifest)
    if foreign and not overwrite:
        shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
        raise DladiffError(f"--out {out_dir} already holds {shown}, which this run would replace and which dladiff did "
                           "not write (or which changed since); move them away, choose another --out, or add "
                           "--overwrite to replace them")
    if foreign:
        log.warning("--overwrite: replacing %s in %s", ", ".join(foreign), out_dir)
