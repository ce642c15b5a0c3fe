"""What every protection method shares: the layer-1 engine with a configurable epoch, EOT and the run loop.

A method is an :class:`~dladiff.layer1.ADFTProtector` whose epoch (Eq. 9 generalized) is

1. a list of PGD phases ``(key, steps, step)``, each step δ ← Π_η(δ + α_i·sign(∇δ L)) over all images
   (``pgd.pgd_update``; α_i is α, or a per-image schedule);
2. n3 optimizer steps of θd on x + δ (when the method trains a surrogate);
3. an optional method-specific update after training (:meth:`MethodProtector.after_training`).

The budget is shared: η, α, E and n1 + n2 PGD steps per epoch from ``layer1``. A method states how it
maps onto the engine by rewriting the layer-1 config (:meth:`MethodProtector.engine_config`).
With EOT enabled, every PGD gradient goes through a random differentiable JPEG/resize/blur of x + δ.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable

import torch

from dladiff.config import Config, with_overrides
from dladiff.data import atomic_torch_save
from dladiff.diffusion.attention import AttentionStore
from dladiff.diffusion.loading import SDComponents
from dladiff.diffusion.loss import latent_distribution, sample_latents
from dladiff.layer1 import CHECKPOINT, ADFTProtector, Layer1Result, load_checkpoint
from dladiff.methods.settings import MethodConfig, method_config
from dladiff.pgd import pgd_update
from dladiff.purify import EOTConfig, eot_config, eot_transform
from dladiff.runtime import Interrupted, StopRequest, progress

log = logging.getLogger("dladiff")


def pgd_budget(cfg: Config) -> int:
    """PGD steps per epoch shared by every method: n1 + n2 (6 in the paper's setting)."""
    return cfg.layer1.stage1_steps + cfg.layer1.stage2_steps


def pgd_only(cfg: Config) -> Config:
    """Layer-1 config of a method made of PGD alone: no stage 1, all n1 + n2 steps in stage 2, no stage 3."""
    return with_overrides(cfg, layer1={"dsur": False, "adft": False, "stage1_steps": 0,
                                       "stage2_steps": pgd_budget(cfg), "stage3_steps": 0})


def pgd_with_training(cfg: Config) -> Config:
    """Layer-1 config of an ASPL-like method: no stage 1, n1 + n2 PGD steps in stage 2, stage 3 as configured."""
    return with_overrides(cfg, layer1={"dsur": False, "stage1_steps": 0, "stage2_steps": pgd_budget(cfg)})


def mean_cross_maps(store: AttentionStore) -> torch.Tensor:
    """Cross-attention maps averaged over captured layers and heads: ``(B, Q, K)`` (one resolution)."""
    maps = [m.float().mean(dim=1) for m in store.cross.values()]
    if not maps:
        raise ValueError("no cross-attention map was captured")
    return torch.stack(maps).mean(dim=0)


class MethodProtector(ADFTProtector):
    """The layer-1 engine with a method-defined epoch, EOT on the PGD path and method state in checkpoints."""

    name = "method"

    def __init__(self, x: torch.Tensor, components: SDComponents, static_unet, cfg: Config, device: torch.device,
                 method: MethodConfig | None = None, eot: EOTConfig | None = None):
        self.settings = method or method_config(cfg)
        self.eot = eot or eot_config(cfg)
        super().__init__(x, components, static_unet, self.engine_config(cfg), device)

    @classmethod
    def engine_config(cls, cfg: Config) -> Config:
        """The layer-1 config this method runs the engine with (default: unchanged)."""
        return cfg

    @classmethod
    def needs_static_surrogate(cls, cfg: Config) -> bool:
        """Whether the method reads the static surrogate θs (default: no)."""
        return False

    def pgd_phases(self) -> list[tuple[str, int, Callable[[], float]]]:
        """The PGD phases of one epoch as ``(history key, steps, step function)``."""
        return [("denoise", self.l1.stage2_steps, self.stage2_step)]

    def step_size(self, draw) -> float | torch.Tensor:
        """α for this draw: a number, or ``(B, 1, 1, 1)`` per image (schedules)."""
        return self.l1.step_size

    def _pgd_step(self, loss_fn) -> float:
        """One PGD ascent step over all images (chunk by chunk) with :meth:`step_size`; mean loss before it."""
        losses = []
        for idx in self._chunks():
            delta = self.delta[idx].clone().requires_grad_(True)
            draw = self._draw(len(idx))
            loss = loss_fn(idx, delta, draw)
            (grad,) = torch.autograd.grad(loss, delta)
            self.delta[idx] = pgd_update(self.delta[idx], grad, self.x[idx], self.step_size(draw), self.l1.epsilon, ascent=True)
            losses.append(float(loss.detach()))
        return sum(losses) / len(losses)

    def perturbed_pixels(self, idx: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """x + δ of the chunk, through a random EOT transform when EOT is enabled."""
        pixels = self.x[idx] + delta
        return eot_transform(pixels, self.generator, self.eot) if self.eot.enabled else pixels

    def _perturbed_latents(self, delta: torch.Tensor, idx: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        mean, std = latent_distribution(self.vae, self.perturbed_pixels(idx, delta).to(self.vae.dtype))
        return sample_latents(self.vae, mean.float(), std.float(), xi)

    @contextlib.contextmanager
    def capturing(self, store: AttentionStore):
        """Record maps into ``store`` for the duration of the block, then drop them."""
        store.enabled = True
        try:
            yield store
        finally:
            store.enabled = False
            store.clear()

    def before_epoch(self) -> dict:
        """Method work before the PGD phases; returns history entries (default: none)."""
        return {}

    def after_training(self) -> dict:
        """Method work after θd's training steps; returns history entries (default: none)."""
        return {}

    def run_epoch(self, bar=None) -> dict:
        """:meth:`before_epoch`, the PGD phases, θd training (stage 3), :meth:`after_training`; mean loss of each."""
        stats = self.before_epoch()
        for key, steps, step in self.pgd_phases():
            values = []
            for _ in range(steps):
                values.append(step())
                self._tick(bar, key, values[-1])
            if values:
                stats[key] = sum(values) / len(values)
        if self.trainer is not None:
            data = self.perturbed_latent_set()
            values = []
            for _ in range(self.l1.stage3_steps):
                values.append(self.stage3_step(data))
                self._tick(bar, "train", values[-1])
            stats["train"] = sum(values) / len(values)
        stats.update(self.after_training())
        self.epoch += 1
        self.history.append({"epoch": self.epoch, **stats})
        return stats

    def steps_per_epoch(self) -> int:
        pgd = sum(steps for _, steps, _ in self.pgd_phases())
        return pgd + (self.l1.stage3_steps if self.trainer else 0)

    def extra_state(self) -> dict:
        """Method state a resumed run needs besides δ, θd and the generator (default: none)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restore what :meth:`extra_state` saved."""

    def state(self, fingerprint: str) -> dict:
        return {**super().state(fingerprint), "method": self.name, **self.extra_state()}

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        self.load_extra_state(state)


def run_protector(protector: MethodProtector, cfg: Config, run_dir: Path, fingerprint: str, resume: bool = False,
                  quiet: bool = False, stop: StopRequest | None = None) -> Layer1Result:
    """Run ``protector`` for ``layer1.epochs`` epochs with checkpoints, resume and Ctrl-C as ``run_layer1``."""
    if resume:
        state = load_checkpoint(run_dir, fingerprint, protector.device)
        if state is not None:
            protector.load_state(state)
            log.info("resuming %s at epoch %d/%d", protector.name, protector.epoch, cfg.layer1.epochs)
    stop = stop or StopRequest()
    epochs = cfg.layer1.epochs
    bar = progress(epochs * protector.steps_per_epoch(), f"layer 1 ({protector.name})", quiet)
    bar.update(protector.epoch * protector.steps_per_epoch())
    try:
        while protector.epoch < epochs:
            protector.run_epoch(bar)
            last = protector.epoch == epochs
            if last or stop.requested or protector.epoch % cfg.layer1.checkpoint_every == 0:
                atomic_torch_save(protector.state(fingerprint), Path(run_dir) / CHECKPOINT)
            if stop.requested and not last:
                raise Interrupted(f"stopped after layer-1 epoch {protector.epoch}/{epochs} ({protector.name}); "
                                  f"a checkpoint is in {run_dir}; rerun the same command with --resume to continue")
    finally:
        bar.close()
    return Layer1Result(protector.delta.detach().cpu(), protector.history)
