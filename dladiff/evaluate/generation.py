"""Sampling from an attacked model with fixed seeds (paper Appendix 7.3: 20 images per identity).

Image k of a prompt always starts from the noise of ``torch.Generator("cpu").manual_seed(seed + k)``,
whatever the batch size, and the default sampler (DDIM, eta 0) is deterministic, so a rerun draws
the same images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dladiff.evaluate.cache import save_generated
from dladiff.runtime import progress

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "dpm-solver": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
}


def make_scheduler(name: str, scheduler_config):
    """A diffusers sampler named in the config, built from the model's scheduler config ("model": as is)."""
    import diffusers

    if name == "model":
        return None
    return getattr(diffusers, SCHEDULERS[name]).from_config(scheduler_config)


def build_sd_pipeline(components, unet, text_encoder, scheduler_name: str, device: torch.device, dtype: torch.dtype):
    """A ``StableDiffusionPipeline`` around (possibly fine-tuned) components, no safety checker.

    The modules are put in eval mode and cast to ``dtype`` on ``device``: after training, the fp32
    masters are no longer needed.
    """
    from diffusers import StableDiffusionPipeline

    scheduler = make_scheduler(scheduler_name, components.noise_scheduler.config) or components.noise_scheduler
    for module in (unet, text_encoder, components.vae):
        module.requires_grad_(False).eval().to(device=device, dtype=dtype)
    pipe = StableDiffusionPipeline(
        vae=components.vae, text_encoder=text_encoder, tokenizer=components.tokenizer, unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seed_generators(seed: int, indices: list[int]) -> list[torch.Generator]:
    """One CPU generator per image: image k is drawn with ``seed + k``."""
    return [torch.Generator("cpu").manual_seed(seed + k) for k in indices]


def to_uint8(images) -> list[np.ndarray]:
    """PIL images or float arrays in [0, 1] from a pipeline -> ``(H, W, 3) uint8`` arrays."""
    out = []
    for image in images:
        array = np.asarray(image)
        if array.dtype != np.uint8:
            array = np.clip(np.round(array * 255.0), 0, 255).astype(np.uint8)
        out.append(array[..., :3])
    return out


def chunks(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def generate_to_folder(sample: Callable[[list[torch.Generator]], list[np.ndarray]], indices: list[int], seed: int,
                       folder: Path, batch_size: int, desc: str, quiet: bool) -> None:
    """Draw images ``indices`` in batches with ``sample(generators)`` and save them as ``NNNN.png``."""
    bar = progress(len(indices), desc, quiet)
    for batch in chunks(indices, batch_size):
        images = sample(seed_generators(seed, batch))
        for k, image in zip(batch, images):
            save_generated([image], folder, k)
        bar.update(len(batch))
    bar.close()


def text_to_image_sampler(pipe, prompt: str, negative_prompt: str, steps: int, guidance: float, resolution: int, **extra):
    """``sample(generators)`` for a text-to-image pipeline: one image per generator."""

    def sample(generators: list[torch.Generator]) -> list[np.ndarray]:
        with torch.no_grad():
            result = pipe(prompt, negative_prompt=negative_prompt or None, num_inference_steps=steps,
                          guidance_scale=guidance, height=resolution, width=resolution,
                          num_images_per_prompt=len(generators), generator=generators, **extra)
        return to_uint8(result.images)

    return sample
