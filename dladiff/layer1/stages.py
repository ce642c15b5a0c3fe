"""The three ADFT stages (paper Eq. 9) as functions of (models, state, batch).

* stage 1 — :func:`attention_loss` (Eq. 8): attention maps of the clean image under the static
  surrogate θs vs maps of x + δ1 under the dynamic surrogate θd, for the same (t, ε) draw;
* stage 2 — :func:`denoising_loss` (Eq. 3) of θd on x + δ1;
* stage 3 — :func:`train_step`: one AdamW step of θd minimizing the denoising loss on x + δ1.

A PGD loss takes ``(models, state, chunk)`` and returns a scalar differentiable in ``chunk.delta``;
:func:`pgd_step` applies δ1 ← Π(δ1 + α1·sign(∇δ1 L)) chunk by chunk, Π clipping δ1 to [−η1, η1] and
x + δ1 to [−1, 1]. During PGD θd's weights do not require grad: autograd keeps no activations for
weight gradients that nothing uses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Union

import torch

from dladiff.config import Config
from dladiff.diffusion import loss
from dladiff.diffusion.finetune import DreamBoothTrainer, LatentSet
from dladiff.layer1.models import Batch, Chunk, Layer1Models, capturing
from dladiff.layer1.state import RunState
from dladiff.pgd import pgd_update
from dladiff.runtime import autocast

if TYPE_CHECKING:
    from dladiff.diffusion.attention import AttentionStore

StepSize = Union[float, torch.Tensor]
PGDLoss = Callable[[Layer1Models, RunState, Chunk], torch.Tensor]
StepSizeRule = Callable[[Layer1Models, RunState, Chunk], StepSize]


def install_attention_capture(models: Layer1Models, tokenizer, cfg: Config) -> None:
    """Stage 1's capture: θs and θd record the maps at ``layer1.attention.resolutions`` into their stores."""
    from dladiff.diffusion.attention import install_capture
    from dladiff.diffusion.loading import token_positions

    att = cfg.layer1.attention
    tokens = token_positions(tokenizer, cfg.prompt.instance, cfg.prompt.trigger) if att.cross_tokens == "trigger" else None
    install_capture(models.static, models.static_store, att.resolutions, models.latent_side, tokens)
    install_capture(models.dynamic, models.dynamic_store, att.resolutions, models.latent_side, tokens)


@torch.no_grad()
def _static_maps(models: Layer1Models, state: RunState, chunk: Chunk) -> None:
    """θs's maps of the clean images for this draw (no grad: the "ideal" fine-tuned attention)."""
    draw, idx = chunk.draw, chunk.idx
    latents = loss.sample_latents(models.vae, models.clean.mean[idx], models.clean.std[idx], draw.latent_noise)
    noisy = models.scheduler.add_noise(latents, draw.noise, draw.timesteps)
    models.static(noisy.to(models.static.dtype), draw.timesteps, encoder_hidden_states=state.text.expand(len(idx), -1, -1))


def attention_loss(models: Layer1Models, state: RunState, chunk: Chunk, cross_weight: float = 1.0,
                   self_weight: float = 1.0) -> torch.Tensor:
    """Stage 1's L_attn (Eq. 8) of ``chunk``: θs's maps of x vs θd's maps of x + δ1 (differentiable in δ1)."""
    from dladiff.diffusion import attention

    with capturing(models.static_store, models.dynamic_store), autocast(models.device, models.precision):
        _static_maps(models, state, chunk)
        latents = models.perturbed_latents(chunk, state.generator)
        noisy = models.scheduler.add_noise(latents, chunk.draw.noise, chunk.draw.timesteps)
        models.dynamic(noisy, chunk.draw.timesteps, encoder_hidden_states=state.text.expand(len(chunk.idx), -1, -1))
        return attention.attention_loss(models.static_store, models.dynamic_store, cross_weight, self_weight)


def denoising_loss(models: Layer1Models, state: RunState, chunk: Chunk, unet=None) -> torch.Tensor:
    """Stage 2's loss: the denoising loss (Eq. 3) of ``unet`` (default θd) on x + δ1 of ``chunk``."""
    with autocast(models.device, models.precision):
        latents = models.perturbed_latents(chunk, state.generator)
        return loss.denoising_loss(unet if unet is not None else models.dynamic, models.scheduler, latents, state.text,
                                   chunk.draw)


def pgd_step(models: Layer1Models, state: RunState, batch: Batch, loss_fn: PGDLoss, step_size: StepSizeRule,
             epsilon: float, stores: tuple[AttentionStore, ...] = ()) -> float:
    """One PGD ascent step δ ← Π_η(δ + α·sign(∇δ L)) over all images, chunk by chunk; the mean loss before it.

    ``stores``: the attention stores ``loss_fn`` reads, kept capturing through the backward pass.
    """
    losses = []
    for idx in batch.chunks():
        delta = state.delta[idx].clone().requires_grad_(True)
        chunk = Chunk(idx, batch.x[idx], delta, models.draw(len(idx), state.generator))
        with capturing(*stores), models.dynamic_frozen():
            value = loss_fn(models, state, chunk)
            (grad,) = torch.autograd.grad(value, delta)
        state.delta[idx] = pgd_update(state.delta[idx], grad, batch.x[idx], step_size(models, state, chunk), epsilon,
                                      ascent=True)
        losses.append(float(value.detach()))
    return sum(losses) / len(losses)


def perturbed_latent_set(models: Layer1Models, state: RunState, batch: Batch) -> LatentSet:
    """VAE posteriors of x + δ1 with the current text states, encoded once without grad (stage 3's data)."""
    return models.encode(batch.x + state.delta, state.text, batch.size)


def make_trainer(models: Layer1Models, cfg: Config) -> DreamBoothTrainer:
    """Stage 3's AdamW on θd at ``layer1.stage3_learning_rate`` (fp32 masters)."""
    return DreamBoothTrainer(models.dynamic, models.vae, models.scheduler, cfg.layer1.stage3_learning_rate,
                             device=models.device, precision=models.precision,
                             gradient_checkpointing=cfg.runtime.gradient_checkpointing)


def train_step(state: RunState, data: LatentSet, batch_size: int) -> float:
    """Stage 3: one AdamW step of θd minimizing the denoising loss on ``data`` (x + δ1); returns the loss."""
    return state.trainer.step(data, batch_size, state.generator)
