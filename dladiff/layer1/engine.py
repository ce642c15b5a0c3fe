"""The layer-1 engine: runs a method's declared phases epoch by epoch, checkpointing the run state.

:class:`ADFTProtector` joins the three parts — :class:`~dladiff.layer1.models.Layer1Models` (what is
read), :class:`~dladiff.layer1.state.RunState` (what is checkpointed) and a
:class:`~dladiff.layer1.phases.Method` (what each epoch does) — and :func:`run_protector` loops over
the epochs with checkpoints, resume and Ctrl-C handling.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dladiff.config import Config, config_to_dict
from dladiff.diffusion.finetune import LatentSet
from dladiff.errors import DladiffError
from dladiff.layer1 import stages
from dladiff.layer1.models import Batch, load_models
from dladiff.layer1.phases import PGD, Method, Phase, Train, Work
from dladiff.layer1.state import RunState, load_checkpoint, save_checkpoint
from dladiff.runtime import Interrupted, StopRequest, progress

if TYPE_CHECKING:
    from dladiff.diffusion.loading import SDComponents

log = logging.getLogger("dladiff")


@dataclass
class Layer1Result:
    """δ1 ``(N, 3, R, R)`` (CPU, fp32, [-1,1] units) and per-epoch mean losses."""

    delta: torch.Tensor
    history: list[dict] = field(default_factory=list)


def run_fingerprint(cfg: Config, image_hashes: list[str], surrogate_id: str | None) -> str:
    """Hash of everything that determines layer 1's result; a checkpoint resumes only if it matches."""
    payload = {
        "model": config_to_dict(cfg.model), "seed": cfg.runtime.seed, "prompt": config_to_dict(cfg.prompt),
        "layer1": {k: v for k, v in config_to_dict(cfg.layer1).items() if k != "checkpoint_every"},
        "images": image_hashes, "surrogate": surrogate_id,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class ADFTProtector:
    """One layer-1 run: ``models`` (read), ``state`` (checkpointed), ``method`` (declared phases), ``batch`` (x).

    ``method`` defaults to the registered method of ``cfg.method.name`` (``dladiff``: DSUR + ADFT).
    """

    def __init__(self, x: torch.Tensor, components: SDComponents, static_unet, cfg: Config, device: torch.device,
                 method: Method | None = None):
        if method is None:
            from dladiff.methods.registry import method_class

            method = method_class(cfg.method.name)(cfg)
        self.cfg, self.method, self.name = cfg, method, method.name
        if not method.needs_static_surrogate(cfg):
            static_unet = None
        elif static_unet is None:
            raise DladiffError(f"method {method.name} reads the static surrogate θs: give --surrogate or let protect "
                               "train one (dladiff: or set layer1.dsur: false)")
        self.batch = Batch(x.to(device, torch.float32), cfg.layer1.batch_size)
        self.models, text = load_models(self.batch.x, components, static_unet, cfg, device,
                                        method.uses_pretrained_unet(cfg))
        generator = torch.Generator("cpu").manual_seed(cfg.runtime.seed)
        self.state = RunState(torch.zeros_like(self.batch.x), generator, text)
        dynamic = self.models.dynamic
        if cfg.runtime.gradient_checkpointing:
            self.models.vae.enable_gradient_checkpointing()
            for unet in (dynamic, None if method.uses_pretrained_unet(cfg) else static_unet):
                if unet is not None:
                    unet.enable_gradient_checkpointing()
        if method.train_steps:
            self.state.trainer = stages.make_trainer(self.models, cfg)
        elif dynamic is not None:
            dynamic.requires_grad_(False)
        method.setup(self.models, self.state, components)

    # the parts other code reads (scripts/bench.py, tests)
    x = property(lambda self: self.batch.x)
    delta = property(lambda self: self.state.delta)
    epoch = property(lambda self: self.state.epoch)
    history = property(lambda self: self.state.history)
    trainer = property(lambda self: self.state.trainer)
    vae = property(lambda self: self.models.vae)
    unet_d = property(lambda self: self.models.dynamic)
    static_unet = property(lambda self: self.models.static)

    def pgd(self, phase: PGD) -> float:
        """One step of ``phase``; returns its mean loss before the step."""
        rule = phase.step_size or (lambda models, state, chunk: self.cfg.layer1.step_size)
        return stages.pgd_step(self.models, self.state, self.batch, phase.loss, rule, self.cfg.layer1.epsilon,
                               phase.stores)

    def _phase(self, key: str) -> PGD:
        return next(p for p in self.method.epoch(self.state) if isinstance(p, PGD) and p.key == key)

    def stage1_step(self) -> float:
        """Stage 1 (DSUR): one PGD step on L_attn."""
        return self.pgd(self._phase("attn"))

    def stage2_step(self) -> float:
        """Stage 2: one PGD step on θd's denoising loss."""
        return self.pgd(self._phase("denoise"))

    def perturbed_latent_set(self) -> LatentSet:
        return stages.perturbed_latent_set(self.models, self.state, self.batch)

    def stage3_step(self, data: LatentSet) -> float:
        """Stage 3 (ADFT): one AdamW step of θd on ``data`` (x + δ1)."""
        return stages.train_step(self.state, data, self.batch.size)

    def steps_per_epoch(self) -> int:
        """PGD and training steps of one epoch (the progress bar's unit)."""
        return sum(p.steps for p in self.method.epoch(self.state) if not isinstance(p, Work))

    def run_epoch(self, bar=None) -> dict:
        """The method's phases of one epoch in order; returns (and records) each phase's mean value."""
        stats = {}
        for phase in self.method.epoch(self.state):
            value = self._run_phase(phase, bar)
            if value is not None:
                stats[phase.key] = value
        self.state.epoch += 1
        self.state.history.append({"epoch": self.state.epoch, **stats})
        return stats

    def _run_phase(self, phase: Phase, bar) -> float | None:
        if isinstance(phase, Work):
            return phase.run(self.models, self.state, self.batch)
        if not phase.steps:
            return None
        if isinstance(phase, Train):
            data = self.perturbed_latent_set()
            step = lambda: self.stage3_step(data)  # noqa: E731
        else:
            step = lambda: self.pgd(phase)  # noqa: E731
        values = []
        for _ in range(phase.steps):
            values.append(step())
            self._tick(bar, phase.key, values[-1])
        return sum(values) / len(values)

    def _tick(self, bar, key: str, value: float) -> None:
        if bar is not None:
            bar.set_description(f"layer 1 epoch {self.state.epoch + 1}/{self.cfg.layer1.epochs} [{key}]")
            bar.set_postfix({key: f"{value:.4g}"}, refresh=False)
            bar.update(1)


def run_protector(protector: ADFTProtector, cfg: Config, run_dir: Path, fingerprint: str, resume: bool = False,
                  quiet: bool = False, stop: StopRequest | None = None) -> Layer1Result:
    """Run ``protector`` for ``layer1.epochs`` epochs, checkpointing every ``checkpoint_every``.

    With ``resume`` the run continues from the checkpoint (same result as uninterrupted). When
    ``stop`` is requested (first Ctrl-C) the current epoch finishes, a checkpoint is written and
    :class:`~dladiff.runtime.Interrupted` is raised.
    """
    name, state = protector.name, protector.state
    if resume:
        saved = load_checkpoint(run_dir, fingerprint)
        if saved is not None:
            state.restore(saved)
            log.info("resuming layer 1 (%s) at epoch %d/%d", name, state.epoch, cfg.layer1.epochs)
    stop = stop or StopRequest()
    epochs = cfg.layer1.epochs
    bar = progress(epochs * protector.steps_per_epoch(), f"layer 1 ({name})", quiet)
    bar.update(state.epoch * protector.steps_per_epoch())
    try:
        while state.epoch < epochs:
            protector.run_epoch(bar)
            last = state.epoch == epochs
            if last or stop.requested or state.epoch % cfg.layer1.checkpoint_every == 0:
                save_checkpoint(state.checkpoint(fingerprint), run_dir)
            if stop.requested and not last:
                raise Interrupted(f"stopped after layer-1 epoch {state.epoch}/{epochs} ({name}); a checkpoint "
                                  f"is in {run_dir}; rerun the same command with --resume to continue")
    finally:
        bar.close()
    return Layer1Result(state.delta.detach().cpu(), state.history)


def run_layer1(x: torch.Tensor, components: SDComponents, static_unet, cfg: Config, device: torch.device,
               run_dir: Path, fingerprint: str, resume: bool = False, quiet: bool = False,
               stop: StopRequest | None = None) -> Layer1Result:
    """Optimize δ1 for the images ``x`` ``(N, 3, R, R)`` with DSUR + ADFT; checkpoints into ``run_dir``."""
    from dladiff.methods.registry import method_class

    protector = ADFTProtector(x, components, static_unet, cfg, device, method_class("dladiff")(cfg))
    return run_protector(protector, cfg, run_dir, fingerprint, resume, quiet, stop)
