"""What every protection method shares on top of the layer-1 engine.

A method is an :class:`~dladiff.layer1.ADFTProtector` whose epoch (Eq. 9 generalized) is a list of
PGD phases (``pgd_phases``, each step δ ← Π_η(δ + α_i·sign(∇δ L)), α_i possibly scheduled through
``step_size``), n3 optimizer steps of θd on x + δ when the method trains a surrogate, and optional
``before_epoch``/``after_training`` work; the engine runs it (:func:`dladiff.layer1.run_protector`).
The budget is shared: η, α, E and n1 + n2 PGD steps per epoch from ``layer1``. A method states how
it maps onto the engine by rewriting the layer-1 config (:meth:`MethodProtector.engine_config`).
"""

from __future__ import annotations

import dataclasses

import torch

from dladiff.config import Config, EOTConfig, MethodConfig, with_overrides
from dladiff.diffusion.attention import AttentionStore
from dladiff.diffusion.loading import SDComponents
from dladiff.layer1 import ADFTProtector


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
    """The layer-1 engine with method settings and a method-defined mapping onto the engine's config."""

    name = "method"

    def __init__(self, x: torch.Tensor, components: SDComponents, static_unet, cfg: Config, device: torch.device,
                 method: MethodConfig | None = None, eot: EOTConfig | None = None):
        cfg = dataclasses.replace(cfg, method=method or cfg.method, eot=eot or cfg.eot)
        self.settings = cfg.method
        super().__init__(x, components, static_unet, self.engine_config(cfg), device)

    @classmethod
    def engine_config(cls, cfg: Config) -> Config:
        """The layer-1 config this method runs the engine with (default: unchanged)."""
        return cfg

    @classmethod
    def needs_static_surrogate(cls, cfg: Config) -> bool:
        """Whether the method reads the static surrogate θs (default: no)."""
        return False

    @classmethod
    def uses_pretrained_unet(cls, cfg: Config) -> bool:
        """Whether the method reads the pretrained UNet (default: yes, as θd's start); if not it is freed."""
        return True
