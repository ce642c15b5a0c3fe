"""What layer 1 reads and never checkpoints: the frozen VAE, the scheduler, both surrogates, the photos.

:class:`Layer1Models` holds the VAE (cast once to the frozen dtype), the noise scheduler, the dynamic
surrogate θd (the pretrained UNet that stage 3 trains; ``None`` for a method that never reads it,
e.g. FSMG), the static surrogate θs (Eq. 7; ``None`` unless the method reads it, always frozen), the
clean latents' VAE posteriors ``(N, 4, h, w)`` and the two attention stores of stage 1.
:class:`Batch` is the photos ``x`` ``(N, 3, R, R)`` in [-1, 1] cut into chunks of ``layer1.batch_size``;
a :class:`Chunk` is one of them with its perturbation and noise draw, what every PGD loss reads.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from dladiff.config import Config, EOTConfig
from dladiff.diffusion.finetune import LatentSet, encode_images
from dladiff.diffusion.loss import NoiseDraw, draw_noise, latent_distribution, sample_latents
from dladiff.eot import eot_transform
from dladiff.runtime import frozen_dtype

if TYPE_CHECKING:
    from dladiff.diffusion.attention import AttentionStore
    from dladiff.diffusion.loading import SDComponents


@dataclass
class Batch:
    """The photos ``x`` ``(N, 3, R, R)`` in [-1, 1] on the device, processed ``size`` at a time."""

    x: torch.Tensor
    size: int

    def chunks(self) -> tuple[torch.Tensor, ...]:
        """Index tensors of the chunks, in order."""
        return torch.arange(self.x.shape[0], device=self.x.device).split(self.size)


@dataclass
class Chunk:
    """One chunk of a PGD step: indices ``idx`` (B,), clean ``x`` and ``delta`` (B, 3, R, R), the noise draw."""

    idx: torch.Tensor
    x: torch.Tensor
    delta: torch.Tensor
    draw: NoiseDraw


@dataclass
class Layer1Models:
    """The models and cached data of a layer-1 run (see the module docstring)."""

    vae: torch.nn.Module
    scheduler: object
    dynamic: torch.nn.Module | None
    static: torch.nn.Module | None
    clean: LatentSet
    latent_shape: tuple[int, int, int]
    device: torch.device
    precision: str
    eot: EOTConfig
    static_store: AttentionStore = field(default_factory=lambda: disabled_store())
    dynamic_store: AttentionStore = field(default_factory=lambda: disabled_store())

    @property
    def latent_side(self) -> int:
        return self.latent_shape[-1]

    def draw(self, batch: int, generator: torch.Generator) -> NoiseDraw:
        """t, ε, ξ for ``batch`` images from the run's CPU generator."""
        return draw_noise(batch, self.latent_shape, self.scheduler.config.num_train_timesteps, generator, self.device)

    def perturbed_latents(self, chunk: Chunk, generator: torch.Generator) -> torch.Tensor:
        """z0 of x + δ (differentiable in δ), through a random differentiable JPEG/resize/blur when ``eot.on(1)``."""
        pixels = chunk.x + chunk.delta
        if self.eot.on(1):
            pixels = eot_transform(pixels, generator, self.eot)
        mean, std = latent_distribution(self.vae, pixels.to(self.vae.dtype))
        return sample_latents(self.vae, mean.float(), std.float(), chunk.draw.latent_noise)

    def encode(self, images: torch.Tensor, text: torch.Tensor, batch_size: int) -> LatentSet:
        """VAE posteriors of ``images``, once, without grad."""
        return encode_images(self.vae, images, text, batch_size, self.device, self.precision)

    @contextlib.contextmanager
    def dynamic_frozen(self):
        """θd's trained weights without ``requires_grad`` inside the block (gradients w.r.t. δ or e only).

        Autograd then keeps no activations for weight gradients; stage 3 gets them back afterwards.
        """
        trained = [p for p in self.dynamic.parameters() if p.requires_grad] if self.dynamic is not None else []
        for p in trained:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in trained:
                p.requires_grad_(True)


def disabled_store() -> AttentionStore:
    """An empty attention store that records nothing until :func:`capturing` opens it."""
    from dladiff.diffusion.attention import AttentionStore

    return AttentionStore(enabled=False)


@contextlib.contextmanager
def capturing(*stores: AttentionStore):
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


def load_models(x: torch.Tensor, components: SDComponents, static_unet, cfg: Config, device: torch.device,
                use_pretrained: bool) -> tuple[Layer1Models, torch.Tensor]:
    """The models of a run and the instance prompt's text states ``(1, 77, D)``.

    The text encoder goes back to the CPU once the prompt is encoded (frozen, states cached). θd is
    ``components.unet`` when ``use_pretrained``, else ``None``; θs never requires grad.
    """
    from dladiff.diffusion.loading import encode_prompt

    vae_dtype = frozen_dtype(device, cfg.runtime.precision)
    vae = components.vae if components.vae.dtype == vae_dtype else components.vae.to(dtype=vae_dtype)
    text = encode_prompt(components, cfg.prompt.instance, device)
    components.text_encoder.to("cpu")
    dynamic = components.unet if use_pretrained else None
    if static_unet is not None:
        static_unet.requires_grad_(False)
    side = cfg.model.resolution // components.vae_scale_factor
    channels = (dynamic if dynamic is not None else static_unet).config.in_channels
    clean = encode_images(vae, x, text, cfg.layer1.batch_size, device, cfg.runtime.precision)
    models = Layer1Models(vae, components.noise_scheduler, dynamic, static_unet, clean, (channels, side, side), device,
                          cfg.runtime.precision, cfg.eot)
    return models, text
