"""PyTorch port of dlib's face recognition ResNet (``dlib_face_recognition_resnet_model_v1.dat``).

The network is read from dlib's own serialization by :func:`load_dlib_resnet`; nothing about the
weights' order is assumed beyond what the file says. Given dlib's 150x150 face chips
(``dlib.get_face_chip(img, shape, size=150, padding=0.25)``) it reproduces
``dlib.face_recognition_model_v1.compute_face_descriptor`` to about 1e-6, and it is
differentiable with respect to the chip pixels.

dlib's file format, as read here (integers are a control byte, low nibble = byte count, bit 0x80
= negative, then the bytes little-endian; strings are a length then bytes; floats are a
``(mantissa, exponent)`` integer pair; bools are the characters ``'0'``/``'1'``):

* ``add_loss_layer``: version 1, the loss (``"loss_metric_2"``, margin, distance threshold), then
  the network, outermost layer first.
* The network is nested: each ``add_layer`` writes its version (2; 3 for the layer on top of the
  input layer) and then its *subnetwork* before its own details, so the file holds all versions
  output-to-input, then the input layer, then the layers' details input-to-output. Tag and skip
  layers write only version 1 (their IDs are template arguments and are not stored).
* After its details every ``add_layer`` stores its state: three bools and three tensors (gradient
  and output caches, empty here), plus the sample expansion factor for the version-3 layer.
* Tensors: version 2, ``n, k, nr, nc``, then ``n*k*nr*nc`` float32 little-endian. A layer's
  ``params`` tensor is flat; alias tensors (version 1, ``n, k, nr, nc``) cut it into consecutive
  pieces (convolution filters then biases; affine gamma then beta; fc weights as an
  ``(inputs, outputs)`` row-major matrix then biases).

Because tag/skip IDs are not stored, the markers are resolved by the two residual templates of
dlib's model: ``add_prev1<B<tag1<x>>>`` (marker, B, ``add_prev_``) and
``add_prev2<P<skip1<tag2<B<tag1<x>>>>>>`` (marker, B, marker, marker, P, ``add_prev_``), i.e.
``B(x) + x`` and ``B(x) + P(x)``, where ``add_prev_`` zero-pads the smaller tensor at the end of
the channel, row and column axes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dladiff.faces.model_packs import dlib_model_path

__all__ = [
    "DLIB_MODEL_FILES",
    "DLIB_VERIFICATION_THRESHOLD",
    "RESNET_MODEL_FILE",
    "DlibResNet",
    "dlib_chip_template",
    "load_dlib_resnet",
]

RESNET_MODEL_FILE = "dlib_face_recognition_resnet_model_v1.dat"
DLIB_VERIFICATION_THRESHOLD = 0.6
"""Euclidean distance between dlib descriptors below which two faces are the same person."""

_SPECIAL_EXPONENTS = {32000: math.inf, 32001: -math.inf, 32002: math.nan}



DLIB_MODEL_FILES = (
    RESNET_MODEL_FILE,
    "shape_predictor_5_face_landmarks.dat",
    "shape_predictor_68_face_landmarks.dat",
    "mmod_human_face_detector.dat",
)
"""Names of the model files that ``face_recognition_models`` ships, for :func:`dlib_model_path`."""


class _FormatError(Exception):
    """The bytes do not follow dlib's serialization as this reader understands it."""


class _DlibReader:
    """Sequential reader of dlib's serialization primitives over an in-memory file."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def _take(self, count: int) -> bytes:
        if count < 0:
            raise _FormatError(f"negative length {count} at offset {self.pos}")
        if self.pos + count > len(self.data):
            raise _FormatError(f"truncated: need {count} bytes at offset {self.pos}")
        chunk = self.data[self.pos : self.pos + count]
        self.pos += count
        return chunk

    def integer(self) -> int:
        control = self._take(1)[0]
        size = control & 0x0F
        if size > 8 or control & 0x70:
            raise _FormatError(f"bad integer control byte {control:#04x} at offset {self.pos - 1}")
        value = int.from_bytes(self._take(size), "little")
        return -value if control & 0x80 else value

    def string(self) -> str:
        length = self.integer()
        try:
            return self._take(length).decode("ascii")
        except UnicodeDecodeError as err:
            raise _FormatError(f"non-ASCII string at offset {self.pos - length}") from err

    def floating(self) -> float:
        mantissa, exponent = self.integer(), self.integer()
        if exponent in _SPECIAL_EXPONENTS:
            return _SPECIAL_EXPONENTS[exponent]
        return math.ldexp(mantissa, exponent)

    def boolean(self) -> bool:
        char = self._take(1)
        if char not in (b"0", b"1"):
            raise _FormatError(f"bad bool {char!r} at offset {self.pos - 1}")
        return char == b"1"

    def version(self, expected: int, what: str) -> None:
        found = self.integer()
        if found != expected:
            raise _FormatError(f"{what}: version {found}, expected {expected}")

    def shape(self) -> tuple[int, int, int, int]:
        dims = tuple(self.integer() for _ in range(4))
        if min(dims) < 0:
            raise _FormatError(f"negative tensor dimension {dims}")
        return dims

    def tensor(self) -> np.ndarray:
        """A ``resizable_tensor`` as a float32 array of shape ``(n, k, nr, nc)``."""
        self.version(2, "tensor")
        shape = self.shape()
        count = math.prod(shape)
        return np.frombuffer(self._take(4 * count), dtype="<f4").reshape(shape)

    def alias(self) -> tuple[int, int, int, int]:
        """An ``alias_tensor``: the ``(n, k, nr, nc)`` shape of one piece of a params tensor."""
        self.version(1, "alias_tensor")
        return self.shape()

    def at_end(self) -> bool:
        return self.pos == len(self.data)


@dataclass(frozen=True)
class _Conv:
    weight: np.ndarray  # (out, in, kh, kw)
    bias: np.ndarray  # (out,)
    stride: tuple[int, int]
    padding: tuple[int, int]


@dataclass(frozen=True)
class _Affine:
    gamma: np.ndarray  # (k, nr, nc), broadcast over samples
    beta: np.ndarray


@dataclass(frozen=True)
class _Pool:
    kind: str  # "max" or "avg"
    kernel: tuple[int, int]  # 0 = the whole input along that axis
    stride: tuple[int, int]
    padding: tuple[int, int]


@dataclass(frozen=True)
class _Fc:
    weight: np.ndarray  # (outputs, inputs)
    bias: np.ndarray | None  # (outputs,)


@dataclass(frozen=True)
class _Relu:
    pass


@dataclass(frozen=True)
class _AddPrev:
    pass


@dataclass(frozen=True)
class _Marker:
    """A tag or skip layer (dlib does not store which)."""


_LayerSpec = _Conv | _Affine | _Pool | _Fc | _Relu | _AddPrev | _Marker


@dataclass(frozen=True)
class _NetworkSpec:
    mean_rgb: tuple[float, float, float]  # pixel means subtracted before dividing by 256
    chip_size: tuple[int, int]  # (rows, cols)
    layers: tuple[_LayerSpec, ...]  # input-to-output


def _split_params(
    params: np.ndarray, shapes: Sequence[tuple[int, ...]], what: str
) -> list[np.ndarray]:
    """Cut a flat params tensor into consecutive pieces of the given shapes."""
    flat = params.reshape(-1)
    sizes = [math.prod(shape) for shape in shapes]
    if sum(sizes) != flat.size:
        raise _FormatError(f"{what}: params hold {flat.size} values, pieces need {sum(sizes)}")
    offsets = np.cumsum([0, *sizes])
    pieces = zip(offsets, offsets[1:], shapes)
    return [flat[start:stop].reshape(shape) for start, stop, shape in pieces]


def _read_multipliers(reader: _DlibReader, count: int = 4) -> None:
    for _ in range(count):
        reader.floating()


def _read_conv(reader: _DlibReader) -> _Conv:
    params = reader.tensor()
    filters, rows, cols, stride_y, stride_x, pad_y, pad_x = (reader.integer() for _ in range(7))
    weight_shape, bias_shape = reader.alias(), reader.alias()
    _read_multipliers(reader)
    if weight_shape[0] != filters or weight_shape[2:] != (rows, cols):
        expected = f"{filters}x{rows}x{cols}"
        raise _FormatError(f"con_4: filter shape {weight_shape} disagrees with {expected}")
    weight, bias = _split_params(params, [weight_shape, bias_shape], "con_4")
    return _Conv(weight, bias.reshape(-1), (stride_y, stride_x), (pad_y, pad_x))


def _read_affine(reader: _DlibReader) -> _Affine:
    params = reader.tensor()
    gamma_shape, beta_shape = reader.alias(), reader.alias()
    reader.integer()  # layer mode (conv: per channel; fc: per element), implied by the shapes
    if gamma_shape != beta_shape or gamma_shape[0] != 1:
        raise _FormatError(f"affine_: gamma {gamma_shape} and beta {beta_shape} shapes")
    gamma, beta = _split_params(params, [gamma_shape, beta_shape], "affine_")
    return _Affine(gamma[0], beta[0])


def _read_pool(reader: _DlibReader, kind: str) -> _Pool:
    rows, cols, stride_y, stride_x, pad_y, pad_x = (reader.integer() for _ in range(6))
    return _Pool(kind, (rows, cols), (stride_y, stride_x), (pad_y, pad_x))


def _read_fc(reader: _DlibReader) -> _Fc:
    outputs, inputs = reader.integer(), reader.integer()
    params = reader.tensor()
    weight_shape, bias_shape = reader.alias(), reader.alias()
    has_bias = reader.integer() == 0  # dlib's fc_bias_mode: FC_HAS_BIAS = 0, FC_NO_BIAS = 1
    _read_multipliers(reader)
    if math.prod(weight_shape) != inputs * outputs:
        raise _FormatError(f"fc_2: weight piece {weight_shape} is not {inputs}x{outputs}")
    shapes = [(inputs, outputs)] + ([(outputs,)] if has_bias else [])
    if not has_bias and math.prod(bias_shape):
        raise _FormatError("fc_2: a bias piece in a layer without bias")
    pieces = _split_params(params, shapes, "fc_2")
    return _Fc(np.ascontiguousarray(pieces[0].T), pieces[1] if has_bias else None)


_LAYER_READERS = {
    "con_4": _read_conv,
    "affine_": _read_affine,
    "relu_": lambda reader: _Relu(),
    "add_prev_": lambda reader: _AddPrev(),
    "max_pool_2": lambda reader: _read_pool(reader, "max"),
    "avg_pool_2": lambda reader: _read_pool(reader, "avg"),
    "fc_2": _read_fc,
}


def _read_layer_details(reader: _DlibReader) -> _LayerSpec:
    name = reader.string()
    if name not in _LAYER_READERS:
        raise _FormatError(f"unsupported layer {name!r} at offset {reader.pos}")
    return _LAYER_READERS[name](reader)


def _skip_layer_state(reader: _DlibReader, on_input: bool) -> None:
    """Read past an ``add_layer``'s state: 3 bools, 3 cache tensors (+ sample expansion factor)."""
    for _ in range(3):
        reader.boolean()
    for _ in range(3):
        reader.tensor()
    if on_input:
        reader.integer()


def _read_loss(reader: _DlibReader) -> None:
    reader.version(1, "add_loss_layer")
    name = reader.string()
    if name != "loss_metric_2":
        raise _FormatError(f"loss {name!r}, expected 'loss_metric_2'")
    reader.floating()  # margin
    reader.floating()  # distance threshold


def _read_nesting(reader: _DlibReader) -> list[bool]:
    """Versions of the nested layers, output-to-input: True for computational layers, False for
    tag/skip markers; ends at the layer on top of the input layer (version 3)."""
    computational = []
    while True:
        version = reader.integer()
        if version not in (1, 2, 3):
            raise _FormatError(f"layer version {version} at offset {reader.pos}")
        computational.append(version != 1)
        if version == 3:
            return computational


def _read_input_layer(reader: _DlibReader) -> tuple[tuple[float, float, float], tuple[int, int]]:
    name = reader.string()
    if name != "input_rgb_image_sized":
        raise _FormatError(f"input layer {name!r}, expected 'input_rgb_image_sized'")
    mean = (reader.floating(), reader.floating(), reader.floating())
    return mean, (reader.integer(), reader.integer())


def _parse_network(data: bytes) -> _NetworkSpec:
    reader = _DlibReader(data)
    _read_loss(reader)
    nesting = _read_nesting(reader)
    mean_rgb, chip_size = _read_input_layer(reader)
    layers: list[_LayerSpec] = []
    for depth, computational in enumerate(reversed(nesting)):
        if not computational:
            layers.append(_Marker())
            continue
        layers.append(_read_layer_details(reader))
        _skip_layer_state(reader, on_input=depth == 0)
    if not reader.at_end():
        raise _FormatError(f"{len(data) - reader.pos} trailing bytes after the network")
    return _NetworkSpec(mean_rgb, chip_size, tuple(layers))


@functools.lru_cache(maxsize=4)
def _parse_network_file(path: Path, mtime_ns: int, size: int) -> _NetworkSpec:
    """Parsed network of ``path``; ``mtime_ns`` and ``size`` key the cache on the file's version."""
    try:
        return _parse_network(path.read_bytes())
    except _FormatError as err:
        raise ValueError(f"{path}: not a dlib face recognition ResNet file ({err})") from None


class _Affine2d(nn.Module):
    """dlib's ``affine_`` (frozen batch norm): ``gamma * x + beta``, gamma/beta ``(k, nr, nc)``."""

    def __init__(self, gamma: Tensor, beta: Tensor):
        super().__init__()
        self.gamma = nn.Parameter(gamma)
        self.beta = nn.Parameter(beta)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma + self.beta


class _Pool2d(nn.Module):
    """dlib's ``max_pool_``/``avg_pool_``; a kernel size of 0 pools the whole axis."""

    def __init__(self, spec: _Pool):
        super().__init__()
        self.spec = spec

    def extra_repr(self) -> str:
        spec = self.spec
        return f"{spec.kind}, kernel={spec.kernel}, stride={spec.stride}, padding={spec.padding}"

    def forward(self, x: Tensor) -> Tensor:
        kernel = tuple(k or size for k, size in zip(self.spec.kernel, x.shape[-2:]))
        if self.spec.kind == "max":
            return F.max_pool2d(x, kernel, self.spec.stride, self.spec.padding)
        return F.avg_pool2d(x, kernel, self.spec.stride, self.spec.padding, count_include_pad=False)


class _Linear(nn.Module):
    """dlib's ``fc_``: flattens ``(N, k, nr, nc)`` in that order and applies ``x @ W.T + b``."""

    def __init__(self, weight: Tensor, bias: Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.flatten(1), self.weight, self.bias)


def _pad_to(x: Tensor, channels: int, rows: int, cols: int) -> Tensor:
    """Zero-pad ``(N, C, H, W)`` at the end of the channel, row and column axes."""
    return F.pad(x, (0, cols - x.shape[3], 0, rows - x.shape[2], 0, channels - x.shape[1]))


class _Residual(nn.Module):
    """``main(x) + shortcut(x)`` with dlib's ``add_prev_`` zero-padding of the smaller tensor."""

    def __init__(self, main: nn.Sequential, shortcut: nn.Sequential):
        super().__init__()
        self.main = main
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.main(x), self.shortcut(x)
        if a.shape == b.shape:
            return a + b
        channels, rows, cols = (max(m, n) for m, n in zip(a.shape[1:], b.shape[1:]))
        return _pad_to(a, channels, rows, cols) + _pad_to(b, channels, rows, cols)


def _tensor(array: np.ndarray) -> Tensor:
    return torch.tensor(array, dtype=torch.float32)


def _make_layer(spec: _LayerSpec) -> nn.Module:
    if isinstance(spec, _Conv):
        out_channels, in_channels, kh, kw = spec.weight.shape
        conv = nn.Conv2d(
            in_channels, out_channels, (kh, kw), spec.stride, spec.padding, device="meta"
        )
        conv.weight = nn.Parameter(_tensor(spec.weight))
        conv.bias = nn.Parameter(_tensor(spec.bias))
        return conv
    if isinstance(spec, _Affine):
        return _Affine2d(_tensor(spec.gamma), _tensor(spec.beta))
    if isinstance(spec, _Pool):
        return _Pool2d(spec)
    if isinstance(spec, _Fc):
        return _Linear(_tensor(spec.weight), None if spec.bias is None else _tensor(spec.bias))
    if isinstance(spec, _Relu):
        return nn.ReLU()
    raise _FormatError(f"{type(spec).__name__} outside a residual unit")


def _take_plain(layers: Sequence[_LayerSpec], start: int) -> tuple[nn.Sequential, int]:
    """Modules of ``layers[start:]`` up to the next marker or ``add_prev_``, and that index."""
    end = start
    while end < len(layers) and not isinstance(layers[end], (_Marker, _AddPrev)):
        end += 1
    if end == len(layers):
        raise _FormatError("a residual unit without add_prev_")
    return nn.Sequential(*(_make_layer(spec) for spec in layers[start:end])), end


def _fold_affines(layers: Sequence[_LayerSpec]) -> list[_LayerSpec]:
    """``layers`` with each per-channel ``affine_`` that follows a ``con_`` folded into it.

    γ·(W∗x + b) + β = (γW)∗x + (γb + β): one convolution instead of a convolution and an affine
    layer, forward and backward; computed in float64, equal to the unfolded pair to float32 rounding.
    """
    out: list[_LayerSpec] = []
    for spec in layers:
        previous = out[-1] if out else None
        if isinstance(spec, _Affine) and isinstance(previous, _Conv) and spec.gamma.shape[1:] == (1, 1):
            gamma, beta = spec.gamma.reshape(-1).astype(np.float64), spec.beta.reshape(-1).astype(np.float64)
            weight = (previous.weight.astype(np.float64) * gamma[:, None, None, None]).astype(np.float32)
            bias = (previous.bias.astype(np.float64) * gamma + beta).astype(np.float32)
            out[-1] = dataclasses.replace(previous, weight=weight, bias=bias)
        else:
            out.append(spec)
    return out


def _make_residual(layers: Sequence[_LayerSpec], start: int) -> tuple[_Residual, int]:
    """The residual unit whose opening marker is at ``start - 1``; returns it and the next index."""
    main, end = _take_plain(layers, start)
    if isinstance(layers[end], _AddPrev):
        return _Residual(main, nn.Sequential()), end + 1
    if end + 1 >= len(layers) or not isinstance(layers[end + 1], _Marker):
        raise _FormatError("a tag inside a residual unit not followed by a skip")
    shortcut, end = _take_plain(layers, end + 2)
    if not isinstance(layers[end], _AddPrev):
        raise _FormatError("nested tag/skip layers in a residual shortcut")
    return _Residual(main, shortcut), end + 1


def _assemble(layers: Sequence[_LayerSpec]) -> nn.Sequential:
    """The module chain of an input-to-output layer list, markers resolved into residual units."""
    modules, index = [], 0
    while index < len(layers):
        if isinstance(layers[index], _Marker):
            module, index = _make_residual(layers, index + 1)
        else:
            module, index = _make_layer(layers[index]), index + 1
        modules.append(module)
    return nn.Sequential(*modules)


class DlibResNet(nn.Module):
    """dlib's face recognition network: ``(N, 3, 150, 150)`` RGB chips in 0..255 -> ``(N, 128)``.

    The descriptors are not normalized (exactly like dlib's); compare them by Euclidean distance
    against :data:`DLIB_VERIFICATION_THRESHOLD`. Build it with :func:`load_dlib_resnet`.
    """

    def __init__(self, body: nn.Sequential, mean_rgb: Sequence[float], chip_size: tuple[int, int]):
        super().__init__()
        self.body = body
        self.chip_size = tuple(chip_size)
        mean = torch.tensor(mean_rgb, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("mean_rgb", mean)

    def forward(self, chips: Tensor) -> Tensor:
        if chips.ndim != 4 or chips.shape[1] != 3 or tuple(chips.shape[2:]) != self.chip_size:
            rows, cols = self.chip_size
            raise ValueError(f"expected chips (N, 3, {rows}, {cols}), got {tuple(chips.shape)}")
        return self.body((chips - self.mean_rgb) / 256.0)


def load_dlib_resnet(path: str | Path | None = None) -> DlibResNet:
    """:class:`DlibResNet` read from dlib's ``.dat`` file (default: the installed
    ``face_recognition_models`` copy), in eval mode with frozen parameters.

    The parsed file is cached per path, so later loads only build the module. Raises ``ValueError``
    naming the file if it is not a dlib network of the expected format.
    """
    path = Path(path) if path is not None else dlib_model_path(RESNET_MODEL_FILE)
    path = path.resolve()
    stat = path.stat()
    spec = _parse_network_file(path, stat.st_mtime_ns, stat.st_size)
    try:
        body = _assemble(_fold_affines(spec.layers))
    except _FormatError as err:
        raise ValueError(f"{path}: unexpected dlib network structure ({err})") from None
    model = DlibResNet(body, spec.mean_rgb, spec.chip_size)
    model.requires_grad_(False)
    return model.eval()


# Points of dlib's mean face (``get_face_chip_details``, dlib/image_transforms/interpolation.h),
# in units of the unpadded face box, keyed by 68-point landmark index.
_MEAN_FACE_POINTS = {
    30: (0.490127, 0.515625),
    36: (0.121737, 0.216423),
    37: (0.187122, 0.178758),
    38: (0.265825, 0.179852),
    39: (0.334606, 0.231733),
    40: (0.260918, 0.245099),
    41: (0.182743, 0.244077),
    42: (0.645647, 0.231733),
    43: (0.714428, 0.179852),
    44: (0.793132, 0.178758),
    45: (0.858516, 0.216423),
    46: (0.79751, 0.244077),
    47: (0.719335, 0.245099),
    48: (0.254149, 0.780233),
    54: (0.726104, 0.780233),
}
_FIVE_POINT_GROUPS = (range(36, 42), range(42, 48), (30,), (48,), (54,))


def dlib_chip_template(size: int = 150, padding: float = 0.25) -> np.ndarray:
    """``(5, 2)`` float64 pixel positions (x, y) in dlib's ``size`` x ``size`` face chip of: left
    eye centre (mean of 68-point landmarks 36-41, the eye with the smaller x), right eye centre
    (42-47), nose tip (30), left mouth corner (48), right mouth corner (54).

    Derived from dlib's mean-face constants: ``get_face_chip_details`` fits the similarity that
    maps the mean face, placed at ``(padding + m) / (1 + 2 padding) * size``, onto the landmarks.
    Measured through ``dlib.extract_image_chip`` on coordinate images, dlib's chip then centres
    that fit's ``(size/2, size/2)`` on pixel ``((size-1)/2, (size-1)/2)`` and scales about it by
    ``s = L (size-1) / (size L - 1)`` (``L`` = image pixels per chip pixel), to 2e-6 px. This
    template takes ``s = 1`` (a 0.5 px shift); for ``L >= 0.5`` the scale moves the points by at
    most 0.25 px. Real faces' landmarks scatter around it by pose (RMS 8.4 px, max 19.5 px, over
    the 7 faces of insightface's ``t1.jpg`` and ``skimage.data.astronaut()``).
    """
    points = np.array(
        [np.mean([_MEAN_FACE_POINTS[i] for i in group], axis=0) for group in _FIVE_POINT_GROUPS]
    )
    return (padding + points) / (1 + 2 * padding) * size - 0.5
