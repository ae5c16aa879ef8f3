"""Safetensors files: a validating header reader, zero-copy mmap views, header planning.

The file is `u64 little-endian header length | JSON header | tensor bytes`. The header maps each
name to {dtype, shape, data_offsets: [begin, end]} relative to the start of the tensor bytes, plus
an optional "__metadata__" object of strings. Tensor bytes are contiguous: no gaps, no overlaps,
together exactly the rest of the file. The header may end in spaces, which llamafuse uses to start
the tensor bytes on a 64-byte boundary. Headers are untrusted input: everything is checked.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from .errors import LlamafuseError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
    "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
SAFETENSORS_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024
DATA_ALIGN = 64  # the header is padded so that the tensor bytes start on this boundary


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    end: int    # absolute file offset one past the last byte

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate the header of `path`; returns (tensors in file order, metadata)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise LlamafuseError(f"{path}: truncated (no safetensors header)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or 8 + n > size:
                raise LlamafuseError(f"{path}: header length {n} is impossible for a {size}-byte file")
            blob = f.read(n)
    except OSError as e:
        raise LlamafuseError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(blob)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise LlamafuseError(f"{path}: safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise LlamafuseError(f"{path}: safetensors header is not a JSON object")
    meta = header.pop("__metadata__", {}) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise LlamafuseError(f"{path}: __metadata__ must map names to strings")
    data_start, data_size = 8 + n, size - 8 - n
    infos: list[TensorInfo] = []
    for name, entry in header.items():
        where = f"{path}: tensor '{name}'"
        if not isinstance(entry, dict) or entry.get("dtype") not in SAFETENSORS_DTYPES:
            raise LlamafuseError(f"{where}: missing or unknown dtype")
        shape, offs = entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise LlamafuseError(f"{where}: bad shape {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)):
            raise LlamafuseError(f"{where}: bad data_offsets {offs!r}")
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        numel = 1
        for s in shape:
            numel *= s
        b, end = offs
        if not 0 <= b <= end or end - b != numel * dtype.itemsize:
            raise LlamafuseError(f"{where}: data_offsets {offs} do not match shape {shape} and dtype {entry['dtype']}")
        if end > data_size:
            raise LlamafuseError(f"{where}: data ends at byte {data_start + end} but the file has {size} bytes (truncated?)")
        infos.append(TensorInfo(name, dtype, tuple(shape), data_start + b, data_start + end))
    infos.sort(key=lambda t: (t.begin, t.end))
    pos = data_start
    for t in infos:
        if t.begin != pos:
            what = "overlaps the tensor before it" if t.begin < pos else f"leaves a gap of {t.begin - pos} bytes before it"
            raise LlamafuseError(f"{path}: tensor '{t.name}' {what} (safetensors data must be contiguous)")
        pos = t.end
    if pos != size:
        raise LlamafuseError(f"{path}: {size - pos} bytes after the last tensor (safetensors data must be contiguous)")
    return {t.name: t for t in infos}, meta


class MappedFile:
    """A read-only memory map of a safetensors file with zero-copy tensor views."""

    def __init__(self, path: Path, header: tuple[dict[str, TensorInfo], dict[str, str]] | None = None):
        """`header`: what read_header(path) returned, if the caller already parsed it."""
        self.path = Path(path)
        self.tensors, self.metadata = header or read_header(self.path)
        with open(self.path, "rb") as f:
            # Copy-on-write mapping: writable for torch.frombuffer, never written back.
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if self.path.stat().st_size else None

    def get(self, name: str) -> torch.Tensor:
        t = self.tensors.get(name)
        if t is None:
            raise LlamafuseError(f"{self.path}: tensor '{name}' not found")
        if t.nbytes == 0:
            return torch.empty(t.shape, dtype=t.dtype)
        return torch.frombuffer(self._map, dtype=t.dtype, count=t.nbytes // t.dtype.itemsize,
                                offset=t.begin).view(t.shape)

    def keys(self) -> list[str]:
        return list(self.tensors)


def plan_header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                metadata: dict[str, str] | None = None) -> tuple[bytes, list[int]]:
    """Header bytes (length prefix included) and each tensor's absolute offset, in entry order.

    Tensors are laid out back to back in entry order; the header is padded with spaces so the
    first one starts on a DATA_ALIGN boundary.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offsets, pos = [], 0
    for name, dtype, shape in entries:
        n = dtype.itemsize
        for s in shape:
            n *= s
        header[name] = {"dtype": SAFETENSORS_NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
        offsets.append(pos)
        pos += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % DATA_ALIGN)
    start = 8 + len(blob)
    return struct.pack("<Q", len(blob)) + blob, [start + o for o in offsets]


def write_tensor(f: BinaryIO, t: torch.Tensor) -> memoryview:
    """Write `t`'s bytes (little-endian, C order) to `f`; returns them for hashing."""
    t = t.detach().cpu().contiguous()
    data = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
    f.write(data)
    return data


def fsync(f: BinaryIO) -> None:
    f.flush()
    os.fsync(f.fileno())
