"""One safetensors file, read and written one tensor at a time with plain file I/O.

Why not keep the files memory-mapped: pages of a mapping stay resident in the process (and count in its RSS)
until the mapping is closed, so streaming four 2 GB checkpoints through `safe_open` ends with ~8 GB resident.
Here the header is parsed and validated by the safetensors library itself (`safe_open`), and each tensor is then
read with one positional read straight into a fresh torch tensor: the page cache still serves repeated reads,
and the process holds only the tensors it is working on.

The writer streams too: the caller declares every (name, dtype, shape) up front, the header is written first,
then the tensors' bytes in that order, so a shard never has to be assembled in memory.
"""
from __future__ import annotations

import json
import os
import math
import struct
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from pymerge.io.errors import CheckpointError

DTYPES: Dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be stored in safetensors") from None


def nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


class SafetensorsFile:
    """Header of one .safetensors file; `read(name)` loads one tensor. Cheap to open, holds no data."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: file not found")
        if not os.access(self.path, os.R_OK):
            raise PermissionError(f"{self.path}: file is not readable (permission denied)")
        # Let the library validate the header (JSON, dtypes, offsets contiguous and covering the whole file,
        # so a truncated or padded file is caught here, before any tensor is used).
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt") as f:
                self.metadata: Dict[str, str] = dict(f.metadata() or {})
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{self.path}: not a valid safetensors file (truncated or corrupt?): {exc}") from exc
        with open(self.path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        self._data_start = 8 + header_len
        header.pop("__metadata__", None)
        self.entries: Dict[str, Tuple[torch.dtype, Tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            if info["dtype"] not in DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']}")
            begin, end = info["data_offsets"]
            self.entries[name] = (DTYPES[info["dtype"]], tuple(info["shape"]), begin, end)

    def keys(self) -> List[str]:
        return list(self.entries)

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][0]

    def shape(self, name: str) -> Tuple[int, ...]:
        return self.entries[name][1]

    def read(self, name: str, rows: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """The tensor, or rows [start, stop) of its first dimension (a contiguous byte range on disk)."""
        dtype, shape, begin, end = self.entries[name]
        if rows is not None:
            start, stop = rows
            row_bytes = (end - begin) // shape[0] if shape and shape[0] else 0
            shape = (stop - start,) + tuple(shape[1:])
            begin, end = begin + start * row_bytes, begin + stop * row_bytes
        out = torch.empty(shape, dtype=dtype)
        if end > begin:
            buf = memoryview(out.view(-1).view(torch.uint8).numpy())
            with open(self.path, "rb", buffering=0) as f:
                f.seek(self._data_start + begin)
                got = 0
                while got < len(buf):  # readinto may return short counts for very large reads
                    n = f.readinto(buf[got:])
                    if not n:
                        raise CheckpointError(f"{self.path}: file ended while reading tensor {name!r}")
                    got += n
        return out


    def read_elements(self, name: str, flat_indices: Sequence[int]) -> torch.Tensor:
        """Elements of the flattened tensor at `flat_indices`, one small positional read each (fingerprints)."""
        dtype, shape, begin, end = self.entries[name]
        size = torch.empty((), dtype=dtype).element_size()
        out = torch.empty(len(flat_indices), dtype=dtype)
        buf = out.view(torch.uint8).numpy()
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for j, i in enumerate(flat_indices):
                at = self._data_start + begin + int(i) * size
                chunk = os.pread(fd, size, at)
                if len(chunk) != size or at + size > self._data_start + end:
                    raise CheckpointError(f"{self.path}: file ended while reading tensor {name!r}")
                buf[j * size:(j + 1) * size] = memoryview(chunk)
        finally:
            os.close(fd)
        return out


class SafetensorsStreamWriter:
    """Writes a safetensors file whose tensors are declared up front and then written one by one, in order."""

    def __init__(self, path, entries: Sequence[Tuple[str, torch.dtype, Sequence[int]]],
                 metadata: Optional[Mapping[str, str]] = None):
        self.path = Path(path)
        header: Dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        self._order: List[Tuple[str, torch.dtype, Tuple[int, ...]]] = []
        for name, dtype, shape in entries:
            size = nbytes(dtype, shape)
            header[name] = {"dtype": dtype_name(dtype), "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._order.append((name, dtype, tuple(shape)))
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes with spaces
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self._next = 0
        self._written = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next declared tensor, whole or as consecutive row chunks (dim 0) in several calls."""
        if self._next >= len(self._order):
            raise RuntimeError(f"{self.path}: tensor {name!r} was not declared")
        want_name, want_dtype, want_shape = self._order[self._next]
        chunk_ok = (len(want_shape) >= 1 and tensor.dim() == len(want_shape)
                    and tuple(tensor.shape[1:]) == want_shape[1:])
        if name != want_name or tensor.dtype != want_dtype or not (tuple(tensor.shape) == want_shape or chunk_ok):
            raise RuntimeError(
                f"{self.path}: expected tensor {want_name!r} {want_dtype} {want_shape} next, "
                f"got {name!r} {tensor.dtype} {tuple(tensor.shape)}")
        t = tensor.detach().to("cpu").contiguous()
        if t.numel():
            self._file.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
        # progress is counted in rows, so zero-size tensors written in chunks end where they should
        self._written += t.shape[0] if want_shape else 1
        total = want_shape[0] if want_shape else 1
        if self._written > total:
            raise RuntimeError(f"{self.path}: more rows than declared for tensor {name!r}")
        if self._written == total:
            self._next += 1
            self._written = 0

    def close(self) -> None:
        if self._file.closed:
            return
        self._file.close()
        if self._next != len(self._order):
            raise RuntimeError(f"{self.path}: closed after {self._next} of {len(self._order)} tensors")

    def abort(self) -> None:
        self._file.close()
