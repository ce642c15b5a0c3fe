"""Static surrogate θs: DreamBooth of the UNet only on clean photos of the identity (paper Eq. 7).

The text encoder stays frozen; the prior-preservation term of Eq. 4 is optional (off by default,
as in the paper). The result is written in diffusers layout (``unet/`` with safetensors) together
with ``surrogate.json`` recording what produced it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from pathlib import Path

import numpy as np
import torch

from dladiff import __version__
from dladiff.config import Config, config_to_dict
from dladiff.data import Portrait, model_batch, save_json
from dladiff.diffusion.finetune import DreamBoothTrainer, LatentSet, encode_images
from dladiff.diffusion.loading import SDComponents, encode_prompt, load_unet
from dladiff.runtime import progress

log = logging.getLogger("dladiff")

RECORD = "surrogate.json"


def surrogate_record(portraits: list[Portrait], cfg: Config) -> dict:
    """What determines a surrogate: base model, training settings, seed and the image hashes."""
    return {
        "base_model": cfg.model.id,
        "revision": cfg.model.revision,
        "resolution": cfg.model.resolution,
        "prompt": cfg.prompt.instance,
        "seed": cfg.runtime.seed,
        "surrogate": config_to_dict(cfg.surrogate),
        "images": {p.name: p.sha256 for p in portraits},
    }


def is_complete_surrogate(folder: Path, expected: dict | None = None) -> bool:
    """True if ``folder`` holds a finished surrogate (and, if given, one made with ``expected``)."""
    record = Path(folder) / RECORD
    if not record.is_file() or not (Path(folder) / "unet" / "config.json").is_file():
        return False
    if expected is None:
        return True
    made = json.loads(record.read_text(encoding="utf-8"))
    return all(made.get(k) == v for k, v in expected.items())


@torch.no_grad()
def generate_class_images(components: SDComponents, cfg: Config, folder: Path, device, quiet: bool) -> list[np.ndarray]:
    """Class images for prior preservation, generated once by the base model and cached as PNG."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    count = cfg.surrogate.num_class_images
    existing = sorted(folder.glob("class_*.png"))
    if len(existing) < count:
        pipe = StableDiffusionPipeline(
            vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
            unet=components.unet, scheduler=DDIMScheduler.from_config(components.noise_scheduler.config),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator("cpu").manual_seed(cfg.runtime.seed + 1)
        bar = progress(count - len(existing), "class images", quiet)
        for i in range(len(existing), count):
            image = pipe(cfg.prompt.class_prompt, num_inference_steps=cfg.surrogate.class_inference_steps,
                         guidance_scale=cfg.surrogate.class_guidance_scale, height=cfg.model.resolution,
                         width=cfg.model.resolution, generator=generator).images[0]
            tmp = folder / f".class_{i:04d}.png.tmp"
            image.save(tmp, format="PNG")
            os.replace(tmp, folder / f"class_{i:04d}.png")
            bar.update(1)
        bar.close()
    return [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("class_*.png"))[:count]]


def _class_latents(components: SDComponents, cfg: Config, out_dir: Path, device, quiet: bool) -> LatentSet:
    from dladiff.data import resize, to_tensor

    images = generate_class_images(components, cfg, out_dir / "class_images", device, quiet)
    batch = torch.cat([resize(to_tensor(im), (cfg.model.resolution,) * 2) for im in images])
    text = encode_prompt(components, cfg.prompt.class_prompt, device)
    return encode_images(components.vae, batch, text, cfg.layer1.batch_size, device, cfg.runtime.precision)


def finetune_surrogate(portraits: list[Portrait], components: SDComponents, cfg: Config, out_dir: Path,
                       device: torch.device, quiet: bool = False) -> Path:
    """Train θs on ``portraits`` and write it to ``out_dir`` (diffusers layout + ``surrogate.json``).

    ``components.unet`` is left untouched: training runs on a fresh copy read from the model
    folder, so the pretrained UNet stays available as the dynamic surrogate's start.
    """
    out_dir = Path(out_dir)
    record = surrogate_record(portraits, cfg)
    if is_complete_surrogate(out_dir, record):
        log.info("static surrogate in %s is up to date; reusing it", out_dir)
        return out_dir
    generator = torch.Generator("cpu").manual_seed(cfg.runtime.seed)
    text = encode_prompt(components, cfg.prompt.instance, device)
    instance = encode_images(components.vae, model_batch(portraits, cfg.model.resolution), text,
                             cfg.layer1.batch_size, device, cfg.runtime.precision)
    prior = _class_latents(components, cfg, out_dir, device, quiet) if cfg.surrogate.prior_preservation else None
    unet = load_unet(components.folder, device)
    trainer = DreamBoothTrainer(unet, components.vae, components.noise_scheduler, cfg.surrogate.learning_rate,
                                cfg.surrogate.adam_weight_decay, cfg.surrogate.max_grad_norm, device,
                                cfg.runtime.precision, cfg.runtime.gradient_checkpointing)
    bar = progress(cfg.surrogate.steps, "static surrogate (DreamBooth)", quiet)
    for _ in range(cfg.surrogate.steps):
        loss = trainer.step(instance, cfg.surrogate.batch_size, generator, prior, cfg.surrogate.prior_weight)
        bar.set_postfix(loss=f"{loss:.4f}")
        bar.update(1)
    bar.close()
    _write_surrogate(unet, {**record, "dladiff_version": __version__, "final_loss": loss if cfg.surrogate.steps else None}, out_dir)
    return out_dir


def _write_surrogate(unet, record: dict, out_dir: Path) -> None:
    """Save the UNet and its record into ``out_dir`` atomically (temporary folder, then rename)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".unet.{secrets.token_hex(6)}"
    tmp.mkdir()  # mode 0o777 less the umask, like any folder (mkdtemp would make it private)
    try:
        unet.save_pretrained(tmp, safe_serialization=True)
        if (out_dir / "unet").exists():
            shutil.rmtree(out_dir / "unet")
        os.replace(tmp, out_dir / "unet")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    save_json(record, out_dir / RECORD)


def load_static_surrogate(folder: Path, device: torch.device, precision: str) -> torch.nn.Module:
    """θs for protection: frozen, stored in the autocast dtype on CUDA (it is never trained)."""
    from dladiff.runtime import frozen_dtype

    return load_unet(folder, device, frozen_dtype(device, precision))
