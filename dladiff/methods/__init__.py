"""Layer-1 protection methods on one engine: DLADiff and the methods the paper compares with (§5.1).

One module per method holds its settings dataclass, its :class:`~dladiff.layer1.phases.Method` class
(the phases of an epoch) and its docstring (paper, loss, defaults with units, shapes, what is kept and
changed); :mod:`dladiff.methods.registry` finds them. Adding a method = one module + one YAML.

========================  ==========================================================================
``dladiff``               DSUR + ADFT (this paper, §4.1) — :mod:`dladiff.methods.dladiff`
``aspl``                  Anti-DreamBooth's ASPL (Van Le et al., ICCV 2023) = "w/o DSUR"
``fsmg``                  Anti-DreamBooth's FSMG: PGD against the fixed static surrogate θs
``mist``                  MIST (Liang et al. 2023): semantic + textural (target pattern) loss
``anti-diffusion``        Anti-Diffusion (Zheng et al., AAAI 2025): prompt tuning + SDL + UNet tuning
``disdiff``               DisDiff (Liu et al., ACM MM 2024): trigger-token attention erasure + MSS
========================  ==========================================================================

All share η (``layer1.epsilon``), α (``layer1.step_size``), E (``layer1.epochs``) and n1 + n2 PGD
steps per epoch, so that the comparison is at equal budget (paper §5.1). :func:`run_method` has the
contract of :func:`dladiff.layer1.run_layer1` for every registered method.

Loading a config reads every method's settings, so method modules import torch and the engine inside
their functions: a config loads without torch (``dladiff verify`` needs none).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from dladiff.config import Config, config_to_dict
from dladiff.methods.registry import method_class, methods, register

if TYPE_CHECKING:
    import torch

    from dladiff.diffusion.loading import SDComponents
    from dladiff.layer1 import Layer1Result
    from dladiff.runtime import StopRequest

__all__ = ["method_class", "method_fingerprint", "methods", "needs_static_surrogate", "register", "run_method",
           "uses_pretrained_unet"]


def needs_static_surrogate(name: str, cfg: Config) -> bool:
    """Whether method ``name`` with ``cfg`` reads the static surrogate θs (so protect must train or load it)."""
    return method_class(name).needs_static_surrogate(cfg)


def uses_pretrained_unet(name: str, cfg: Config) -> bool:
    """Whether method ``name`` reads the pretrained UNet; when not, callers drop it before the attack (memory)."""
    return method_class(name).uses_pretrained_unet(cfg)


def method_fingerprint(fingerprint: str, name: str, cfg: Config) -> str:
    """``fingerprint`` (see :func:`dladiff.layer1.run_fingerprint`) extended by the method, its settings and
    layer 1's EOT (none when EOT is off for layer 1)."""
    payload = {"layer1": fingerprint, "method": name, "settings": config_to_dict(cfg.method),
               "eot": config_to_dict(cfg.eot) if cfg.eot.on(1) else None}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def run_method(name: str, x: torch.Tensor, components: SDComponents, static_unet, cfg: Config, device: torch.device,
               run_dir: Path, fingerprint: str, resume: bool = False, quiet: bool = False,
               stop: StopRequest | None = None) -> Layer1Result:
    """Optimize δ1 for ``x`` ``(N, 3, R, R)`` in [-1, 1] with method ``name``; the contract of ``run_layer1``.

    ‖δ1‖∞ ≤ ``layer1.epsilon`` and x + δ1 ∈ [-1, 1] after every step (``pgd.pgd_update``). Checkpoints
    go to ``run_dir/layer1.ckpt`` under a fingerprint that includes the method, so a checkpoint of one
    method never resumes another. ``static_unet`` may be ``None`` unless :func:`needs_static_surrogate`.
    """
    from dladiff.layer1 import ADFTProtector, run_protector

    protector = ADFTProtector(x, components, static_unet, cfg, device, method_class(name)(cfg))
    return run_protector(protector, cfg, run_dir, method_fingerprint(fingerprint, name, cfg), resume, quiet, stop)
