"""Minimal safetensors reader/writer on numpy memory maps (bfloat16 via ml_dtypes, no torch).

Reading is lazy: :meth:`SafeTensorsFile.get` returns a memory-mapped view, so slicing one shard of a
tensor touches only those bytes. Format: 8-byte little-endian header size, a JSON header
``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}``, then the data.
"""

from __future__ import annotations

import json
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
    pass


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
            try:
                header = json.loads(f.read(n))
            except json.JSONDecodeError as e:
                raise SafeTensorsError(f"{path}: corrupt safetensors header ({e})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self.header = header
        self._offset = 8 + n
        self._mm = np.memmap(path, dtype=np.uint8, mode="r") if size > self._offset else np.zeros((0,), np.uint8)
        for name, info in header.items():
            if info["dtype"] not in DTYPES:
                raise SafeTensorsError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
            b, e = info["data_offsets"]
            want = int(np.prod(info["shape"], dtype=np.int64)) * np.dtype(DTYPES[info["dtype"]]).itemsize
            if e - b != want or self._offset + e > size:
                raise SafeTensorsError(f"{path}: tensor {name} has inconsistent data offsets (file truncated?)")

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
