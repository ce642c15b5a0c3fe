"""Method-specific numbers of the comparison methods (the ``method:`` config section).

The shared budget — η (``layer1.epsilon``), α (``layer1.step_size``), E (``layer1.epochs``) and
n1 + n2 PGD steps per epoch — comes from ``layer1`` for every method; only what a method adds
(loss weights, target pattern, schedules) lives here. Until ``config.py`` has a ``method`` section,
:func:`method_config` returns these defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

MethodName = Literal["dladiff", "aspl", "fsmg", "mist", "anti-diffusion", "disdiff"]


@dataclass(frozen=True)
class MistConfig:
    """MIST's fused loss w_sem·L_denoise − w_tex·mean‖z(x+δ) − z(target)‖² (ascent)."""

    semantic_weight: float = 0.61  # w_sem: Mist's rate 1e4 vs its sum-reduced textural loss over 4x64x64 latents
    textural_weight: float = 1.0  # w_tex
    target_period: int = 32  # pixels at the model resolution: one period of the checkerboard target


@dataclass(frozen=True)
class AntiDiffusionConfig:
    """Anti-Diffusion: prompt tuning (PT) + semantic disturbance loss (SDL) + UNet tuning."""

    prompt_steps: int = 30  # AdamW steps of PT on clean images first, then on x + δ after every epoch
    prompt_learning_rate: float = 1.0e-3
    prompt_init: Literal["instance", "empty"] = "instance"  # start PT from c's hidden states or from ""'s
    attention_weight: float = 1.0  # weight of the SDL term
    attention_scale: float = 100.0  # SDL = mean(clamp(scale·Ā, 0, 1)²)


@dataclass(frozen=True)
class DisDiffConfig:
    """DisDiff: cross-attention erasure (CAE) of the trigger token + merit sampling scheduler (MSS)."""

    attention_weight: float = 0.1  # weight of the CAE energy term (DisDiff's att_param)
    sharpness: float = 100.0  # the token softmax of the maps runs on sharpness·Ā
    step_schedule: Literal["cosine", "constant"] = "cosine"  # MSS: α·(1 + cos(π t/(T−1)))/2, or α


@dataclass(frozen=True)
class MethodConfig:
    """Which protection method layer 1 runs, and the per-method settings."""

    name: MethodName = "dladiff"
    mist: MistConfig = field(default_factory=MistConfig)
    anti_diffusion: AntiDiffusionConfig = field(default_factory=AntiDiffusionConfig)
    disdiff: DisDiffConfig = field(default_factory=DisDiffConfig)


def method_config(cfg) -> MethodConfig:
    """``cfg.method`` when the config has that section, else the defaults."""
    return getattr(cfg, "method", None) or MethodConfig()
