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


NATIVE_OPS = {"Add", "Sub", "Mul", "Conv", "BatchNormalization", "PRelu", "Relu", "Constant", "Dropout", "Flatten",
              "Gemm", "Identity"}
"""The ONNX operators :class:`NativeGraph` runs (SFace and other MobileFaceNet/ResNet-style recognizers)."""


def _attributes(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _native_node(node, constants: dict) -> tuple | None:
    """``(op, inputs, output, settings)`` of one node for :class:`NativeGraph`, or None when not supported.

    Supported exactly as onnx2torch converts them: symmetric-pad ``Conv``, inference ``BatchNormalization``,
    per-channel ``PRelu``, ``Flatten`` at axis 1, ``Gemm`` with a constant ``transB=1`` weight (a linear
    layer), ``Dropout`` (identity in eval), ``Identity`` and elementwise ``Add``/``Sub``/``Mul`` without
    old-style broadcast.
    """
    attrs = _attributes(node)
    op, inputs = node.op_type, list(node.input)
    if op not in NATIVE_OPS or len(node.output) != 1:
        return None
    if op == "Conv":
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
        half = len(pads) // 2
        if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or pads[:half] != pads[half:]:
            return None
        if len(constants.get(inputs[1], np.zeros(0)).shape) != 4:
            return None
        settings = {"stride": tuple(attrs.get("strides", [1, 1])), "padding": tuple(pads[:half]),
                    "dilation": tuple(attrs.get("dilations", [1, 1])), "groups": int(attrs.get("group", 1))}
    elif op == "BatchNormalization":
        if set(attrs) - {"epsilon", "momentum"} or len(inputs) != 5:
            return None
        settings = {"eps": float(attrs.get("epsilon", 1e-5))}
    elif op == "Gemm":
        gemm = (attrs.get("alpha", 1.0), attrs.get("beta", 1.0), attrs.get("transA", 0), attrs.get("transB", 0))
        if gemm != (1.0, 1.0, 0, 1):
            return None
        if inputs[1] not in constants or constants[inputs[1]].ndim != 2:
            return None
        settings = {}
    elif op == "Flatten":
        if attrs.get("axis", 1) != 1:
            return None
        settings = {}
    elif op == "Constant":
        if set(attrs) != {"value"}:
            return None
        from onnx import numpy_helper

        settings = {"value": numpy_helper.to_array(attrs["value"])}
    elif op in ("Add", "Sub", "Mul", "PRelu", "Relu", "Identity"):
        if attrs:
            return None
        settings = {}
    else:  # Dropout: its ratio / training-mode inputs are ignored in eval
        settings = {}
    return op, inputs, node.output[0], settings


class NativeGraph(torch.nn.Module):
    """An ONNX graph of :data:`NATIVE_OPS` run node by node with the torch functions onnx2torch's modules call.

    Built straight from the ONNX file (no onnx2torch, which imports torchvision and torch._dynamo:
    seconds of start-up); the outputs equal onnx2torch's conversion (tests/test_startup.py). Weights are
    buffers, so :func:`freeze` and ``.to(device)`` work as for any module.
    """

    def __init__(self, model, nodes: list[tuple], constants: dict[str, np.ndarray]):
        super().__init__()
        self.input_name = model.graph.input[0].name
        self.output_name = model.graph.output[0].name
        self.nodes = nodes
        used = {name for _, inputs, _, _ in nodes for name in inputs}
        self.names = {}
        for index, name in enumerate(sorted(n for n in constants if n in used)):
            self.names[name] = f"c{index}"
            self.register_buffer(f"c{index}", torch.from_numpy(np.array(constants[name])))

    def _value(self, name: str, values: dict) -> torch.Tensor:
        return values[name] if name in values else getattr(self, self.names[name])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        F = torch.nn.functional
        values = {self.input_name: x}
        for op, inputs, output, settings in self.nodes:
            args = [self._value(name, values) for name in inputs if name]
            if op == "Conv":
                values[output] = F.conv2d(args[0], args[1], args[2] if len(args) > 2 else None, **settings)
            elif op == "BatchNormalization":
                values[output] = F.batch_norm(args[0], args[3], args[4], args[1], args[2], False, 0.0, settings["eps"])
            elif op == "PRelu":
                values[output] = _prelu(args[0], args[1])
            elif op == "Relu":
                values[output] = torch.relu(args[0])
            elif op == "Gemm":
                values[output] = F.linear(args[0], args[1], args[2] if len(args) > 2 else None)
            elif op == "Flatten":
                values[output] = torch.flatten(args[0], 1)
            elif op == "Constant":
                values[output] = torch.as_tensor(settings["value"])
            elif op in ("Dropout", "Identity"):
                values[output] = args[0]
            else:
                values[output] = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul}[op](args[0], args[1])
        return values[self.output_name]


class _FrozenPReLU(torch.autograd.Function):
    """``F.prelu(x, slope)`` whose backward gives the input's gradient only (the slope is a frozen weight).

    ATen's PReLU backward always reduces the slope's gradient too, and its masked select is slow on
    CPU (a fifth of a recognizer's backward pass). Here the forward also keeps the derivative
    d = 1 where x > 0, else slope, and the backward is g · d: ATen's values exactly.
    Shapes: x ``(N, C, ...)``, slope ``(C,)`` or ``(1,)``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2) if slope.nelement() > 1 else (1,) * x.dim()
        positive = x.sign().clamp_(min=0)
        ctx.save_for_backward(torch.addcmul(positive, 1 - positive, slope.reshape(shape)))
        return torch.nn.functional.prelu(x, slope)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (derivative,) = ctx.saved_tensors
        return grad * derivative, None


def _prelu(x: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    """ONNX ``PRelu`` (``F.prelu`` for per-channel slopes, as onnx2torch; input gradient only when frozen)."""
    if slope.nelement() == 1 or (slope.shape[0] == x.shape[1] and all(s == 1 for s in slope.shape[1:])):
        slope = slope.reshape(-1)
        if slope.requires_grad or not (x.requires_grad and torch.is_grad_enabled()):
            return torch.nn.functional.prelu(x, slope)
        return _FrozenPReLU.apply(x, slope)
    return torch.where(x >= 0, x, x * slope)


def native_graph(model) -> NativeGraph | None:
    """:class:`NativeGraph` of ``model`` when every node is supported, one input and one output; else None."""
    from onnx import numpy_helper

    if len(model.graph.input) != 1 or len(model.graph.output) != 1:
        return None
    constants = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        if node.op_type == "Identity" and len(node.input) == 1 and node.input[0] in constants:
            constants[node.output[0]] = constants[node.input[0]]  # exporters alias weights this way
            continue
        entry = _native_node(node, constants)
        if entry is None:
            return None
        nodes.append(entry)
    return NativeGraph(model, fold_batch_norms(nodes, constants, model.graph.output[0].name), constants)


def _folded_conv(conv: tuple, norm: tuple, constants: dict[str, np.ndarray]) -> tuple:
    """The ``Conv`` node computing ``BatchNormalization(Conv(x))`` in eval mode, its new weights put in ``constants``.

    W' = W · γ/√(σ² + ε) per output channel, b' = (b − μ) · γ/√(σ² + ε) + β, computed in float64.
    """
    _, conv_inputs, _, settings = conv
    _, norm_inputs, output, norm_settings = norm
    gamma, beta, mean, var = (constants[name].astype(np.float64) for name in norm_inputs[1:5])
    scale = gamma / np.sqrt(var + norm_settings["eps"])
    weight = constants[conv_inputs[1]].astype(np.float64)
    bias = constants[conv_inputs[2]].astype(np.float64) if len(conv_inputs) > 2 and conv_inputs[2] else 0.0
    constants[f"{output}:folded_weight"] = (weight * scale[:, None, None, None]).astype(np.float32)
    constants[f"{output}:folded_bias"] = ((bias - mean) * scale + beta).astype(np.float32)
    return "Conv", [conv_inputs[0], f"{output}:folded_weight", f"{output}:folded_bias"], output, settings


def fold_batch_norms(nodes: list[tuple], constants: dict[str, np.ndarray], graph_output: str) -> list[tuple]:
    """``nodes`` with each inference ``BatchNormalization`` that alone reads a ``Conv``'s output folded into it.

    One convolution instead of a convolution and a batch norm, forward and backward (about a tenth of
    SFace's PGD step on CPU); outputs equal the unfolded graph's to float32 rounding (tests/test_startup.py).
    """
    readers: dict[str, int] = {}
    for _, inputs, _, _ in nodes:
        for name in inputs:
            readers[name] = readers.get(name, 0) + 1
    producers = {output: index for index, (op, _, output, _) in enumerate(nodes) if op == "Conv"}
    folded, dropped = {}, set()
    for index, node in enumerate(nodes):
        op, inputs, _, _ = node
        source = producers.get(inputs[0]) if op == "BatchNormalization" else None
        if source is None or readers[inputs[0]] != 1 or inputs[0] == graph_output:
            continue
        if not all(name in constants for name in inputs[1:5]):
            continue
        folded[source] = _folded_conv(nodes[source], node, constants)
        dropped.add(index)
    return [folded.get(index, node) for index, node in enumerate(nodes) if index not in dropped]


def onnx_to_torch(path: str | Path) -> torch.nn.Module:
    """PyTorch module (eval, parameters frozen) computing the same function as the ONNX file.

    The module accepts any batch size, also when the ONNX graph was exported with batch 1. Graphs of
    :data:`NATIVE_OPS` only (SFace) become a :class:`NativeGraph`; the others go through onnx2torch.
    """
    model = load_onnx_model(path)
    native = native_graph(model)
    if native is not None:
        return freeze(native)
    from onnx2torch import convert

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
