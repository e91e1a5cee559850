"""The DWC weight patch: the ONE definition of the downlink file (torch-free: numpy + gguf only).

The device imports this module to read and verify a patch, the cloud's builder (cloud/patch_build.py)
to write one; nothing else defines the format.

File format (a GGUF file, so it is inspectable with any GGUF tool):

* ``general.architecture = "cdcca-patch"``; metadata under ``cdcca.patch.*``:
  ``format_version`` (uint32, = 1), ``round_id``, ``parent_version`` (advisory: the device
  version the cloud believed it was patching; the base hash is what is enforced),
  ``base_hash`` / ``target_hash`` (sha256 hex over the exact bytes of every replaced range, in
  entry order, before / after the patch), ``base_data_hashes`` (JSON ``{role: sha256 of the whole
  tensor-data region of that base file}``, ``{}`` when not computed), ``note``, and ``entries``.
* ``entries`` is ONE JSON string: a list of ``{role, tensor, type, shape, row_start, row_count,
  byte_offset, nbytes}``; ``role`` is ``"model"`` or ``"mmproj"`` (which device file), ``type`` the
  ggml type NAME (``"Q4_0"``), ``shape`` in ggml order (ne0 first, as GGUFReader reports it).
  JSON rather than parallel arrays: one self-describing record per entry, easy to extend.
* A "row" is one ne0-long vector (a torch ``[out, in]`` weight is ggml ``ne=[in, out]``: a row is
  one ``in``-vector). ggml quantizes along rows, so rows ``[s, s+n)`` are the contiguous bytes
  ``[s*row_nbytes, (s+n)*row_nbytes)`` of the tensor's data; ``byte_offset`` is relative to it.
* Payload i is the 1-D tensor ``p.<i>`` of ggml type I8 holding the new bytes verbatim, already
  in the target's type. I8 (GGUF has no U8) so no tool ever re-interprets or converts them.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

from device.contracts.atomic import atomic_path
from device.contracts.config import FILE_ROLES as ROLES  # the one list of a model's file roles
from device.contracts.gguf_guard import check_gguf_header

FORMAT_VERSION = 1
ARCH = "cdcca-patch"
K_VERSION = "cdcca.patch.format_version"
K_ROUND = "cdcca.patch.round_id"
K_PARENT = "cdcca.patch.parent_version"
K_BASE_HASH = "cdcca.patch.base_hash"
K_TARGET_HASH = "cdcca.patch.target_hash"
K_DATA_HASHES = "cdcca.patch.base_data_hashes"
K_NOTE = "cdcca.patch.note"
K_ENTRIES = "cdcca.patch.entries"
_STRING_KEYS = (K_ROUND, K_PARENT, K_BASE_HASH, K_TARGET_HASH, K_DATA_HASHES, K_NOTE, K_ENTRIES)

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class PatchError(ValueError):
    """A patch is unreadable, inconsistent, or does not fit the files it targets.

    The message is always one line (callers print it as-is to a terminal or a log).
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


# ---------------------------------------------------------------- row geometry

def n_rows(shape: Sequence[int]) -> int:
    """Rows of a tensor in ggml order: every dimension but ne0 (a 1-D tensor is one row)."""
    return int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1


def row_nbytes(ggml_type: GGMLQuantizationType, shape: Sequence[int]) -> int:
    """Bytes of one row; ne0 must be whole blocks, which ggml guarantees for stored tensors."""
    block, type_size = GGML_QUANT_SIZES[ggml_type]
    if shape[0] % block:
        raise ValueError(f"ne0={shape[0]} is not a multiple of the {ggml_type.name} block size {block}")
    return shape[0] // block * type_size


def rows_bytes(ggml_type: GGMLQuantizationType, shape: Sequence[int], row_start: int,
               row_count: int) -> tuple[int, int]:
    """(byte_offset, nbytes) of rows [row_start, row_start+row_count) inside the tensor's data."""
    if row_start < 0 or row_count <= 0 or row_start + row_count > n_rows(shape):
        raise ValueError(f"rows [{row_start}, {row_start + row_count}) outside 0..{n_rows(shape)}")
    per_row = row_nbytes(ggml_type, shape)
    return row_start * per_row, row_count * per_row


def sha256_concat(chunks: Iterable[bytes]) -> str:
    """The base/target hash: sha256 over the chunks back to back (entry order)."""
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- records

@dataclass(frozen=True)
class PatchEntry:
    """One row range of one tensor of one device file; the payload is its new bytes."""

    role: str
    tensor: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]  # ggml order, ne0 first
    row_start: int
    row_count: int
    byte_offset: int  # relative to the tensor's data start
    nbytes: int

    @classmethod
    def for_rows(cls, role: str, tensor: str, ggml_type: GGMLQuantizationType,
                 shape: Sequence[int], row_start: int, row_count: int) -> PatchEntry:
        """Build an entry with its byte span derived from the geometry (never typed by hand)."""
        shape = tuple(int(d) for d in shape)
        off, n = rows_bytes(GGMLQuantizationType(ggml_type), shape, row_start, row_count)
        return cls(role, tensor, GGMLQuantizationType(ggml_type), shape, row_start, row_count, off, n)

    def to_json(self) -> dict:
        d = asdict(self)
        d["type"] = self.ggml_type.name
        del d["ggml_type"]
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_json(cls, d: Mapping) -> PatchEntry:
        """Parse and check one entry: geometry must agree with the stated offset and size."""
        if d.get("role") not in ROLES:
            raise ValueError(f"role {d.get('role')!r} is not one of {ROLES}")
        if not isinstance(d.get("tensor"), str) or not d["tensor"]:
            raise ValueError("entry without a tensor name")
        if d.get("type") not in GGMLQuantizationType.__members__:
            raise ValueError(f"unknown ggml type {d.get('type')!r}")
        shape = d.get("shape")
        if (not isinstance(shape, list) or not 1 <= len(shape) <= 4
                or not all(isinstance(x, int) and x > 0 for x in shape)):
            raise ValueError(f"bad shape {shape!r} for {d['tensor']}")
        ints = [d.get(k) for k in ("row_start", "row_count", "byte_offset", "nbytes")]
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in ints):
            raise ValueError(f"non-integer row/byte fields for {d['tensor']}")
        entry = cls.for_rows(d["role"], d["tensor"], GGMLQuantizationType[d["type"]], shape, ints[0], ints[1])
        if (entry.byte_offset, entry.nbytes) != (ints[2], ints[3]):
            raise ValueError(f"{d['tensor']}: byte_offset/nbytes {ints[2:]} do not match rows "
                             f"{ints[0]}+{ints[1]} of {entry.ggml_type.name}{list(entry.shape)}")
        return entry


@dataclass(frozen=True)
class PatchMeta:
    """File-level metadata; the two hashes make a patch refuse any base but its own."""

    round_id: str
    parent_version: str = ""
    base_hash: str = ""
    target_hash: str = ""  # write_patch fills it from the payloads when empty
    base_data_hashes: dict[str, str] = field(default_factory=dict)
    note: str = ""
    format_version: int = FORMAT_VERSION


@dataclass(frozen=True)
class Patch:
    """A parsed, self-consistent patch (payload bytes already checked against target_hash)."""

    path: Path
    meta: PatchMeta
    entries: tuple[PatchEntry, ...]
    payloads: tuple[bytes, ...]

    @property
    def payload_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


def check_entries(entries: Sequence[PatchEntry]) -> None:
    """Refuse empty patches, entries whose byte span disagrees with their rows, and overlapping
    ranges (their base hash would be ill-defined)."""
    if not entries:
        raise ValueError("patch has no entries")
    spans: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for e in entries:
        if PatchEntry.for_rows(e.role, e.tensor, e.ggml_type, e.shape, e.row_start, e.row_count) != e:
            raise ValueError(f"{e.tensor}: byte_offset/nbytes do not match rows {e.row_start}+{e.row_count}")
        spans.setdefault((e.role, e.tensor), []).append((e.row_start, e.row_start + e.row_count))
    for (role, name), ranges in spans.items():
        ranges.sort()
        for (_, end), (start, _) in zip(ranges, ranges[1:]):
            if start < end:
                raise ValueError(f"overlapping row ranges in {role}:{name}")


# ---------------------------------------------------------------- write / read

def write_patch(path: str | os.PathLike, entries_with_bytes: Sequence[tuple[PatchEntry, bytes]],
                meta: PatchMeta) -> PatchMeta:
    """Write a patch atomically (tmp + fsync + rename: a half-written patch is never served); returns the
    meta as written (target_hash filled in). Refuses what read_patch would refuse."""
    path = Path(path)
    entries = [e for e, _ in entries_with_bytes]
    payloads = [bytes(b) for _, b in entries_with_bytes]
    try:
        check_entries(entries)
    except ValueError as e:
        raise PatchError(f"{path}: {e}") from None
    for e, b in zip(entries, payloads):
        if len(b) != e.nbytes:
            raise PatchError(f"{path}: {e.tensor} rows {e.row_start}+{e.row_count}: "
                             f"{len(b)} bytes, expected {e.nbytes}")
    target = sha256_concat(payloads)
    if meta.target_hash and meta.target_hash != target:
        raise PatchError(f"{path}: target_hash does not match the payload bytes")
    meta = replace(meta, target_hash=target)
    if not _HEX64.match(meta.base_hash):
        raise PatchError(f"{path}: base_hash must be 64 lowercase hex chars")
    with atomic_path(path, sync_dir=False) as tmp:
        _write_gguf(tmp, entries, payloads, meta)
    return meta


def _write_gguf(path: Path, entries: Sequence[PatchEntry], payloads: Sequence[bytes], meta: PatchMeta) -> None:
    w = GGUFWriter(path, ARCH)
    w.add_uint32(K_VERSION, meta.format_version)
    strings = {K_ROUND: meta.round_id, K_PARENT: meta.parent_version, K_BASE_HASH: meta.base_hash,
               K_TARGET_HASH: meta.target_hash, K_DATA_HASHES: json.dumps(meta.base_data_hashes, sort_keys=True),
               K_NOTE: meta.note, K_ENTRIES: json.dumps([e.to_json() for e in entries])}
    for key, val in strings.items():  # add_key_value: add_string silently drops empty strings
        w.add_key_value(key, val, GGUFValueType.STRING)
    for i, b in enumerate(payloads):
        w.add_tensor(f"p.{i}", np.frombuffer(b, dtype=np.int8))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def read_patch(path: str | os.PathLike) -> Patch:
    """Parse and fully validate a patch file; any defect is one ``PatchError`` line naming the file."""
    path = Path(path)
    try:
        check_gguf_header(path)  # gguf-py trusts the header's counts: bound them first
        reader = GGUFReader(path, "r")
    except Exception as e:  # untrusted input: any parser failure means "not a patch"
        raise PatchError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    try:
        return _parse(path, reader)
    except PatchError:
        raise
    except Exception as e:
        raise PatchError(f"{path}: corrupt patch ({type(e).__name__}: {e})") from None
    finally:
        del reader


def _field(reader: GGUFReader, key: str, vtype: GGUFValueType):
    f = reader.get_field(key)
    if f is None:
        raise ValueError(f"missing key {key}")
    if f.types != [vtype]:
        raise ValueError(f"key {key} has type {[t.name for t in f.types]}, expected {vtype.name}")
    return f.contents()


def _parse(path: Path, reader: GGUFReader) -> Patch:
    arch = reader.get_field("general.architecture")
    if arch is None or arch.contents() != ARCH:
        raise PatchError(f"{path}: not a cdcca patch (architecture {arch.contents() if arch else None!r})")
    version = _field(reader, K_VERSION, GGUFValueType.UINT32)
    if version != FORMAT_VERSION:
        raise PatchError(f"{path}: patch format version {version}, this build reads {FORMAT_VERSION}")
    s = {k: _field(reader, k, GGUFValueType.STRING) for k in _STRING_KEYS}
    meta = PatchMeta(round_id=s[K_ROUND], parent_version=s[K_PARENT], base_hash=s[K_BASE_HASH],
                     target_hash=s[K_TARGET_HASH], base_data_hashes=json.loads(s[K_DATA_HASHES]),
                     note=s[K_NOTE], format_version=version)
    if not (_HEX64.match(meta.base_hash) and _HEX64.match(meta.target_hash)):
        raise PatchError(f"{path}: base/target hash is not a sha256 hex digest")
    if not isinstance(meta.base_data_hashes, dict) or not set(meta.base_data_hashes) <= set(ROLES):
        raise PatchError(f"{path}: base_data_hashes must map roles {ROLES} to hashes")
    entries = tuple(PatchEntry.from_json(d) for d in json.loads(s[K_ENTRIES]))
    check_entries(entries)
    payloads = _payloads(path, reader, entries)
    if sha256_concat(payloads) != meta.target_hash:
        raise PatchError(f"{path}: payload bytes do not match target_hash (corrupt patch)")
    if meta.base_hash == meta.target_hash:
        raise PatchError(f"{path}: patch changes nothing (base hash == target hash)")
    return Patch(path, meta, entries, payloads)


def _payloads(path: Path, reader: GGUFReader, entries: Sequence[PatchEntry]) -> tuple[bytes, ...]:
    tensors = {t.name: t for t in reader.tensors}
    if set(tensors) != {f"p.{i}" for i in range(len(entries))}:
        raise PatchError(f"{path}: payload tensors {sorted(tensors)} do not match {len(entries)} entries")
    out = []
    for i, e in enumerate(entries):
        t = tensors[f"p.{i}"]
        if t.tensor_type != GGMLQuantizationType.I8 or len(t.shape) != 1:
            raise PatchError(f"{path}: payload p.{i} must be a 1-D I8 tensor")
        raw = t.data.view(np.uint8)
        if t.n_bytes != e.nbytes or raw.size != e.nbytes:
            raise PatchError(f"{path}: payload p.{i} ({e.tensor}) has {raw.size} bytes, expected {e.nbytes}"
                             " (truncated or inconsistent)")
        out.append(raw.tobytes())
    return tuple(out)


def data_region_sha256(path: str | os.PathLike) -> str:
    """sha256 of a GGUF's tensor-data region (data_offset..EOF): pins a whole base file cheaply
    in meaning (metadata edits do not count), at the cost of one read of the file."""
    from device.contracts.gguf_index import read_index  # fast: skips the vocabulary

    offset = read_index(path).data_start
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()
