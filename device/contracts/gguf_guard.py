"""A bounds check of a GGUF header before gguf-py parses it.

gguf-py's ``GGUFReader`` trusts the counts in the file: one flipped bit in an array length makes
it build billions of tiny memmap views (the device's fuzz test found it spinning for minutes on a
1 KiB patch).  A patch comes from the network, so before it reaches the reader, this walks the
header with ``struct`` and checks that every count and length fits in the bytes that remain.
It reads only the header (a few KiB for a patch) and refuses with one line.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

MAGIC = b"GGUF"
MAX_HEADER_BYTES = 16 << 20  # a patch's header is a few KiB; a model's tokenizer a few MiB
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NESTING = 2
# GGUF value types: 0 u8, 1 i8, 2 u16, 3 i16, 4 u32, 5 i32, 6 f32, 7 bool, 8 string, 9 array,
# 10 u64, 11 i64, 12 f64
_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


class GGUFHeaderError(ValueError):
    """The header's counts or lengths do not fit the file."""


class _Cursor:
    def __init__(self, data: bytes, size: int) -> None:
        self.data, self.pos, self.size = data, 0, size

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise GGUFHeaderError(f"{what} runs past the end of the file (offset {self.pos})")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack("<Q", self.take(8, what))[0]

    def left(self) -> int:
        return len(self.data) - self.pos


def check_gguf_header(path: str | os.PathLike) -> None:
    """Raise :class:`GGUFHeaderError` unless every header count/length fits in the file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        data = f.read(min(size, MAX_HEADER_BYTES))
    c = _Cursor(data, size)
    if c.take(4, "magic") != MAGIC:
        raise GGUFHeaderError("not a GGUF file (bad magic)")
    version = c.u32("version")
    if version not in (2, 3):
        raise GGUFHeaderError(f"unsupported GGUF version {version}")
    n_tensors, n_kv = c.u64("tensor count"), c.u64("metadata count")
    if n_kv > c.left() // 13 or n_tensors > c.left() // 24:  # smallest possible kv / tensor info
        raise GGUFHeaderError(f"header claims {n_kv} keys and {n_tensors} tensors: more than the file holds")
    for i in range(n_kv):
        _string(c, f"key {i}")
        _value(c, c.u32(f"type of key {i}"), f"value of key {i}", 0)
    for i in range(n_tensors):
        _string(c, f"tensor {i} name")
        n_dims = c.u32(f"tensor {i} dims")
        if n_dims > MAX_DIMS:
            raise GGUFHeaderError(f"tensor {i} has {n_dims} dimensions (at most {MAX_DIMS})")
        dims = [c.u64(f"tensor {i} shape") for _ in range(n_dims)]
        c.u32(f"tensor {i} type")
        offset = c.u64(f"tensor {i} offset")
        if offset > size or any(d > size * 8 for d in dims):  # >= 1 bit per element
            raise GGUFHeaderError(f"tensor {i} lies outside the file")


def _string(c: _Cursor, what: str) -> None:
    n = c.u64(f"{what} length")
    c.take(n, what)


def _value(c: _Cursor, vtype: int, what: str, depth: int) -> None:
    if vtype in _SCALAR:
        c.take(_SCALAR[vtype], what)
    elif vtype == _STRING:
        _string(c, what)
    elif vtype == _ARRAY:
        if depth >= MAX_NESTING:
            raise GGUFHeaderError(f"{what}: arrays nested too deep")
        item, count = c.u32(f"{what} item type"), c.u64(f"{what} count")
        smallest = _SCALAR.get(item, 8 if item == _STRING else 12)
        if count > c.left() // smallest:
            raise GGUFHeaderError(f"{what}: {count} items cannot fit in the rest of the file")
        if item in _SCALAR:
            c.take(count * _SCALAR[item], what)
        else:
            for _ in range(count):
                _value(c, item, what, depth + 1)
    else:
        raise GGUFHeaderError(f"{what}: unknown value type {vtype}")
