"""What every attack receives and returns; the attacks themselves are one module each.

* :mod:`dladiff.evaluate.dreambooth` — DreamBooth fine-tuning (paper Eq. 4, Table 1, Table 3 on another model)
* :mod:`dladiff.evaluate.lora` — LoRA fine-tuning (paper Table 2)
* :mod:`dladiff.evaluate.faceid` — IP-Adapter FaceID, zero-shot (paper Table 4)
* :mod:`dladiff.evaluate.instantid` — InstantID, zero-shot (paper Table 4)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from dladiff.data import Portrait
from dladiff.evaluate.cache import finish_attack, is_done, prompt_slug, start_attack
from dladiff.evaluate.config import EvaluateConfig, fingerprint, plain_settings
from dladiff.evaluate.generation import generate_to_folder

Status = Literal["generated", "cached", "skipped"]


@dataclass(frozen=True)
class AttackContext:
    """One identity's attack: the photos the attacker holds, where outputs go, the settings."""

    identity: str
    photos: list[Portrait]
    attack_dir: Path
    eval_dir: Path
    cfg: EvaluateConfig
    device: torch.device
    quiet: bool = False

    def prompt_dir(self, prompt: str) -> Path:
        return self.attack_dir / prompt_slug(prompt)


@dataclass
class AttackResult:
    """Outcome of one attack on one identity: the folder of images of each prompt, or why none."""

    attack: str
    status: Status
    prompts: dict[str, Path] = field(default_factory=dict)
    reason: str | None = None
    info: dict = field(default_factory=dict)
    fingerprint: str | None = None


def photo_hashes(photos: list[Portrait]) -> dict[str, str]:
    """What the attacker was given: file name -> SHA-256."""
    return {p.name: p.sha256 for p in photos}


def zero_shot_settings(name: str, ctx: AttackContext) -> dict:
    """Everything that determines a zero-shot attack's images (FaceID, InstantID)."""
    cfg = ctx.cfg
    return {"attack": name, "section": getattr(cfg, name), "images_per_prompt": cfg.generation.images_per_prompt,
            "seed": cfg.generation.seed, "scheduler": cfg.generation.scheduler, "precision": cfg.runtime.precision,
            "model_root": cfg.metrics.model_root, "photos": photo_hashes(ctx.photos)}


def zero_shot_embedder(name: str, ctx: AttackContext):
    """The detector + identity encoder a zero-shot adapter reads faces with (its config section names them)."""
    from dladiff.evaluate.embedding import load_face_embedder

    section = getattr(ctx.cfg, name)
    return load_face_embedder(section.detector, section.encoder, ctx.cfg.metrics.model_root, ctx.cfg.metrics.det_size)


References = Callable[[AttackContext, Any], tuple[Sequence, list[str], list[str]]]


def run_zero_shot(name: str, ctx: AttackContext, references: References, load_pipeline: Callable[[Sequence], Any],
                  sampler: Callable[[Any, str, Any], Callable]) -> AttackResult:
    """A zero-shot attack (FaceID, InstantID): every prompt sampled ``images_per_prompt`` times, the images
    spread over the protected photos' faces.

    Shared frame: the settings' fingerprint (a finished run with the same one is reused), the adapter's
    own detector + encoder reading each photo (``references(ctx, embedder)`` → (per-face references,
    photos used, photos without a face)), skipped with a reason when no photo has a face,
    ``load_pipeline(refs)``, then per prompt and reference ``sampler(pipe, prompt, ref)``, the
    callable :func:`~dladiff.evaluate.generation.generate_to_folder` draws the images with.
    """
    section, gen = getattr(ctx.cfg, name), ctx.cfg.generation
    settings = zero_shot_settings(name, ctx)
    key = fingerprint(settings)
    prompts = {p: ctx.prompt_dir(p) for p in section.prompts}
    if is_done(ctx.attack_dir, key):
        return AttackResult(name, "cached", prompts, fingerprint=key)
    embedder = zero_shot_embedder(name, ctx)
    refs, used, no_face = references(ctx, embedder)
    info = {"reference_photos": used, "photos_without_face": no_face}
    if not refs:
        return AttackResult(name, "skipped", {}, f"no face found by {embedder.name} in any attacked photo", info)
    pipe = load_pipeline(refs)
    start_attack(ctx.attack_dir, key, plain_settings(settings))
    for prompt in section.prompts:
        for j, ref in enumerate(refs):
            generate_to_folder(sampler(pipe, prompt, ref), list(range(j, gen.images_per_prompt, len(refs))), gen.seed,
                               prompts[prompt], gen.batch_size, f"{ctx.identity}: {name} images", ctx.quiet)
    finish_attack(ctx.attack_dir, key, {"attack": name, "model": section.base_model, **info})
    return AttackResult(name, "generated", prompts, info=info, fingerprint=key)
