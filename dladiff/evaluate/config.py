"""Typed settings of ``dladiff evaluate`` (the attacker and the metrics), read from YAML.

The evaluation settings live in their own files, ``configs/evaluate/<name>.yaml`` (built-in names:
``default``, ``smoke``, ``transfer_sd15``), so that the protection configs of ``configs/*.yaml`` stay
untouched. They are validated by the same machinery as :mod:`dladiff.config` (unknown keys, wrong
types and missing files give a :class:`~dladiff.errors.ConfigError` naming the file and the key), and
``inherit: other.yaml`` works the same way.

Defaults follow the paper's §5.1 where it gives a value (DreamBooth batch 4, 400 steps, prompt
"a photo of sks person"; 20 images per identity and prompt, Appendix 7.3) and are our documented
choices where it does not (see ``configs/evaluate/default.yaml`` and ``docs/evaluate.md``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dladiff.config import (MAX_SEED, ModelConfig, RuntimeConfig, build, builtin_config_dir, config_to_dict, merge,
                            read_config_tree, resolve_named_file)
from dladiff.errors import ConfigError

ATTACKS = ("dreambooth", "lora", "faceid", "instantid")
FINETUNE_ATTACKS = ("dreambooth", "lora")
ZERO_SHOT_ATTACKS = ("faceid", "instantid")
EVALUATE_CONFIG_FOLDER = "evaluate"


@dataclass(frozen=True)
class FineTuneAttackConfig:
    """What every fine-tuning attack has: the instance prompt, the optimizer, the prior-preservation class images."""

    instance_prompt: str = "a photo of sks person"
    steps: int = 400  # optimizer steps
    batch_size: int = 4  # images per step
    learning_rate: float = 1.0e-4
    prior_preservation: bool = False
    prior_weight: float = 1.0  # λ of Eq. 4
    num_class_images: int = 200
    class_prompt: str = "a photo of person"
    class_inference_steps: int = 50  # sampler steps to generate each class image
    class_guidance_scale: float = 7.5
    adam_weight_decay: float = 1.0e-2
    max_grad_norm: float = 1.0


@dataclass(frozen=True)
class DreamBoothAttackConfig(FineTuneAttackConfig):
    """The attacker's DreamBooth (paper Eq. 4, §5.1: batch 4, 400 steps), text encoder trained too."""

    learning_rate: float = 5.0e-7
    prior_preservation: bool = True
    train_text_encoder: bool = True


@dataclass(frozen=True)
class LoraAttackConfig(FineTuneAttackConfig):
    """The attacker's LoRA on the UNet attention projections (paper §5.3, Table 2)."""

    rank: int = 8
    alpha: float = 8.0


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling after fine-tuning (paper Appendix 7.3: 20 images per identity, fixed seeds)."""

    prompts: tuple[str, ...] = ("a photo of sks person", "a dslr portrait of sks person")
    images_per_prompt: int = 20
    inference_steps: int = 50
    guidance_scale: float = 7.5
    scheduler: Literal["ddim", "dpm-solver", "pndm", "euler", "model"] = "ddim"
    negative_prompt: str = ""
    seed: int = 0
    batch_size: int = 4


@dataclass(frozen=True)
class ZeroShotConfig:
    """What every zero-shot identity adapter attack has: base model, adapter weights, face reader, sampling."""

    base_model: str = ""
    adapter: str = ""
    weight_name: str = ""
    detector: str = "insightface"
    encoder: str = "arcface-r50"
    resolution: int = 512  # pixels
    prompts: tuple[str, ...] = ("a photo of a person", "a dslr portrait of a person")
    negative_prompt: str = "monochrome, lowres, bad anatomy, worst quality, low quality"
    inference_steps: int = 30
    guidance_scale: float = 7.5


@dataclass(frozen=True)
class FaceIdConfig(ZeroShotConfig):
    """IP-Adapter FaceID on SD-1.5 (paper §5.4, Table 4): buffalo_l normed embedding of a protected photo."""

    base_model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    adapter: str = "h94/IP-Adapter-FaceID"
    weight_name: str = "ip-adapter-faceid_sd15.bin"
    scale: float = 1.0


@dataclass(frozen=True)
class InstantIdConfig(ZeroShotConfig):
    """InstantID on SDXL (paper §5.4, Table 4): antelopev2 raw embedding and five keypoints."""

    base_model: str = "stabilityai/stable-diffusion-xl-base-1.0"
    adapter: str = "InstantX/InstantID"
    weight_name: str = "ip-adapter.bin"
    encoder: str = "arcface-r100"
    resolution: int = 1024  # pixels
    guidance_scale: float = 5.0
    controlnet_folder: str = "ControlNetModel"
    ip_adapter_scale: float = 0.8
    controlnet_scale: float = 0.8


@dataclass(frozen=True)
class MetricsConfig:
    """Which models score the results (paper §5.2: RetinaFace FDR, ArcFace ISM, FID, FIQA)."""

    detector: str = "retinaface"
    encoder: str = "arcface-r50"
    model_root: str = "~/.insightface/models"
    det_size: int = 640
    fid: bool = True
    fid_weights: str = ""
    brisque: bool = True
    fiqa: bool = True
    fiqa_weights: str = "~/.cache/dladiff/EdgeNeXt_XXS_checkpoint.pt"
    nsfw: bool = True
    nsfw_detector: Literal["sd-safety-checker", "opennsfw"] = "sd-safety-checker"
    safety_checker: str = ""
    opennsfw_threshold: float = 0.5
    contact_sheet_samples: int = 4


@dataclass(frozen=True)
class EvaluateConfig:
    """A whole evaluation: attacked model, runtime, the attacks and the metrics."""

    model: ModelConfig = field(default_factory=ModelConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    attacks: tuple[str, ...] = ATTACKS
    dreambooth: DreamBoothAttackConfig = field(default_factory=DreamBoothAttackConfig)
    lora: LoraAttackConfig = field(default_factory=LoraAttackConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    faceid: FaceIdConfig = field(default_factory=FaceIdConfig)
    instantid: InstantIdConfig = field(default_factory=InstantIdConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


def _range_checks(cfg: EvaluateConfig) -> list[tuple[bool, str]]:
    unknown = [a for a in cfg.attacks if a not in ATTACKS]
    return [
        (not unknown, f"attacks: unknown attack(s) {', '.join(unknown)}; choices: {', '.join(ATTACKS)}"),
        (len(set(cfg.attacks)) == len(cfg.attacks), "attacks: an attack is named twice"),
        (cfg.model.resolution > 0 and cfg.model.resolution % 8 == 0, "model.resolution must be a positive multiple of 8"),
        (0 <= cfg.runtime.seed <= MAX_SEED and 0 <= cfg.generation.seed <= MAX_SEED,
         f"runtime.seed (--seed) and generation.seed must be integers in 0..{MAX_SEED}"),
        (cfg.dreambooth.steps >= 0 and cfg.dreambooth.batch_size > 0, "dreambooth.steps >= 0 and dreambooth.batch_size > 0"),
        (cfg.dreambooth.learning_rate > 0, "dreambooth.learning_rate must be positive"),
        (cfg.dreambooth.num_class_images > 0 or not cfg.dreambooth.prior_preservation, "dreambooth.num_class_images must be positive with prior_preservation"),
        (cfg.lora.steps >= 0 and cfg.lora.batch_size > 0, "lora.steps >= 0 and lora.batch_size > 0"),
        (cfg.lora.rank > 0 and cfg.lora.learning_rate > 0, "lora.rank and lora.learning_rate must be positive"),
        (cfg.lora.num_class_images > 0 or not cfg.lora.prior_preservation, "lora.num_class_images must be positive with prior_preservation"),
        (len(cfg.generation.prompts) > 0, "generation.prompts must name at least one prompt"),
        (cfg.generation.images_per_prompt > 0, "generation.images_per_prompt must be positive"),
        (cfg.generation.inference_steps > 0 and cfg.generation.batch_size > 0, "generation.inference_steps and generation.batch_size must be positive"),
        (len(cfg.faceid.prompts) > 0 and len(cfg.instantid.prompts) > 0, "faceid.prompts and instantid.prompts must not be empty"),
        (cfg.faceid.resolution % 8 == 0 and cfg.instantid.resolution % 8 == 0, "faceid/instantid resolution must be multiples of 8"),
        (cfg.metrics.contact_sheet_samples >= 0, "metrics.contact_sheet_samples must be >= 0"),
        (0 < cfg.metrics.opennsfw_threshold < 1, "metrics.opennsfw_threshold must be a probability in (0, 1)"),
    ]


def validate(cfg: EvaluateConfig, source: str) -> EvaluateConfig:
    """Semantic checks types cannot express; raises :class:`ConfigError` naming ``source``."""
    for ok, message in _range_checks(cfg):
        if not ok:
            raise ConfigError(f"{source}: {message}")
    return cfg


def builtin_evaluate_dir() -> Path:
    """``configs/evaluate/`` of the checkout or of the installed package."""
    return builtin_config_dir() / EVALUATE_CONFIG_FOLDER


def builtin_evaluate_names() -> list[str]:
    """Names of the shipped evaluation configs (``configs/evaluate/*.yaml``)."""
    return sorted(p.stem for p in builtin_evaluate_dir().glob("*.yaml"))


def resolve_evaluate_path(name_or_path: str | Path) -> Path:
    """An existing file, or the name of a built-in evaluation config (``smoke`` or ``smoke.yaml``)."""
    return resolve_named_file(name_or_path, builtin_evaluate_dir(), "evaluation config")


def load_evaluate_config(name_or_path: str | Path | None = None) -> EvaluateConfig:
    """Load and validate an evaluation config; ``None`` gives the paper's attacker (``default``)."""
    path = resolve_evaluate_path(name_or_path or "default")
    try:
        cfg = build(EvaluateConfig, read_config_tree(path, resolve_evaluate_path), "")
    except ConfigError as exc:
        raise ConfigError(f"evaluation config {path}: {exc}") from None
    return validate(cfg, f"evaluation config {path}")


def evaluate_config_from_dict(data: dict) -> EvaluateConfig:
    """A validated config from a plain mapping (as written by :func:`dladiff.config.config_to_dict`)."""
    return validate(build(EvaluateConfig, data, ""), "evaluation config")


def with_evaluate_overrides(cfg: EvaluateConfig, **sections) -> EvaluateConfig:
    """``cfg`` with keys replaced, e.g. ``model={"id": ...}`` or ``attacks=("dreambooth",)``."""
    data = config_to_dict(cfg)
    for section, values in sections.items():
        data[section] = merge(data[section], values) if isinstance(values, dict) else list(values)
    return evaluate_config_from_dict(data)


def plain_settings(settings: dict) -> dict:
    """``settings`` as plain JSON data (dataclasses converted), for the record written with the images."""
    return {k: config_to_dict(v) if dataclasses.is_dataclass(v) else v for k, v in settings.items()}


def fingerprint(*parts) -> str:
    """A short stable hash of JSON-serializable parts (dataclasses are converted first)."""
    plain = [config_to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts]
    text = json.dumps(plain, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def parse_attacks(text: str) -> tuple[str, ...]:
    """``--attacks dreambooth,lora`` -> ``("dreambooth", "lora")``; unknown names raise :class:`ConfigError`."""
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [n for n in names if n not in ATTACKS]
    if not names or unknown:
        raise ConfigError(f"--attacks {text!r}: give a comma-separated list of {', '.join(ATTACKS)}")
    return names


def evaluate_config_for_cli(config: str | None = None, attacks: str | None = None, model: str | None = None,
                            device: str | None = None, seed: int | None = None) -> EvaluateConfig:
    """The evaluation config of ``--config`` with the command-line overrides applied."""
    cfg = load_evaluate_config(config)
    overrides: dict = {}
    if attacks:
        overrides["attacks"] = parse_attacks(attacks)
    if model:
        overrides["model"] = {"id": model}
    runtime = {k: v for k, v in (("device", device), ("seed", seed)) if v is not None}
    if runtime:
        overrides["runtime"] = runtime
    return with_evaluate_overrides(cfg, **overrides) if overrides else cfg
