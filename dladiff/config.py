"""Typed configuration read from YAML, validated on load.

Every number of the method lives in a YAML file under ``configs/`` (with its unit in a comment);
this module turns such a file into frozen dataclasses. Unknown keys, missing sections and values
of the wrong type raise :class:`~dladiff.errors.ConfigError` naming the file and the key.

A file may start with ``inherit: other.yaml`` (a path relative to itself or a built-in config
name): its keys are merged over the inherited file, section by section.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from dladiff.errors import ConfigError

MAX_SEED = 2**32 - 1  # the largest seed every generator used (numpy, torch, Python) accepts alike


@dataclass(frozen=True)
class ModelConfig:
    """Which Stable Diffusion to load and at what resolution the models see the photos."""

    id: str = "stabilityai/stable-diffusion-2-1-base"  # hub id, local diffusers folder, or "builtin:tiny-sd"
    resolution: int = 512  # pixels: side of the square the photos are resized to for optimization
    revision: str | None = None


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how the numerics run."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"  # CUDA autocast dtype; CPU always runs fp32
    seed: int = 0
    gradient_checkpointing: bool = True


@dataclass(frozen=True)
class PromptConfig:
    """Text prompts of DreamBooth (paper §3.1): instance prompt c and prior prompt c_pr."""

    instance: str = "a photo of sks person"
    class_prompt: str = "a photo of person"
    trigger: str = "sks"


@dataclass(frozen=True)
class SurrogateConfig:
    """Static surrogate θs: DreamBooth of the UNet only on clean photos (paper Eq. 7)."""

    steps: int = 400  # optimizer steps
    learning_rate: float = 2.0e-6
    batch_size: int = 4  # images per step
    adam_weight_decay: float = 1.0e-2
    max_grad_norm: float = 1.0
    prior_preservation: bool = False
    prior_weight: float = 1.0  # λ of Eq. 4
    num_class_images: int = 100
    class_inference_steps: int = 50  # sampler steps to generate each class image
    class_guidance_scale: float = 7.5


@dataclass(frozen=True)
class AttentionConfig:
    """Which attention maps L_attn compares (paper Eq. 8) and how the terms are weighted."""

    resolutions: tuple[int, ...] = (16, 32)  # latent side lengths whose maps are captured
    cross_weight: float = 1.0
    self_weight: float = 1.0
    cross_tokens: Literal["all", "trigger"] = "all"  # "trigger": only the "sks" token's cross map


@dataclass(frozen=True)
class Layer1Config:
    """DSUR + ADFT (paper §4.1, Eq. 9). Bounds and steps in [-1, 1] pixel units."""

    epsilon: float = 0.05  # η1, L∞ bound in [-1,1] units (0.05 ≈ 6.4/255)
    step_size: float = 0.005  # α1, PGD step in [-1,1] units (≈ 0.64/255)
    epochs: int = 50  # E
    stage1_steps: int = 3  # n1: PGD ascent steps on L_attn
    stage2_steps: int = 3  # n2: PGD ascent steps on the denoising loss
    stage3_steps: int = 3  # n3: optimizer steps of θd on x + δ1
    stage3_learning_rate: float = 5.0e-6
    batch_size: int = 4  # images per forward pass (PGD chunks, stage-3 batch)
    dsur: bool = True  # False: no stage 1 (Anti-DreamBooth's ASPL, Table 5 "w/o DSUR")
    adft: bool = True  # False: no stage 3, θd stays pretrained (Table 5 "w/o ADFT")
    checkpoint_every: int = 5  # epochs between resumable checkpoints
    attention: AttentionConfig = field(default_factory=AttentionConfig)


@dataclass(frozen=True)
class Layer2Config:
    """Weighted multi-encoder identity PGD with jittered alignment (paper §4.2, Eqs. 10-11)."""

    epsilon: float = 0.063  # η2, L∞ bound in [-1,1] units (0.063 ≈ 8/255 after quantization)
    step_size: float = 0.01  # α2, PGD step in [-1,1] units
    steps: int = 50  # maximum PGD steps per face
    threshold: float = 0.0  # τ: fixed weighting, stop once the weighted cosine similarity is below this
    weighting: Literal["fixed", "normalized"] = "normalized"  # fixed: paper's Σ w·cos (Eq. 10); normalized: each term on its own threshold
    hinge_margin: float = 0.5  # normalized units (share of the clean-to-threshold gap) past its threshold where an encoder stops pulling; < 0 = no hinge
    native_verdicts: bool = True  # report each face's same-person verdict from every encoder's own pipeline (and retry faces it loses)
    encoders: Union[Literal["auto"], dict[str, float]] = "auto"  # name -> weight, or auto: every real recognizer present
    detector: str = "auto"  # auto | yunet | dlib | insightface | retinaface
    det_size: int = 640  # pixels, insightface detector input side
    model_root: str = "~/.insightface/models"  # where insightface packs live
    jitter_translation: float = 1.0  # pixels (std) added to the alignment's translation per step
    jitter_rotation: float = 1.0  # degrees (std) of rotation added per step
    jitter_scale: float = 0.01  # relative (std) scale change per step
    full_resolution: bool = False  # optimize δ2 in the photo's own grid through the warp
    crop_size: int = 112  # pixels: side of the aligned face (ArcFace template) holding δ2 in the paper's mode
    detect_retries: int = 3  # times a face the detector lost gets its δ2 scaled down
    detect_backoff: float = 0.7  # factor applied to a lost face's δ2 at each retry
    momentum: float = 1.0  # μ of MI-FGSM (Dong et al. 2018), decay of the accumulated gradient; 0 = plain sign PGD
    diversity_probability: float = 0.5  # DI-FGSM (Xie et al. 2019): chance per crop and step of a random shrink-and-pad
    diversity_shrink: float = 1.15  # DI-FGSM: largest ratio of the crop's side to its shrunk side (> 1)
    ti_kernel: int = 7  # TI-FGSM (Dong et al. 2019): pixels of δ2's grid, side of the Gaussian smoothing the gradient; 0 = off
    align_samples: int = 1  # jittered alignments per encoder and step, their cosines averaged (alignment diversity)
    align_templates: tuple[str, ...] = ()  # other pipelines' 5-point templates drawn too: arcface, dlib
    landmark_sources: tuple[str, ...] = ("dlib68", "dlib5")  # other real landmark sources whose alignments are drawn too: yunet, dlib68, dlib5, scrfd
    feature_weight: float = 0.0  # weight of the intermediate-feature cosine next to the embedding's (0 = embedding only)
    feature_depths: tuple[float, ...] = (0.5,)  # relative depths in (0, 1] of the convolutions whose outputs are compared


def _default_method_settings() -> dict[str, Any]:
    from dladiff.methods.registry import methods

    return {cls.settings_key(): cls.default_settings() for cls in methods().values() if cls.Settings is not None}


@dataclass(frozen=True)
class MethodConfig:
    """Which protection method layer 1 runs (``name``), and the settings of every registered method.

    In YAML the settings sit beside ``name`` under their key (``method: {name: mist, mist: {...}}``);
    :mod:`dladiff.methods.registry` says which names and keys exist, each method module holds its
    settings dataclass (e.g. :class:`dladiff.methods.mist.MistSettings`).
    """

    name: str = "dladiff"
    settings: dict[str, Any] = field(default_factory=_default_method_settings)  # settings key -> that method's settings


@dataclass(frozen=True)
class EOTConfig:
    """Random transforms applied to x + δ inside PGD (expectation over transformations). On for layer 2 by default.

    Each transform (JPEG, then resize, then blur) is applied independently with ``probability``,
    with its parameter drawn uniformly in its range (the same draw for the whole batch).
    """

    enabled: bool = True
    layers: tuple[int, ...] = (2,)  # which layers' PGD sees the transforms (1: δ1 on the model batch, 2: each face)
    probability: float = 0.5  # chance that each transform is applied at a PGD step
    jpeg_quality: tuple[int, int] = (50, 95)  # JPEG quality range (inclusive)
    resize_scale: tuple[float, float] = (0.5, 1.0)  # down-scale factor range
    blur_sigma: tuple[float, float] = (0.0, 1.0)  # pixels, Gaussian std range
    rounding: Literal["ste", "cubic"] = "ste"  # rounding approximation of the differentiable JPEG

    def on(self, layer: int) -> bool:
        """Whether layer ``layer`` (1 or 2) runs its PGD through the transforms."""
        return self.enabled and layer in self.layers


@dataclass(frozen=True)
class BudgetConfig:
    """Where and how much δ may change the photo (:mod:`dladiff.budget`); both off = the paper's uniform η."""

    face_mask: bool = True  # layer 2: δ2 only inside the grown landmark hull of each face, feathered
    hull: Literal["dlib68", "five"] = "dlib68"  # dlib68: dlib's 68 points with the 5-point outline; five: the 5-point outline alone
    margin: float = 0.15  # eye gaps (distance between the eye centres) the hull is grown by
    feather: float = 4.0  # pixels over which δ2 fades to 0 at the hull's edge
    perceptual: bool = True  # per-pixel bound from local texture, floor on flat areas up to η (layers below)
    perceptual_layers: tuple[int, ...] = (2,)  # which layers the perceptual bound applies to (1: δ1 on the photo's grid, 2: δ2)
    floor: float = 0.008  # [-1,1] units, the bound where the photo is flat (≈ 1.02/255 → 1/255 after rounding)
    flat_std: float = 2.0  # 0-255 luminance std in the window at or below which the floor applies
    full_std: float = 3.0  # 0-255 luminance std at or above which the full η applies
    window: int = 7  # pixels, side of the box the local std is measured in

    def perceptual_on(self, layer: int) -> bool:
        """Whether layer ``layer`` (1 or 2) is held to the perceptual (texture) bound."""
        return self.perceptual and layer in self.perceptual_layers


@dataclass(frozen=True)
class InputConfig:
    """Which photos are read: a pixel ceiling, checked from the file's header before decoding."""

    max_megapixels: float = 100.0  # 10^6 pixels; a larger photo is skipped with a message (memory ~ 3 bytes/pixel per copy)


PIL_MAX_MEGAPIXELS = 178.9
"""PIL refuses to open more than 2 × ``Image.MAX_IMAGE_PIXELS`` (178 956 970) pixels as a decompression bomb."""


@dataclass(frozen=True)
class Config:
    """A whole run: model, runtime, prompts, surrogate and both layers."""

    model: ModelConfig = field(default_factory=ModelConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    surrogate: SurrogateConfig = field(default_factory=SurrogateConfig)
    layer1: Layer1Config = field(default_factory=Layer1Config)
    layer2: Layer2Config = field(default_factory=Layer2Config)
    method: MethodConfig = field(default_factory=MethodConfig)
    eot: EOTConfig = field(default_factory=EOTConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    input: InputConfig = field(default_factory=InputConfig)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in canonical form."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is MethodConfig:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping (section), got {type(value).__name__}")
        return _build_method(value, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping (section), got {type(value).__name__}")
        return build(tp, value, where)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: unexpected value {value!r}")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{where}: {value!r} is not one of {choices}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return {
            _coerce(k, args[0], f"{where} key"): _coerce(v, args[1], f"{where}.{k}")
            for k, v in value.items()
        }
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")  # pragma: no cover


def build(cls: type, data: dict, where: str) -> Any:
    """Build dataclass ``cls`` from the mapping ``data``, coercing and checking every value against its
    annotation; unknown keys and wrong types raise :class:`ConfigError` naming ``where`` and the key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _build_method(data: dict, where: str) -> MethodConfig:
    """The ``method`` section: ``name`` of a registered method, and any registered method's settings by key."""
    from dladiff.methods.registry import methods, settings_classes

    classes = settings_classes()
    unknown = sorted(set(data) - {"name"} - set(classes))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(['name', *classes])}")
    name = _coerce(data.get("name", MethodConfig.name), str, f"{where}.name")
    names = methods()
    if name not in names:
        raise ConfigError(f"{where}.name: {name!r} is not one of {', '.join(repr(n) for n in names)}")
    settings = {key: build(cls, data.get(key, {}), f"{where}.{key}") for key, cls in classes.items()}
    return MethodConfig(name, settings)


def _validate_ranges(cfg: Config, source: str) -> None:
    """Semantic checks that types alone cannot express."""
    checks = [
        (cfg.model.resolution > 0 and cfg.model.resolution % 8 == 0, "model.resolution must be a positive multiple of 8"),
        (0 <= cfg.runtime.seed <= MAX_SEED, f"runtime.seed (--seed) must be an integer in 0..{MAX_SEED}, got {cfg.runtime.seed}"),
        (0 < cfg.layer1.epsilon <= 2, "layer1.epsilon must be in (0, 2] ([-1,1] pixel units)"),
        (0 < cfg.layer1.step_size, "layer1.step_size must be positive"),
        (cfg.layer1.epochs >= 0, "layer1.epochs must be >= 0"),
        (min(cfg.layer1.stage1_steps, cfg.layer1.stage2_steps, cfg.layer1.stage3_steps) >= 0, "layer1 stage step counts must be >= 0"),
        (cfg.layer1.batch_size > 0, "layer1.batch_size must be positive"),
        (cfg.layer1.checkpoint_every > 0, "layer1.checkpoint_every must be positive"),
        (cfg.surrogate.steps >= 0 and cfg.surrogate.batch_size > 0, "surrogate.steps >= 0 and surrogate.batch_size > 0"),
        (0 < cfg.layer2.epsilon <= 2, "layer2.epsilon must be in (0, 2] ([-1,1] pixel units)"),
        (cfg.layer2.steps >= 0, "layer2.steps must be >= 0"),
        (cfg.layer2.crop_size >= 32, "layer2.crop_size must be at least 32 pixels"),
        (cfg.layer2.detect_retries >= 0 and 0 < cfg.layer2.detect_backoff < 1, "layer2.detect_retries >= 0 and 0 < layer2.detect_backoff < 1"),
        (cfg.layer2.encoders == "auto" or all(math.isfinite(w) and w > 0 for w in cfg.layer2.encoders.values()),
         f"layer2.encoders weights must be finite numbers > 0, got {cfg.layer2.encoders}; leave an encoder out instead of giving it weight 0"),
        (cfg.layer2.momentum >= 0, "layer2.momentum must be >= 0"),
        (0 <= cfg.layer2.diversity_probability <= 1 and cfg.layer2.diversity_shrink > 1, "layer2.diversity_probability must be in [0, 1] and layer2.diversity_shrink > 1"),
        (cfg.layer2.ti_kernel >= 0, "layer2.ti_kernel must be >= 0 (pixels; 0 = off)"),
        (cfg.layer2.align_samples >= 1, "layer2.align_samples must be >= 1"),
        (set(cfg.layer2.align_templates) <= {"arcface", "dlib"}, "layer2.align_templates may only name arcface and dlib"),
        (set(cfg.layer2.landmark_sources) <= {"yunet", "dlib68", "dlib5", "scrfd"}, "layer2.landmark_sources may only name yunet, dlib68, dlib5, scrfd"),
        (cfg.layer2.weighting == "fixed" or math.isfinite(cfg.layer2.hinge_margin), "layer2.hinge_margin must be a finite number"),
        (cfg.layer2.feature_weight >= 0 and all(0 < d <= 1 for d in cfg.layer2.feature_depths), "layer2.feature_weight must be >= 0 and layer2.feature_depths within (0, 1]"),
        *(check for settings in cfg.method.settings.values() if hasattr(settings, "checks") for check in settings.checks()),
        (len(cfg.eot.layers) > 0 and set(cfg.eot.layers) <= {1, 2}, "eot.layers must name layer 1, layer 2 or both: [1, 2]"),
        (len(cfg.budget.perceptual_layers) > 0 and set(cfg.budget.perceptual_layers) <= {1, 2},
         "budget.perceptual_layers must name layer 1, layer 2 or both: [1, 2]"),
        (0 <= cfg.eot.probability <= 1, "eot.probability must be in [0, 1]"),
        (1 <= cfg.eot.jpeg_quality[0] <= cfg.eot.jpeg_quality[1] <= 100, "eot.jpeg_quality must be [low, high] within 1..100"),
        (0 < cfg.eot.resize_scale[0] <= cfg.eot.resize_scale[1] <= 1, "eot.resize_scale must be [low, high] within (0, 1]"),
        (0 <= cfg.eot.blur_sigma[0] <= cfg.eot.blur_sigma[1], "eot.blur_sigma must be [low, high] with 0 <= low <= high"),
        (cfg.budget.margin >= 0 and cfg.budget.feather >= 1, "budget.margin must be >= 0 (eye gaps) and budget.feather >= 1 (pixels)"),
        (0 <= cfg.budget.floor <= 2, "budget.floor must be in [0, 2] ([-1,1] pixel units)"),
        (0 <= cfg.budget.flat_std < cfg.budget.full_std, "budget.flat_std must be >= 0 and below budget.full_std (0-255 luminance std)"),
        (cfg.budget.window >= 3 and cfg.budget.window % 2 == 1, "budget.window must be an odd number of pixels >= 3"),
        (0 < cfg.input.max_megapixels <= PIL_MAX_MEGAPIXELS,
         f"input.max_megapixels must be in (0, {PIL_MAX_MEGAPIXELS}] (10^6 pixels; above it PIL refuses the file)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{source}: {message}")


def builtin_config_dir() -> Path:
    """The shipped ``configs/`` folder: beside the package in a checkout, else the installed copy."""
    checkout = Path(__file__).resolve().parent.parent / "configs"
    if (checkout / "default.yaml").is_file():
        return checkout
    return Path(__file__).resolve().parent / "configs"  # installed wheel: dladiff/configs/


def builtin_config_names() -> list[str]:
    """Names of the configs shipped with the package (``configs/*.yaml``)."""
    return sorted(p.stem for p in builtin_config_dir().glob("*.yaml"))


def resolve_named_file(name_or_path: str | Path, folder: Path, what: str = "config") -> Path:
    """A path that exists, or the name of a YAML file in ``folder`` (``smoke`` or ``smoke.yaml``)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    stem = path.name[:-5] if path.name.endswith(".yaml") else path.name
    candidate = folder / f"{stem}.yaml"
    if candidate.is_file():
        return candidate
    names = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
    raise ConfigError(f"{what} {name_or_path}: no such file and no built-in {what} of that name (built-in: {names})")


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A path that exists, or the name of a built-in protection config."""
    return resolve_named_file(name_or_path, builtin_config_dir())


def merge(base: dict, over: dict) -> dict:
    """``over``'s keys over ``base``'s, section by section (a mapping replaces ``layer2.encoders`` whole)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "encoders":
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_config_tree(path: Path, resolve=resolve_config_path, seen: tuple[Path, ...] = ()) -> dict:
    """The mapping of a YAML config with its ``inherit:`` chain merged in (``resolve`` finds parents by name)."""
    if path.resolve() in seen:
        raise ConfigError(f"{path}: circular inherit")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); save the config as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    parent = data.pop("inherit", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: inherit must be a file name")
    parent_path = path.parent / parent
    if not parent_path.is_file():
        parent_path = resolve(parent)
    return merge(read_config_tree(parent_path, resolve, seen + (path.resolve(),)), data)


def load_config(name_or_path: str | Path | None = None) -> Config:
    """Load and validate a config file; ``None`` gives the paper defaults (``configs/default.yaml``)."""
    path = resolve_config_path(name_or_path or "default")
    data = read_config_tree(path)
    try:
        cfg = build(Config, data, "")
    except ConfigError as exc:
        raise ConfigError(f"config {path}: {exc}") from None
    _validate_ranges(cfg, f"config {path}")
    return cfg


def config_from_dict(data: dict) -> Config:
    """Build a validated config from a plain mapping (as written by :func:`config_to_dict`)."""
    cfg = build(Config, data, "")
    _validate_ranges(cfg, "config")
    return cfg


def config_to_dict(cfg: Any) -> dict:
    """Plain, JSON-serializable mapping of a config (tuples become lists), laid out as in the YAML files."""
    def convert(value: Any) -> Any:
        if isinstance(value, MethodConfig):
            return {"name": value.name, **{k: convert(v) for k, v in value.settings.items()}}
        if dataclasses.is_dataclass(value):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (tuple, list)):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return convert(cfg)


def parse_overrides(items: list[str]) -> dict:
    """``["layer2.epsilon=0.05", ...]`` (values read as YAML) → ``{"layer2": {"epsilon": 0.05}}``."""
    overrides: dict = {}
    for item in items:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        if not name:
            raise ConfigError(f"override {item!r}: write section.key=value, e.g. layer2.epsilon=0.05")
        overrides.setdefault(section, {})[name] = yaml.safe_load(value)
    return overrides


def with_overrides(cfg: Config, **sections: dict) -> Config:
    """Return ``cfg`` with some keys of some sections replaced, e.g. ``model={"id": "..."}``."""
    data = config_to_dict(cfg)
    for section, values in sections.items():
        data[section] = merge(data[section], values)
    return config_from_dict(data)
