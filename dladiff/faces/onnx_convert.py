"""ONNX face recognizers as PyTorch modules, so that PGD can take gradients through them.

Conversion goes through onnx2torch. insightface's packs have a few quirks handled here:

* some graphs have a fixed batch of 1 (input dim 0 = 1 and ``Reshape`` shapes starting with 1):
  the batch dimension is made symbolic and those ``Reshape`` shapes copy the input's batch
  instead; if the converted graph still cannot run a batch, it is wrapped in a per-sample loop;
* mxnet-era models normalize inside the graph (``Sub``/``Mul`` among the first nodes) and take
  raw 0..255 pixels; the PyTorch-era ones (w600k_r50, glintr100) take (pixel - 127.5) / 127.5.
  :func:`onnx_input_normalization` reads that with insightface's own rule.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dladiff.errors import ModelUnavailableError

BATCH_DIM = "batch"
MIN_COSINE = 0.9999


def load_onnx_model(path: str | Path):
    """The ``onnx.ModelProto`` at ``path``; :class:`ModelUnavailableError` if absent or unreadable."""
    import onnx

    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelUnavailableError(f"ONNX model {path} not found: put the file there")
    try:
        return onnx.load(str(path))
    except Exception as exc:
        raise ModelUnavailableError(f"ONNX model {path} cannot be read ({exc}): download it again") from exc


def fixed_batch_size(model) -> int | None:
    """The static size of the first input's dimension 0, or None when it is symbolic."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return int(dims[0].dim_value) if dims and dims[0].dim_value > 0 else None


def _reshape_shape_tensors(model):
    """The int64 shape tensors (initializers or Constant node values) that feed ``Reshape`` nodes."""
    shape_names = {node.input[1] for node in model.graph.node if node.op_type == "Reshape" and len(node.input) > 1}
    tensors = [init for init in model.graph.initializer if init.name in shape_names]
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] in shape_names:
            tensors.extend(attr.t for attr in node.attribute if attr.name == "value")
    return tensors


def _copy_batch_in_reshapes(model, batch: int) -> None:
    """Rewrite ``Reshape`` shapes ``[batch, ...]`` as ``[0, ...]`` (0 = copy the input's dim 0)."""
    from onnx import numpy_helper

    for tensor in _reshape_shape_tensors(model):
        shape = numpy_helper.to_array(tensor).copy()
        if shape.ndim == 1 and len(shape) >= 2 and shape[0] == batch:
            shape[0] = 0
            tensor.CopyFrom(numpy_helper.from_array(shape.astype(np.int64), tensor.name))


def make_batch_dynamic(model) -> bool:
    """Give the graph a symbolic batch dimension in place; True when it had a fixed one."""
    batch = fixed_batch_size(model)
    if batch is None:
        return False
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].ClearField("dim_value")
            dims[0].dim_param = BATCH_DIM
    del model.graph.value_info[:]
    _copy_batch_in_reshapes(model, batch)
    return True


def onnx_input_normalization(path_or_model) -> tuple[float, float]:
    """(mean, std) the model expects on 0..255 RGB pixels, by insightface's ``ArcFaceONNX`` rule.

    A ``Sub`` and a ``Mul`` among the first 8 nodes mean an mxnet model that normalizes inside
    (0, 1); otherwise (127.5, 127.5).
    """
    model = load_onnx_model(path_or_model) if isinstance(path_or_model, (str, Path)) else path_or_model
    names = [node.name for node in model.graph.node[:8]]
    has_sub = any(name.startswith(("Sub", "_minus")) for name in names)
    has_mul = any(name.startswith(("Mul", "_mul")) for name in names)
    return (0.0, 1.0) if has_sub and has_mul else (127.5, 127.5)


class PerSampleLoop(torch.nn.Module):
    """Runs a batch-1 module on each sample of a batch and concatenates the outputs."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.module(x[i : i + 1]) for i in range(x.shape[0])], dim=0)


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """Eval mode and no gradients on parameters (gradients still flow to the input)."""
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


def _runs_batches(module: torch.nn.Module, input_shape: tuple[int, ...]) -> bool:
    """True when a batch of 2 gives the same outputs as the 2 samples one by one."""
    x = torch.rand((2, *input_shape[1:]), generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        try:
            batched = module(x)
        except (RuntimeError, ValueError):
            return False
        single = torch.cat([module(x[:1]), module(x[1:])])
    return batched.shape == single.shape and torch.allclose(batched, single, rtol=1e-3, atol=1e-4)


def _input_shape(model) -> tuple[int, ...]:
    """Static input shape of the first graph input, symbolic dims as 1."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return tuple(int(d.dim_value) if d.dim_value > 0 else 1 for d in dims)


def onnx_to_torch(path: str | Path) -> torch.nn.Module:
    """PyTorch module (eval, parameters frozen) computing the same function as the ONNX file.

    The module accepts any batch size, also when the ONNX graph was exported with batch 1.
    """
    from onnx2torch import convert

    model = load_onnx_model(path)
    shape = _input_shape(model)
    had_fixed_batch = make_batch_dynamic(model)
    try:
        module = freeze(convert(model))
    except Exception as exc:
        raise ModelUnavailableError(f"ONNX model {path} cannot be converted to PyTorch by onnx2torch: {exc}") from exc
    if had_fixed_batch and not _runs_batches(module, shape):
        module = freeze(PerSampleLoop(module))
    return module


def _onnxruntime_outputs(path: str | Path, x: np.ndarray) -> np.ndarray:
    """First output of the ONNX file on ``x``, one sample at a time if the graph has a fixed batch."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(Path(path).expanduser()), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    batch = session.get_inputs()[0].shape[0]
    if isinstance(batch, int) and batch != x.shape[0]:
        return np.concatenate([session.run(None, {name: x[i : i + 1]})[0] for i in range(x.shape[0])])
    return session.run(None, {name: x})[0]


def _row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each pair of rows of two (N, ...) arrays, flattened per row."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def check_against_onnxruntime(
    module: torch.nn.Module,
    path: str | Path,
    input_shape: tuple[int, ...],
    n: int = 2,
    seed: int = 0,
    min_cosine: float = MIN_COSINE,
) -> float:
    """Min cosine between ``module`` and onnxruntime outputs on ``n`` random inputs.

    Inputs are uniform in [-1, 1] with shape ``input_shape`` (N, C, H, W). Raises
    :class:`ModelUnavailableError` when the min cosine is below ``min_cosine``.
    """
    rng = np.random.default_rng(seed)
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    worst = 1.0
    for _ in range(n):
        x = rng.uniform(-1.0, 1.0, size=input_shape).astype(np.float32)
        with torch.no_grad():
            ours = module(torch.from_numpy(x).to(device)).float().cpu().numpy()
        worst = min(worst, float(_row_cosines(ours, _onnxruntime_outputs(path, x)).min()))
    if worst < min_cosine:
        raise ModelUnavailableError(
            f"PyTorch conversion of {path} disagrees with onnxruntime (min cosine {worst:.6f} < "
            f"{min_cosine}): the ONNX file may use an operator onnx2torch converts wrongly"
        )
    return worst
