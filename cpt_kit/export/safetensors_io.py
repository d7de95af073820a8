"""Read and write safetensors files one tensor at a time, so a shard never is in memory whole.

`Reader` reads each tensor with a plain file read into its own buffer (safe_open memory-maps
the file, and every page it touches stays resident and counts against the process until the
file is closed: a whole shard). `write_safetensors` writes the header (names, dtypes, shapes,
offsets, all known before any data is computed), then calls each entry's `produce()` in turn,
writes its bytes and drops it. The format is safetensors' own: 8-byte little-endian header
length, JSON header, tensor bytes.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Callable, NamedTuple

CODES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "float64": "F64", "int64": "I64",
         "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
         "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}


class Entry(NamedTuple):
    name: str
    dtype: str
    """safetensors dtype code (BF16, F16, F32, ...)."""
    shape: tuple[int, ...]
    produce: Callable[[], object]
    """Returns the tensor (any dtype; cast to `dtype` on write)."""


def torch_dtype(code: str):
    import torch
    return getattr(torch, next(name for name, c in CODES.items() if c == code))


class Reader:
    """A safetensors file opened for reading single tensors: `keys()`, `meta(name)`, `get_tensor(name)`."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = open(self.path, "rb")
        (length,) = struct.unpack("<Q", self._file.read(8))
        self.header = json.loads(self._file.read(length))
        self.header.pop("__metadata__", None)
        self._data = 8 + length

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def keys(self) -> list[str]:
        return list(self.header)

    def meta(self, name: str) -> tuple[str, tuple[int, ...]]:
        return self.header[name]["dtype"], tuple(self.header[name]["shape"])

    def get_tensor(self, name: str):
        import torch

        info = self.header[name]
        begin, end = info["data_offsets"]
        dtype = torch_dtype(info["dtype"])
        if end == begin:
            return torch.empty(info["shape"], dtype=dtype)
        buffer = bytearray(end - begin)
        self._file.seek(self._data + begin)
        if self._file.readinto(buffer) != len(buffer):
            raise ValueError(f"{self.path} is truncated (tensor {name})")
        return torch.frombuffer(buffer, dtype=dtype).reshape(info["shape"])


def write_safetensors(path: Path, entries: list[Entry], metadata: dict[str, str] | None = None) -> int:
    """Write `entries` to `path`; returns the number of tensor bytes."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for entry in entries:
        size = math.prod(entry.shape) * torch_dtype(entry.dtype).itemsize
        header[entry.name] = {"dtype": entry.dtype, "shape": list(entry.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(blob)))
        handle.write(blob)
        for entry in entries:
            tensor = entry.produce().to(torch_dtype(entry.dtype)).contiguous()
            if tuple(tensor.shape) != tuple(entry.shape):
                raise ValueError(f"{entry.name}: produced shape {tuple(tensor.shape)}, planned {entry.shape}")
            if tensor.numel():
                handle.write(tensor.reshape(-1).view(__import__("torch").uint8).numpy().data)
            del tensor
    return offset
