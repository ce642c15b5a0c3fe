"""Whole datasets: protect every identity (``dladiff protect --dataset``), shard work across processes.

Sharding: under ``accelerate launch`` (any number of processes, GPUs and nodes) each process takes
identity i when ``i % num_processes == process_index`` and writes only its own identities' folders;
without a launcher there is one process that takes everything. Finished identities are skipped, so a
killed run resumes by running the same command again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dladiff.config import Config
from dladiff.errors import DladiffError
from dladiff.layout import identity_names, photos_folder, shard, surrogate_folder
from dladiff.runtime import Interrupted, StopRequest, progress, select_device

log = logging.getLogger("dladiff")

PROTECT_REPORT = "report.json"


@dataclass(frozen=True)
class ProcessShare:
    """This process's place among ``count`` processes and the device it should use."""

    index: int
    count: int
    device_name: str


def process_share(device_name: str) -> ProcessShare:
    """Index and count from ``accelerate.PartialState`` (1 process without a launcher).

    With several processes on CUDA, ``auto``/``cuda`` becomes this process's own GPU; on a machine
    without CUDA (or with ``device: cpu``) the processes of ``torchrun``/``accelerate`` are CPU workers.
    """
    from accelerate import PartialState

    state = PartialState(cpu=device_name == "cpu" or not torch.cuda.is_available())
    if state.num_processes > 1 and state.device.type == "cuda" and device_name in ("auto", "cuda"):
        torch.cuda.set_device(state.device)
        device_name = str(state.device)
    return ProcessShare(state.process_index, state.num_processes, device_name)


@dataclass
class DatasetProtectOutcome:
    """Identities protected now, found already done, failed (with the reason), and photos without a face."""

    out_root: Path
    protected: list[str] = field(default_factory=list)
    already_done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    no_face: dict[str, list[str]] = field(default_factory=dict)  # identity -> photos where layer 2 found no face


def is_protected(out_dir: Path) -> bool:
    """An identity is done when ``protect`` wrote its ``report.json``."""
    return (Path(out_dir) / PROTECT_REPORT).is_file()


def train_set_a_surrogate(identity_dir: Path, out_dir: Path, cfg: Config, components, quiet: bool) -> Path | None:
    """Anti-DreamBooth layout: the static surrogate θs trained on ``set_A`` (paper Eq. 7), else None.

    None too when the method (``method.name`` with ``cfg``) never reads θs: no DreamBooth steps are
    spent on a surrogate nothing uses. ``components``: the identity's loaded SD (left untouched).
    """
    from dladiff.data import load_folder
    from dladiff.methods import needs_static_surrogate
    from dladiff.surrogate import finetune_surrogate

    set_a = surrogate_folder(identity_dir)
    if set_a is None or not needs_static_surrogate(cfg.method.name, cfg):
        return None
    portraits, _ = load_folder(set_a, cfg.input.max_megapixels)
    return finetune_surrogate(portraits, components, cfg, out_dir / "surrogate", select_device(cfg.runtime.device), quiet)


def protect_identity(identity_dir: Path, out_dir: Path, cfg: Config, layers: tuple[int, ...], quiet: bool,
                     stop: StopRequest | None = None, overwrite: bool = False):
    """Protect one identity folder (``set_B`` of the Anti-DreamBooth layout) into ``out_dir``; returns the outcome.

    With layer 1, SD is loaded once and serves both the ``set_A`` surrogate and the protection.
    """
    from dladiff.diffusion.loading import load_sd
    from dladiff.protect import protect_folder

    components, surrogate = None, None
    if 1 in layers:
        components = load_sd(cfg.model.id, cfg.model.revision, select_device(cfg.runtime.device))
        surrogate = train_set_a_surrogate(identity_dir, out_dir, cfg, components, quiet)
    return protect_folder(photos_folder(identity_dir), out_dir, cfg, layers, surrogate, resume=True, quiet=quiet,
                          stop=stop, overwrite=overwrite, components=components)


def protect_dataset(dataset_root: Path, out_root: Path, cfg: Config, layers: tuple[int, ...] = (1, 2),
                    quiet: bool = False, share: ProcessShare | None = None, stop: StopRequest | None = None,
                    overwrite: bool = False) -> DatasetProtectOutcome:
    """Protect every identity of ``dataset_root`` into ``out_root/<identity>/``, this process's share.

    Plain layout: each identity's photos are protected and its surrogate is trained on them. Anti-DreamBooth
    layout: θs is trained on ``set_A``, ``set_B`` is protected (``set_C`` stays for the evaluation's
    references). Identities with a ``report.json`` are skipped; an interrupted identity resumes.
    One identity's failure is logged and reported, the others go on. When ``stop`` is requested
    (first Ctrl-C) the current identity stops at its next checkpoint, or the run stops after it,
    with :class:`~dladiff.runtime.Interrupted`.
    """
    dataset_root, out_root = Path(dataset_root), Path(out_root)
    if out_root.resolve() == dataset_root.resolve():
        raise DladiffError(f"--out {out_root} is the dataset folder; choose another folder so the originals stay untouched")
    if out_root.exists() and not out_root.is_dir():
        raise DladiffError(f"--out {out_root} is a file, not a folder; give the name of a folder (it is created if missing)")
    share = share or process_share(cfg.runtime.device)
    if share.device_name != cfg.runtime.device:
        from dladiff.config import with_overrides

        cfg = with_overrides(cfg, runtime={"device": share.device_name})
    stop = stop or StopRequest()
    outcome = DatasetProtectOutcome(out_root)
    mine = shard(identity_names(dataset_root), share.index, share.count)
    bar = progress(len(mine), f"identities (process {share.index + 1}/{share.count})", quiet)
    try:
        for done, name in enumerate(mine):
            if stop.requested:
                raise Interrupted(f"stopped after {done}/{len(mine)} identities of this process; rerun the same "
                                  "command to continue (finished identities are skipped)")
            _protect_one_identity(dataset_root / name, out_root / name, cfg, layers, quiet, stop, overwrite, outcome)
            bar.update(1)
    finally:
        bar.close()
    return outcome


def _protect_one_identity(identity_dir: Path, out_dir: Path, cfg: Config, layers, quiet: bool, stop: StopRequest,
                          overwrite: bool, outcome: DatasetProtectOutcome) -> None:
    name = identity_dir.name
    if is_protected(out_dir):
        outcome.already_done.append(name)
        return
    try:
        result = protect_identity(identity_dir, out_dir, cfg, layers, quiet, stop, overwrite)
    except Interrupted:
        raise
    except DladiffError as exc:
        log.error("identity %s: %s", name, exc)
        outcome.failed[name] = str(exc)
        return
    outcome.protected.append(name)
    if result.report.get("no_face"):
        outcome.no_face[name] = list(result.report["no_face"])
