"""Layer 1: Dual-Surrogate Models (DSUR) + Alternating Dynamic Fine-Tuning (ADFT), paper §4.1.

One ADFT epoch (Eq. 9), for images x ``(N, 3, R, R)`` in [-1, 1] and perturbation δ1:

1. stage 1 — θs, θd fixed; n1 PGD ascent steps on L_attn (Eq. 8): attention maps of the clean
   image under the static surrogate θs vs maps of x + δ1 under the dynamic surrogate θd, for the
   same (t, ε) draw;
2. stage 2 — n2 PGD ascent steps on θd's denoising loss (Eq. 3) on x + δ1;
3. stage 3 — n3 AdamW steps of θd minimizing the denoising loss on x + δ1.

Every PGD step is δ1 ← Π(δ1 + α1·sign(∇δ1 L)) with Π clipping δ1 to [−η1, η1] and x + δ1 to [−1, 1].
``dsur: false`` drops stage 1 (Anti-DreamBooth's ASPL), ``adft: false`` drops stage 3 (Table 5).
Checkpoints hold δ1, θd and its optimizer and the generator state, so a resumed run reaches the
same result as an uninterrupted one. They are tensors and plain data only (:mod:`dladiff.state_io`,
never pickle); the one before the newest is kept, so a damaged newest one costs a few epochs, not
the run. During PGD θd's weights do not require grad: autograd keeps no activations for weight
gradients that nothing uses.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from dladiff.config import Config, config_to_dict
from dladiff.diffusion.attention import AttentionStore, attention_loss, install_capture
from dladiff.diffusion.finetune import DreamBoothTrainer, LatentSet, encode_images
from dladiff.diffusion.loading import SDComponents, encode_prompt, token_positions
from dladiff.diffusion.loss import denoising_loss, draw_noise, latent_distribution, sample_latents
from dladiff.errors import DladiffError
from dladiff.pgd import pgd_update
from dladiff.purify import eot_transform
from dladiff.runtime import Interrupted, StopRequest, autocast, frozen_dtype, progress
from dladiff.state_io import StateFileError, read_state, save_state

log = logging.getLogger("dladiff")

CHECKPOINT = "layer1.ckpt"
PREVIOUS_CHECKPOINT = "layer1.ckpt.prev"
CHECKPOINT_KIND = "layer-1 checkpoint"


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
    """Holds both surrogates, the cached clean latents and δ1; runs the three ADFT stages.

    The comparison methods (``dladiff.methods``) subclass it and override the hooks
    :meth:`pgd_phases`, :meth:`step_size`, :meth:`before_epoch`, :meth:`after_training` and
    :meth:`extra_state`; with EOT on (``eot.enabled``) every PGD gradient passes through a random
    differentiable JPEG/resize/blur of x + δ1.
    """

    name = "dladiff"

    def __init__(self, x: torch.Tensor, components: SDComponents, static_unet, cfg: Config, device: torch.device):
        self.cfg, self.l1, self.device = cfg, cfg.layer1, device
        self.precision = cfg.runtime.precision
        vae_dtype = frozen_dtype(device, self.precision)
        self.vae = components.vae if components.vae.dtype == vae_dtype else components.vae.to(dtype=vae_dtype)
        self.scheduler = components.noise_scheduler
        self.unet_d = components.unet
        self.static_unet = static_unet
        self.x = x.to(device, torch.float32)
        self.delta = torch.zeros_like(self.x)
        self.generator = torch.Generator("cpu").manual_seed(cfg.runtime.seed)
        self.text = encode_prompt(components, cfg.prompt.instance, device)
        components.text_encoder.to("cpu")  # frozen and no longer needed on the GPU: the prompt states are cached
        self.latent_side = cfg.model.resolution // components.vae_scale_factor
        self.latent_shape = (components.unet.config.in_channels, self.latent_side, self.latent_side)
        self.clean = encode_images(self.vae, self.x, self.text, self.l1.batch_size, device, self.precision)
        self.static_store, self.dynamic_store = AttentionStore(enabled=False), AttentionStore(enabled=False)
        if self.l1.dsur and self.l1.stage1_steps:
            self._install_capture(components)
        if cfg.runtime.gradient_checkpointing:
            self.vae.enable_gradient_checkpointing()
            self.unet_d.enable_gradient_checkpointing()
        self.trainer = self._make_trainer() if self.l1.adft and self.l1.stage3_steps else None
        if self.trainer is None:
            self.unet_d.requires_grad_(False)
        self.epoch = 0
        self.history: list[dict] = []

    def _install_capture(self, components: SDComponents) -> None:
        if self.static_unet is None:
            raise DladiffError("stage 1 (DSUR) needs a static surrogate; give --surrogate or set layer1.dsur: false")
        att = self.l1.attention
        tokens = token_positions(components.tokenizer, self.cfg.prompt.instance, self.cfg.prompt.trigger) if att.cross_tokens == "trigger" else None
        install_capture(self.static_unet, self.static_store, att.resolutions, self.latent_side, tokens)
        install_capture(self.unet_d, self.dynamic_store, att.resolutions, self.latent_side, tokens)

    def _make_trainer(self) -> DreamBoothTrainer:
        return DreamBoothTrainer(self.unet_d, self.vae, self.scheduler, self.l1.stage3_learning_rate, device=self.device,
                                 precision=self.precision, gradient_checkpointing=self.cfg.runtime.gradient_checkpointing)

    def _chunks(self):
        return torch.arange(self.x.shape[0], device=self.device).split(self.l1.batch_size)

    def _draw(self, batch: int):
        return draw_noise(batch, self.latent_shape, self.scheduler.config.num_train_timesteps, self.generator, self.device)

    def perturbed_pixels(self, idx: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """x + δ1 of the chunk, through a random differentiable JPEG/resize/blur when ``eot.enabled``."""
        pixels = self.x[idx] + delta
        return eot_transform(pixels, self.generator, self.cfg.eot) if self.cfg.eot.enabled else pixels

    def _perturbed_latents(self, delta: torch.Tensor, idx: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        mean, std = latent_distribution(self.vae, self.perturbed_pixels(idx, delta).to(self.vae.dtype))
        return sample_latents(self.vae, mean.float(), std.float(), xi)

    @torch.no_grad()
    def _static_maps(self, idx: torch.Tensor, draw) -> None:
        """θs's maps of the clean images for this draw (no grad: the "ideal" fine-tuned attention)."""
        latents = sample_latents(self.vae, self.clean.mean[idx], self.clean.std[idx], draw.latent_noise)
        noisy = self.scheduler.add_noise(latents, draw.noise, draw.timesteps)
        self.static_unet(noisy.to(self.static_unet.dtype), draw.timesteps, encoder_hidden_states=self.text.expand(len(idx), -1, -1))

    @contextlib.contextmanager
    def capturing(self, *stores: AttentionStore):
        """Record attention maps into ``stores`` inside the block, then drop them.

        Reentrant (an inner block leaves stores enabled by an outer one alone). PGD steps keep the
        stores enabled through the backward pass, so that gradient checkpointing recomputes the
        same (capturing) attention as the forward pass did.
        """
        opened = [s for s in stores if not s.enabled]
        for store in opened:
            store.enabled = True
        try:
            yield
        finally:
            for store in opened:
                store.enabled = False
                store.clear()

    def attention_loss_on(self, idx: torch.Tensor, delta: torch.Tensor, draw) -> torch.Tensor:
        """L_attn (Eq. 8) of the chunk ``idx`` with perturbation ``delta`` (differentiable in delta)."""
        att = self.l1.attention
        with self.capturing(self.static_store, self.dynamic_store), autocast(self.device, self.precision):
            self._static_maps(idx, draw)
            latents = self._perturbed_latents(delta, idx, draw.latent_noise)
            noisy = self.scheduler.add_noise(latents, draw.noise, draw.timesteps)
            self.unet_d(noisy, draw.timesteps, encoder_hidden_states=self.text.expand(len(idx), -1, -1))
            return attention_loss(self.static_store, self.dynamic_store, att.cross_weight, att.self_weight)

    def denoising_loss_on(self, idx: torch.Tensor, delta: torch.Tensor, draw) -> torch.Tensor:
        """θd's denoising loss (Eq. 3) of the chunk ``idx`` with perturbation ``delta``."""
        with autocast(self.device, self.precision):
            latents = self._perturbed_latents(delta, idx, draw.latent_noise)
            return denoising_loss(self.unet_d, self.scheduler, latents, self.text, draw)

    def step_size(self, draw) -> float | torch.Tensor:
        """α1 for this draw: a number, or ``(B, 1, 1, 1)`` per image (methods with schedules override it)."""
        return self.l1.step_size

    @contextlib.contextmanager
    def weights_frozen(self):
        """θd's trained weights without ``requires_grad`` inside the block (gradients w.r.t. δ or e only).

        Autograd then keeps no activations for weight gradients; stage 3 gets them back afterwards.
        """
        trained = [p for p in self.unet_d.parameters() if p.requires_grad]
        for p in trained:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in trained:
                p.requires_grad_(True)

    def _pgd_step(self, loss_fn, stores: tuple[AttentionStore, ...] = ()) -> float:
        """One PGD ascent step over all images (chunk by chunk); returns the mean loss before it.

        ``stores``: the attention stores ``loss_fn`` reads, kept capturing through the backward pass.
        """
        losses = []
        for idx in self._chunks():
            delta = self.delta[idx].clone().requires_grad_(True)
            draw = self._draw(len(idx))
            with self.capturing(*stores), self.weights_frozen():
                loss = loss_fn(idx, delta, draw)
                (grad,) = torch.autograd.grad(loss, delta)
            self.delta[idx] = pgd_update(self.delta[idx], grad, self.x[idx], self.step_size(draw), self.l1.epsilon, ascent=True)
            losses.append(float(loss.detach()))
        return sum(losses) / len(losses)

    def stage1_step(self) -> float:
        """Stage 1: δ1 ← Π(δ1 + α1·sign(∇ L_attn)); returns L_attn before the step."""
        return self._pgd_step(self.attention_loss_on, (self.static_store, self.dynamic_store))

    def stage2_step(self) -> float:
        """Stage 2: δ1 ← Π(δ1 + α1·sign(∇ L_denoise(θd))); returns the loss before the step."""
        return self._pgd_step(self.denoising_loss_on)

    def perturbed_latent_set(self) -> LatentSet:
        """VAE posteriors of x + δ1, encoded once without grad (no gradient reaches the pixels)."""
        return encode_images(self.vae, self.x + self.delta, self.text, self.l1.batch_size, self.device, self.precision)

    def stage3_step(self, data: LatentSet) -> float:
        """Stage 3: one AdamW step of θd minimizing the denoising loss on x + δ1."""
        return self.trainer.step(data, self.l1.batch_size, self.generator)

    def pgd_phases(self) -> list[tuple[str, int, Callable[[], float]]]:
        """The PGD phases of one epoch as ``(history key, steps, step function)``: stages 1 and 2."""
        return [("attn", self.l1.stage1_steps if self.l1.dsur else 0, self.stage1_step),
                ("denoise", self.l1.stage2_steps, self.stage2_step)]

    def before_epoch(self) -> dict:
        """Work before the PGD phases (methods override it); returns history entries."""
        return {}

    def after_training(self) -> dict:
        """Work after θd's training steps (methods override it); returns history entries."""
        return {}

    def run_epoch(self, bar=None) -> dict:
        """One epoch (Eq. 9): the PGD phases, then stage 3; returns the mean loss of each."""
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

    def _tick(self, bar, key: str, value: float) -> None:
        if bar is not None:
            bar.set_description(f"layer 1 epoch {self.epoch + 1}/{self.l1.epochs} [{key}]")
            bar.set_postfix({key: f"{value:.4g}"}, refresh=False)
            bar.update(1)

    def steps_per_epoch(self) -> int:
        pgd = sum(steps for _, steps, _ in self.pgd_phases())
        return pgd + (self.l1.stage3_steps if self.trainer else 0)

    def extra_state(self) -> dict:
        """State besides δ1, θd and the generator that a resumed run needs (methods override it).

        Tensors and plain data only (:mod:`dladiff.state_io`); the keys must not clash with :meth:`state`'s.
        """
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restore what :meth:`extra_state` saved."""

    def state(self, fingerprint: str) -> dict:
        """Everything a resumed run needs to continue exactly where this one is."""
        state = {"fingerprint": fingerprint, "epoch": self.epoch, "delta": self.delta.cpu(),
                 "generator": self.generator.get_state(), "history": self.history}
        if self.trainer is not None:
            state["unet_d"] = self.unet_d.state_dict()
            state["optimizer"] = self.trainer.optimizer.state_dict()
        return {**state, **self.extra_state()}

    def load_state(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self.delta = state["delta"].to(self.device)
        self.generator.set_state(state["generator"])
        self.history = list(state["history"])
        if self.trainer is not None:
            self.unet_d.load_state_dict(state["unet_d"])
            self.trainer.optimizer.load_state_dict(state["optimizer"])
        self.load_extra_state(state)


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


def run_layer1(x: torch.Tensor, components: SDComponents, static_unet, cfg: Config, device: torch.device,
               run_dir: Path, fingerprint: str, resume: bool = False, quiet: bool = False,
               stop: StopRequest | None = None) -> Layer1Result:
    """Optimize δ1 for the images ``x`` ``(N, 3, R, R)`` with DSUR + ADFT; checkpoints into ``run_dir``."""
    protector = ADFTProtector(x, components, static_unet, cfg, device)
    return run_protector(protector, cfg, run_dir, fingerprint, resume, quiet, stop)


def run_protector(protector: ADFTProtector, cfg: Config, run_dir: Path, fingerprint: str, resume: bool = False,
                  quiet: bool = False, stop: StopRequest | None = None) -> Layer1Result:
    """Run ``protector`` for ``layer1.epochs`` epochs, checkpointing every ``checkpoint_every``.

    With ``resume`` the run continues from the checkpoint (same result as uninterrupted). When
    ``stop`` is requested (first Ctrl-C) the current epoch finishes, a checkpoint is written and
    :class:`~dladiff.runtime.Interrupted` is raised.
    """
    name = protector.name
    if resume:
        state = load_checkpoint(run_dir, fingerprint)
        if state is not None:
            protector.load_state(state)
            log.info("resuming layer 1 (%s) at epoch %d/%d", name, protector.epoch, cfg.layer1.epochs)
    stop = stop or StopRequest()
    epochs = cfg.layer1.epochs
    bar = progress(epochs * protector.steps_per_epoch(), f"layer 1 ({name})", quiet)
    bar.update(protector.epoch * protector.steps_per_epoch())
    try:
        while protector.epoch < epochs:
            protector.run_epoch(bar)
            last = protector.epoch == epochs
            if last or stop.requested or protector.epoch % cfg.layer1.checkpoint_every == 0:
                save_checkpoint(protector.state(fingerprint), run_dir)
            if stop.requested and not last:
                raise Interrupted(f"stopped after layer-1 epoch {protector.epoch}/{epochs} ({name}); a checkpoint "
                                  f"is in {run_dir}; rerun the same command with --resume to continue")
    finally:
        bar.close()
    return Layer1Result(protector.delta.detach().cpu(), protector.history)
