"""Minimal safetensors reader/writer on numpy memory maps (bfloat16 via ml_dtypes, no torch).

Reading is lazy: :meth:`SafeTensorsFile.get` returns a memory-mapped view, so slicing one shard of a
tensor touches only those bytes. Format: 8-byte little-endian header size, a JSON header
``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}``, then the data.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Mapping

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
CODES = {np.dtype(v): k for k, v in DTYPES.items()}


class SafeTensorsError(ValueError):
    """A safetensors file is missing, corrupt, or holds a tensor of the wrong kind (the message names the file)."""


FLOAT_CODES = tuple(k for k, v in DTYPES.items() if np.dtype(v).kind == "f" or v is ml_dtypes.bfloat16)


def _no_duplicates(pairs) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        names = [k for k, _ in pairs]
        raise ValueError(f"duplicate name {next(k for k in names if names.count(k) > 1)!r}")
    return d


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_header(header, path: str, data_size: int) -> dict:
    """Check a parsed safetensors header fully and return its tensor entries (``__metadata__`` removed).

    Every entry is an object with ``dtype`` (one of :data:`DTYPES`), ``shape`` (a list of integers >= 0) and
    ``data_offsets`` ``[begin, end]`` (integers, ``0 <= begin <= end <= data_size``, ``end - begin`` = the
    dtype size times the element count); the tensors tile the data exactly (no overlap, no gap, nothing
    after the last: the official reader's rule). :class:`SafeTensorsError` naming ``path`` and the tensor
    otherwise."""
    if not isinstance(header, dict):
        raise SafeTensorsError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
    meta = header.get("__metadata__", {})
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise SafeTensorsError(f"{path}: corrupt safetensors header (__metadata__ is not an object of strings)")
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue

        def bad(what):
            return SafeTensorsError(f"{path}: tensor '{name}': {what}")

        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise bad("header entry must be an object with dtype, shape and data_offsets")
        if info["dtype"] not in DTYPES:
            raise bad(f"unsupported dtype {info['dtype']!r} (supported: {', '.join(DTYPES)})")
        shape, offs = info["shape"], info["data_offsets"]
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise bad(f"shape must be a list of integers >= 0, got {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs)):
            raise bad(f"data_offsets must be [begin, end] integers, got {offs!r}")
        b, e = offs
        if not 0 <= b <= e:
            raise bad(f"data_offsets {offs} must satisfy 0 <= begin <= end")
        if e > data_size:
            raise bad(f"data_offsets {offs} run past the end of the data ({data_size} bytes; file truncated?)")
        want = math.prod(shape) * np.dtype(DTYPES[info["dtype"]]).itemsize
        if e - b != want:
            raise bad(f"data_offsets {offs} hold {e - b} bytes, but {info['dtype']} {shape} needs {want}")
        if e > b:   # empty tensors overlap nothing
            spans.append((b, e, name))
    spans.sort()
    end, prev = 0, None
    for b, e, name in spans:
        if b < end:
            raise SafeTensorsError(f"{path}: tensors '{prev}' and '{name}' overlap in the data")
        if b > end:
            raise SafeTensorsError(f"{path}: {b - end} bytes of the data before tensor '{name}' belong to no tensor")
        end, prev = e, name
    if end != data_size:   # what the official reader checks too: a shifted header length would land here
        raise SafeTensorsError(f"{path}: the tensors cover {end} bytes of data, the file holds {data_size}")
    return {k: v for k, v in header.items() if k != "__metadata__"}


class SafeTensorsFile:
    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise SafeTensorsError(f"missing file: {path}")
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafeTensorsError(f"{path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise SafeTensorsError(f"{path}: corrupt safetensors header (size {n} > file size {size})")
            raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except UnicodeDecodeError as e:
            raise SafeTensorsError(f"{path}: corrupt safetensors header (not UTF-8: {e.reason} at byte "
                                   f"{e.start})") from None
        except (ValueError, RecursionError) as e:
            raise SafeTensorsError(f"{path}: corrupt safetensors header ({type(e).__name__}: {e})") from None
        self._offset = 8 + n
        self.header = check_header(header, path, size - self._offset)
        self.metadata = header.get("__metadata__") or {}
        self._mm = np.memmap(path, dtype=np.uint8, mode="r") if size > self._offset else np.zeros((0,), np.uint8)

    def require_float(self, name: str) -> None:
        """Refuse a tensor whose dtype is not a float (e.g. I32 where weights are expected: a cast would be
        silent garbage); :class:`SafeTensorsError` names the file and the tensor."""
        code = self.header[name]["dtype"]
        if code not in FLOAT_CODES:
            raise SafeTensorsError(f"{self.path}: tensor '{name}' has dtype {code}; expected a float dtype "
                                   f"({', '.join(FLOAT_CODES)})")

    def keys(self):
        return list(self.header.keys())

    def __contains__(self, name: str) -> bool:
        return name in self.header

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(DTYPES[self.header[name]["dtype"]])

    def get(self, name: str) -> np.ndarray:
        """Read-only memory-mapped view of a tensor."""
        info = self.header[name]
        b, e = info["data_offsets"]
        raw = self._mm[self._offset + b:self._offset + e]
        return raw.view(DTYPES[info["dtype"]]).reshape(info["shape"])


def load_file(path: str) -> dict[str, np.ndarray]:
    f = SafeTensorsFile(path)
    return {k: np.array(f.get(k)) for k in f.keys()}


def save_file(tensors: Mapping[str, np.ndarray], path: str, metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors (numpy, incl. ml_dtypes.bfloat16) to a safetensors file (written atomically)."""
    header, offset, arrays = {}, 0, []
    for name in sorted(tensors):
        a = np.ascontiguousarray(np.asarray(tensors[name]))
        if a.dtype not in CODES:
            raise SafeTensorsError(f"tensor {name}: dtype {a.dtype} cannot be stored")
        header[name] = {"dtype": CODES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays:
            f.write(a.tobytes())
    os.replace(tmp, path)
