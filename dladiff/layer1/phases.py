"""The language a layer-1 method is declared in: the phases of one epoch, and the :class:`Method` base.

An epoch is a list of phases run in order (:func:`dladiff.layer1.engine.run_epoch`):

* :class:`PGD` — ``steps`` PGD ascent steps δ ← Π_η(δ + α·sign(∇δ loss)), η = ``layer1.epsilon``,
  α = ``layer1.step_size`` or a per-image rule (``step_size``);
* :class:`Train` — ``steps`` AdamW steps of θd minimizing the denoising loss on x + δ (ADFT's stage 3);
* :class:`Work` — anything else a method does once per epoch (e.g. Anti-Diffusion's prompt tuning).

Each phase's mean value goes into the epoch's history under its ``key``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar

from dladiff.config import Config

if TYPE_CHECKING:
    from dladiff.diffusion.attention import AttentionStore
    from dladiff.layer1.models import Batch, Layer1Models
    from dladiff.layer1.stages import PGDLoss, StepSizeRule
    from dladiff.layer1.state import RunState


@dataclass(frozen=True)
class PGD:
    """``steps`` PGD ascent steps on ``loss`` (chunk by chunk); ``stores``: attention stores the loss reads."""

    key: str
    loss: PGDLoss
    steps: int
    step_size: StepSizeRule | None = None
    stores: tuple[AttentionStore, ...] = ()


@dataclass(frozen=True)
class Train:
    """``steps`` AdamW steps of θd on x + δ (stage 3), on posteriors encoded once at the phase's start."""

    steps: int
    key: str = "train"


@dataclass(frozen=True)
class Work:
    """Other work of the method; ``run(models, state, batch)`` returns the value kept in the history."""

    key: str
    run: Callable[[Layer1Models, RunState, Batch], float]


Phase = PGD | Train | Work


class Method(abc.ABC):
    """A layer-1 protection method: its settings and the phases of each epoch.

    Subclasses set :attr:`name` (the ``method.name`` of configs) and, when they have settings of
    their own, :attr:`Settings` (a frozen dataclass read from ``method.<name with _ for ->``, see
    :meth:`settings_key`); they register themselves with :func:`dladiff.methods.registry.register`.
    The budget is shared: η, α, E and n1 + n2 PGD steps per epoch from ``layer1`` (:attr:`pgd_budget`).
    """

    name: ClassVar[str]
    Settings: ClassVar[type | None] = None
    trains_surrogate: ClassVar[bool] = False  # whether epochs end with stage 3 (n3 AdamW steps of θd)

    def __init__(self, cfg: Config):
        self.cfg, self.l1 = cfg, cfg.layer1
        self.settings = cfg.method.settings.get(self.settings_key()) if self.Settings else None

    @classmethod
    def settings_key(cls) -> str:
        """Key of the settings section under ``method:`` (``anti-diffusion`` → ``anti_diffusion``)."""
        return cls.name.replace("-", "_")

    @classmethod
    def default_settings(cls):
        """The settings with every default (``None`` for a method without settings)."""
        return cls.Settings() if cls.Settings else None

    @classmethod
    def needs_static_surrogate(cls, cfg: Config) -> bool:
        """Whether the method reads the static surrogate θs (so protect must train or load it)."""
        return False

    @classmethod
    def uses_pretrained_unet(cls, cfg: Config) -> bool:
        """Whether the method reads the pretrained UNet (as θd's start); if not, callers free it."""
        return True

    @property
    def pgd_budget(self) -> int:
        """PGD steps per epoch every method spends: n1 + n2 (6 in the paper's setting)."""
        return self.l1.stage1_steps + self.l1.stage2_steps

    @property
    def train_steps(self) -> int:
        """n3 when the method trains θd and ``layer1.adft`` is on, else 0 (θd stays as loaded, no optimizer)."""
        return self.l1.stage3_steps if self.trains_surrogate and self.l1.adft else 0

    def setup(self, models: Layer1Models, state: RunState, components) -> None:
        """Work once before the first epoch (attention capture, targets, a start for the text states)."""

    @abc.abstractmethod
    def epoch(self, state: RunState) -> list[Phase]:
        """The phases of the epoch that starts at ``state.epoch``."""

