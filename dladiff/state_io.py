"""Run-state files that hold only tensors and plain data: safetensors with a JSON tree, never pickle.

A state is a tree of dicts, lists, tuples, ``None``, bools, ints, floats, strings and tensors (an
optimizer's ``state_dict``, a ``torch.Generator`` state, δ, a history). It is stored as one safetensors
file: every tensor is an entry named by its path in the tree, and the header's metadata holds

* ``format`` / ``version`` / ``kind`` — what the file is (a layer-1 checkpoint, a layer-1 result, ...);
* ``tree`` — the tree as JSON, each tensor replaced by ``{"$tensor": name}``, tuples by ``{"$tuple": [...]}``
  and dicts with non-string keys by ``{"$dict": [[key, value], ...]}``;
* ``crc32`` — a CRC-32 of the tree JSON followed by the bytes of every tensor in tree order.

Writing streams one tensor at a time to a temporary file (host memory: the largest tensor, not the
whole state), then fsyncs and renames it (:func:`dladiff.data.atomic_write`). Reading parses the
header (no code runs), checks kind, entries and CRC, and raises :class:`StateFileError` naming the
file when anything is off: a foreign, truncated or damaged file is refused, never half-used.
"""

from __future__ import annotations

import json
import struct
import sys
import zlib
from pathlib import Path

import torch

from dladiff.data import atomic_write
from dladiff.errors import DladiffError

FORMAT, VERSION = "dladiff-state", "1"
_CRC_PLACEHOLDER = "00000000"
_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


class StateFileError(DladiffError):
    """A state file is not a readable dladiff state of the expected kind (foreign, truncated or damaged)."""


def _join(path: str, key) -> str:
    return f"{path}/{key}" if path else str(key)


def _encode(value, path: str, tensors: dict[str, torch.Tensor]):
    """The JSON form of ``value``; its tensors are collected into ``tensors`` under their tree path."""
    if isinstance(value, torch.Tensor):
        name = path or "tensor"
        if name in tensors:
            name = f"{name}#{len(tensors)}"
        tensors[name] = value
        return {"$tensor": name}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        items = [_encode(v, _join(path, i), tensors) for i, v in enumerate(value)]
        return {"$tuple": items} if isinstance(value, tuple) else items
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: _encode(v, _join(path, k), tensors) for k, v in value.items()}
        return {"$dict": [[_encode(k, "", tensors), _encode(v, _join(path, k), tensors)] for k, v in value.items()]}
    raise TypeError(f"a state file holds tensors and plain data only, not {type(value).__name__} (at {path or 'top'})")


def _decode(value, tensors: dict[str, torch.Tensor], order: list[str]):
    """Inverse of :func:`_encode`; ``order`` collects the tensor names in tree order."""
    if isinstance(value, list):
        return [_decode(v, tensors, order) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1 and "$tensor" in value:
        order.append(value["$tensor"])
        return tensors[value["$tensor"]]
    if len(value) == 1 and "$tuple" in value:
        return tuple(_decode(v, tensors, order) for v in value["$tuple"])
    if len(value) == 1 and "$dict" in value:
        return {_decode(k, tensors, order): _decode(v, tensors, order) for k, v in value["$dict"]}
    if any(k.startswith("$") for k in value):
        raise ValueError(f"unknown entry {sorted(value)}")
    return {k: _decode(v, tensors, order) for k, v in value.items()}


def _cpu_bytes(tensor: torch.Tensor):
    """The tensor's bytes as a contiguous CPU buffer (one tensor at a time: no copy of the whole state)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy()


def _write(tmp: Path, kind: str, tree_json: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write a safetensors file: header with a CRC placeholder, data streamed, then the CRC filled in."""
    header: dict = {"__metadata__": {"crc32": _CRC_PLACEHOLDER, "format": FORMAT, "version": VERSION,
                                     "kind": kind, "tree": tree_json}}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _DTYPES:
            raise TypeError(f"a state file cannot hold {t.dtype} tensors ({name})")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    crc_at = 8 + raw.index(f'"crc32":"{_CRC_PLACEHOLDER}"'.encode()) + len('"crc32":"')
    crc = zlib.crc32(tree_json.encode("utf-8"))
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors.values():
            data = _cpu_bytes(t)
            crc = zlib.crc32(data, crc)
            f.write(memoryview(data))
        f.seek(crc_at)
        f.write(f"{crc:08x}".encode())


def save_state(state: dict, path: Path, kind: str, keep_previous: Path | None = None) -> None:
    """Write ``state`` (tensors and plain data) to ``path`` atomically; see the module docstring.

    ``keep_previous``: the file being replaced is kept under this name (a fallback checkpoint).
    """
    if sys.byteorder != "little":
        raise DladiffError("state files are little-endian; this machine is not")
    tensors: dict[str, torch.Tensor] = {}
    tree_json = json.dumps(_encode(state, "", tensors), separators=(",", ":"))
    atomic_write(Path(path), lambda tmp: _write(tmp, kind, tree_json, tensors), keep_previous=keep_previous)


def read_state(path: Path, kind: str) -> dict:
    """The state in ``path`` (tensors on the CPU); :class:`StateFileError` if it is not a sound ``kind`` file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError("not a dladiff state file")
            if meta.get("version") != VERSION or meta.get("kind") != kind:
                raise ValueError(f"a {meta.get('kind')!r} file of version {meta.get('version')}, not a {kind!r} file of version {VERSION}")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        order: list[str] = []
        state = _decode(json.loads(meta["tree"]), tensors, order)
        if sorted(order) != sorted(tensors):
            raise ValueError("its tensors do not match its contents list")
        crc = zlib.crc32(meta["tree"].encode("utf-8"))
        for name in order:
            crc = zlib.crc32(_cpu_bytes(tensors[name]), crc)
        if f"{crc:08x}" != meta.get("crc32"):
            raise ValueError("checksum mismatch")
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise StateFileError(f"{path}: not a readable dladiff {kind} file ({exc}); it is damaged or was not written "
                             f"by dladiff, so it is not used") from None
    if not isinstance(state, dict):
        raise StateFileError(f"{path}: not a readable dladiff {kind} file (no state in it); it is not used")
    return state
