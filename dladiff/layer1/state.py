"""The run state of layer 1 — δ1, θd and its optimizer, the RNG, the text states, epoch, history — and its files.

:class:`RunState` is everything a resumed run needs to continue exactly where an interrupted one
stopped; :meth:`RunState.checkpoint` turns it into tensors and plain data (:mod:`dladiff.state_io`,
never pickle). ``run_dir/layer1.ckpt`` holds the newest checkpoint and ``layer1.ckpt.prev`` the one
before, so a damaged newest file costs a few epochs, not the run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dladiff.diffusion.finetune import DreamBoothTrainer
from dladiff.errors import DladiffError
from dladiff.state_io import StateFileError, read_state, save_state

log = logging.getLogger("dladiff")

CHECKPOINT = "layer1.ckpt"
PREVIOUS_CHECKPOINT = "layer1.ckpt.prev"
CHECKPOINT_KIND = "layer-1 checkpoint"


@dataclass
class RunState:
    """δ1 ``(N, 3, R, R)`` ([-1, 1] units), the CPU generator of every draw, the text states ``(1, 77, D)``
    (prompt-tuning methods change them), θd's trainer (weights + AdamW; ``None`` without stage 3),
    the number of finished epochs and one history entry (mean loss per phase) for each."""

    delta: torch.Tensor
    generator: torch.Generator
    text: torch.Tensor
    trainer: DreamBoothTrainer | None = None
    epoch: int = 0
    history: list[dict] = field(default_factory=list)

    def checkpoint(self, fingerprint: str) -> dict:
        """Tensors and plain data only; ``fingerprint`` ties it to the run's photos, model and settings."""
        state = {"fingerprint": fingerprint, "epoch": self.epoch, "delta": self.delta.cpu(),
                 "generator": self.generator.get_state(), "history": self.history, "text": self.text.cpu()}
        if self.trainer is not None:
            state["unet_d"] = self.trainer.unet.state_dict()
            state["optimizer"] = self.trainer.optimizer.state_dict()
        return state

    def restore(self, saved: dict) -> None:
        """Continue from ``saved`` (what :meth:`checkpoint` wrote)."""
        device = self.delta.device
        self.epoch = saved["epoch"]
        self.delta = saved["delta"].to(device)
        self.generator.set_state(saved["generator"])
        self.history = list(saved["history"])
        if "text" in saved:
            self.text = saved["text"].to(self.text.device)
        if self.trainer is not None:
            self.trainer.unet.load_state_dict(saved["unet_d"])
            self.trainer.optimizer.load_state_dict(saved["optimizer"])


def save_checkpoint(state: dict, run_dir: Path) -> None:
    """Write ``run_dir/layer1.ckpt`` atomically, keeping the checkpoint it replaces as ``layer1.ckpt.prev``.

    The older fallback is deleted first, so the disk never holds more than two checkpoints.
    """
    run_dir = Path(run_dir)
    (run_dir / PREVIOUS_CHECKPOINT).unlink(missing_ok=True)
    save_state(state, run_dir / CHECKPOINT, CHECKPOINT_KIND, keep_previous=run_dir / PREVIOUS_CHECKPOINT)


def remove_checkpoints(run_dir: Path) -> None:
    """Delete the layer-1 checkpoints of ``run_dir`` (once its result is saved)."""
    for name in (CHECKPOINT, PREVIOUS_CHECKPOINT):
        (Path(run_dir) / name).unlink(missing_ok=True)


def load_checkpoint(run_dir: Path, fingerprint: str) -> dict | None:
    """The newest sound layer-1 checkpoint of ``run_dir`` (``layer1.ckpt``, else ``layer1.ckpt.prev``).

    A damaged or foreign file is skipped with a warning (never unpickled); None when no sound one is
    left. A sound checkpoint of another run (other photos, model or settings) is a clear error.
    """
    damaged = []
    for name in (CHECKPOINT, PREVIOUS_CHECKPOINT):
        path = Path(run_dir) / name
        if not path.is_file():
            continue
        try:
            state = read_state(path, CHECKPOINT_KIND)
        except StateFileError as exc:
            log.warning("%s", exc)
            damaged.append(path)
            continue
        if state.get("fingerprint") != fingerprint:
            raise DladiffError(f"{path} was made with other photos, model or layer-1 settings; delete it or use another --out")
        if damaged:
            log.warning("resuming layer 1 from the checkpoint before the damaged one (%s)", path)
        return state
    if damaged:
        log.warning("no sound layer-1 checkpoint is left; layer 1 starts again from the first epoch")
    return None
