"""A fast, read-only index of a GGUF file's tensors: name -> (type, shape, absolute byte span).

Why not ``gguf.GGUFReader``: it materializes every metadata value as numpy views, and a real
model's vocabulary is hundreds of thousands of strings -- 15-30 s to open a Gemma-3 GGUF
(262,144 tokens) on the device, for a patch that touches 50 KB. This reader skips metadata values
by their lengths and parses only the tensor infos (~0.1 s), which is all that placing and
verifying a patch needs. It reads the few scalar keys asked for (e.g. ``general.alignment``).

Format (GGUF v2/v3, little-endian): magic, u32 version, u64 n_tensors, u64 n_kv; n_kv x
(string key, u32 type, value); n_tensors x (string name, u32 n_dims, u64 dims[n_dims], u32 ggml
type, u64 offset); padding to ``general.alignment`` (default 32); tensor data.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

# GGUF value types -> fixed byte size (8 = string, 9 = array are variable)
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


class GGUFIndexError(ValueError):
    """Not a GGUF file, or a truncated/corrupt header; one line naming the file."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # ggml order, ne0 first
    data_offset: int  # absolute offset of the tensor's first byte in the file
    n_bytes: int


@dataclass(frozen=True)
class GGUFIndex:
    path: Path
    version: int
    tensors: dict[str, TensorInfo]
    data_start: int  # where the tensor-data region begins (aligned end of the header)
    scalars: dict[str, object]  # the scalar (and string) metadata values; arrays are skipped

    def tensor(self, name: str) -> TensorInfo | None:
        return self.tensors.get(name)


class _Cursor:
    def __init__(self, buf, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str):
        try:
            (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise GGUFIndexError(f"{self.path}: truncated GGUF header") from None
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise GGUFIndexError(f"{self.path}: truncated GGUF header (string of {n} bytes)")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", "replace")
        self.pos += n
        return s

    def skip_value(self, vtype: int) -> None:
        if vtype in _FIXED:
            self.pos += _FIXED[vtype]
        elif vtype == STRING:
            self.pos += self.take("<Q")
        elif vtype == ARRAY:
            etype, count = self.take("<I"), self.take("<Q")
            if etype in _FIXED:
                self.pos += _FIXED[etype] * count
            elif etype == STRING:
                end = len(self.buf)
                if count > (end - self.pos) // 8:
                    raise GGUFIndexError(f"{self.path}: array of {count} strings cannot fit the file")
                for _ in range(count):  # a vocabulary: lengths only, no decoding
                    if self.pos + 8 > end:
                        raise GGUFIndexError(f"{self.path}: truncated GGUF metadata")
                    self.pos += struct.unpack_from("<Q", self.buf, self.pos)[0] + 8
            elif etype == ARRAY:
                raise GGUFIndexError(f"{self.path}: nested GGUF arrays are not supported")
            else:
                raise GGUFIndexError(f"{self.path}: unknown GGUF array element type {etype}")
        else:
            raise GGUFIndexError(f"{self.path}: unknown GGUF value type {vtype}")
        if self.pos > len(self.buf):
            raise GGUFIndexError(f"{self.path}: truncated GGUF metadata")


def read_index(path: str | Path) -> GGUFIndex:
    path = Path(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return _parse(m, path)
    except (OSError, ValueError) as e:
        if isinstance(e, GGUFIndexError):
            raise
        raise GGUFIndexError(f"{path}: cannot read as GGUF ({e})") from None


def _parse(buf, path: Path) -> GGUFIndex:
    if len(buf) < 24 or bytes(buf[:4]) != b"GGUF":
        raise GGUFIndexError(f"{path}: not a GGUF file (bad magic)")
    c = _Cursor(buf, path)
    c.pos = 4
    version, n_tensors, n_kv = c.take("<I"), c.take("<Q"), c.take("<Q")
    if n_tensors > len(buf) // 24 or n_kv > len(buf) // 12:
        raise GGUFIndexError(f"{path}: header counts ({n_tensors} tensors, {n_kv} keys) cannot fit the file")
    if version < 2:
        raise GGUFIndexError(f"{path}: GGUF version {version} is not supported")
    scalars: dict[str, object] = {}
    for _ in range(n_kv):
        key, vtype = c.string(), c.take("<I")
        if vtype in _SCALAR:
            scalars[key] = c.take(_SCALAR[vtype])
        elif vtype == STRING:
            scalars[key] = c.string()
        else:
            c.skip_value(vtype)
    infos = []
    for _ in range(n_tensors):
        name, nd = c.string(), c.take("<I")
        if nd > 4:
            raise GGUFIndexError(f"{path}: tensor {name} has {nd} dimensions (ggml allows 4)")
        shape = tuple(c.take("<Q") for _ in range(nd))
        infos.append((name, c.take("<I"), shape, c.take("<Q")))
    align = int(scalars.get("general.alignment", 32))
    data_start = -(-c.pos // align) * align
    tensors = {}
    for name, t, shape, off in infos:
        try:
            qt = GGMLQuantizationType(t)
        except ValueError:
            raise GGUFIndexError(f"{path}: tensor {name} has unknown ggml type {t}") from None
        block, size = GGML_QUANT_SIZES[qt]
        n = 1
        for d in shape:
            n *= d
        nbytes = n // block * size
        if data_start + off + nbytes > len(buf):
            raise GGUFIndexError(f"{path}: tensor {name} extends past the end of the file (truncated?)")
        tensors[name] = TensorInfo(name, qt, shape, data_start + off, nbytes)
    return GGUFIndex(path, version, tensors, data_start, scalars)
