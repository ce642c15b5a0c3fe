"""What every attack receives and returns; the attacks themselves are one module each.

* :mod:`dladiff.evaluate.dreambooth` — DreamBooth fine-tuning (paper Eq. 4, Table 1, Table 3 on another model)
* :mod:`dladiff.evaluate.lora` — LoRA fine-tuning (paper Table 2)
* :mod:`dladiff.evaluate.faceid` — IP-Adapter FaceID, zero-shot (paper Table 4)
* :mod:`dladiff.evaluate.instantid` — InstantID, zero-shot (paper Table 4)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from dladiff.data import Portrait
from dladiff.evaluate.cache import prompt_slug
from dladiff.evaluate.config import EvaluateConfig

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
