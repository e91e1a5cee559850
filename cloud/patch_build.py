"""Building a DWC patch (the cloud's half of device/contracts/patch_format.py): re-quantize the
rows DWC selected to each base tensor's own ggml type and write only the rows whose bytes change.

Why it lives in cloud/: the device only reads and verifies patches, so the builder (and the
quantizers it calls) need not be on the device path; the file format itself stays defined once, in
the contract module, which this imports."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize, quantize

from device.contracts.patch_format import (PatchEntry, PatchMeta, data_region_sha256, n_rows, row_nbytes,
                                           rows_bytes, sha256_concat, write_patch)

T = GGMLQuantizationType
# Types gguf-py can quantize bit-exactly like ggml; K-quants/IQ types only dequantize there.
QUANTIZABLE: frozenset[GGMLQuantizationType] = frozenset(
    {T.F32, T.F16, T.BF16, T.Q8_0, T.Q5_0, T.Q5_1, T.Q4_0, T.Q4_1}
)
Quantizer = Callable[[np.ndarray, GGMLQuantizationType], bytes]


class UnsupportedQuantType(ValueError):
    """gguf-py cannot quantize this ggml type; the cloud skips such tensors and says so."""


def quantize_rows(float_rows: np.ndarray, ggml_type: GGMLQuantizationType) -> bytes:
    """Quantize rows (shape [..., ne0], float) to ``ggml_type`` bytes exactly as a fresh GGUF would.

    Every ggml block lies inside one row, so quantizing a subset of rows gives the same bytes as
    quantizing the whole tensor and slicing; that is what makes row-range patches exact.
    """
    ggml_type = GGMLQuantizationType(ggml_type)
    if ggml_type not in QUANTIZABLE:
        raise UnsupportedQuantType(
            f"gguf-py cannot quantize {ggml_type.name} (only {', '.join(sorted(t.name for t in QUANTIZABLE))})"
        )
    rows = np.ascontiguousarray(float_rows, dtype=np.float32)
    row_nbytes(ggml_type, (rows.shape[-1],))  # raises on a ragged last block
    return np.ascontiguousarray(quantize(rows, ggml_type)).tobytes()



RowRanges = Sequence[tuple[int, int]] | None  # (row_start, row_count) pairs; None = every row


@dataclass(frozen=True)
class PatchBuild:
    """What make_patch_from_arrays did; ``path`` is None when no selected byte changed."""

    path: Path | None
    meta: PatchMeta | None
    entries: tuple[PatchEntry, ...]
    payload_bytes: int
    unchanged_rows: int  # selected rows whose quantized bytes equal the base's: dropped
    skipped: tuple[str, ...]  # "role:tensor (TYPE)" that gguf-py cannot quantize


def make_patch_from_arrays(base_gguf_path: str | os.PathLike | Mapping[str, str | os.PathLike],
                           new_tensors: Mapping[str, tuple[np.ndarray, RowRanges]],
                           out_path: str | os.PathLike, *, round_id: str, parent_version: str = "",
                           note: str = "", data_hashes: bool = False,
                           skip_unsupported: bool = False, quantizer: Quantizer | None = None,
                           readers: Mapping[str, GGUFReader] | None = None) -> PatchBuild:
    """Re-quantize selected rows of new float weights to the base tensors' own types; write a patch.

    ``quantizer`` (rows, type) -> bytes re-quantizes; its ``supports`` attribute (a set of types),
    if any, says which types it takes. Default: ``quantize_rows`` (gguf-py; no K-quants). The cloud
    passes ggml's own quantizer (``cloud.ggml_quant``) for K-quants. A row whose new floats equal
    the dequantized old bytes keeps those bytes: re-quantizing an unchanged K-quant row would
    change them (Q6_K: most of the time) and ship noise.

    ``base_gguf_path`` is the device's model GGUF, or ``{"model": ..., "mmproj": ...}``.
    ``new_tensors`` maps a GGUF tensor name (``"role:name"`` to force the file) to the FULL new
    float array in torch order (reversed ggml shape, e.g. ``[out, in]``) and the row ranges DWC
    selected. Rows whose quantized bytes do not change are dropped, so the patch only carries
    bytes that differ. ``readers``: gguf-py readers of those same files, when the caller parsed
    them already (a cloud round parses each file once and passes the parse on).
    """
    bases = ({"model": base_gguf_path} if isinstance(base_gguf_path, (str, os.PathLike))
             else dict(base_gguf_path))
    readers = {role: (readers or {}).get(role) or GGUFReader(p, "r") for role, p in bases.items()}
    index = {role: {t.name: t for t in r.tensors} for role, r in readers.items()}
    pieces: list[tuple[PatchEntry, bytes, bytes]] = []
    skipped: list[str] = []
    unchanged = 0
    for key, (array, ranges) in new_tensors.items():
        role, name = _resolve(key, index)
        t = index[role][name]
        if t.tensor_type not in getattr(quantizer, "supports", QUANTIZABLE) and skip_unsupported:
            skipped.append(f"{role}:{name} ({t.tensor_type.name})")
            continue
        got, n_same = _tensor_pieces(role, name, t, array, ranges, quantizer or quantize_rows)
        pieces += got
        unchanged += n_same
    entries = tuple(p[0] for p in pieces)
    if not pieces:
        return PatchBuild(None, None, (), 0, unchanged, tuple(skipped))
    meta = PatchMeta(round_id=round_id, parent_version=parent_version, note=note,
                     base_hash=sha256_concat(p[2] for p in pieces),
                     base_data_hashes={r: data_region_sha256(bases[r]) for r in bases
                                       if data_hashes and any(e.role == r for e in entries)})
    del readers, index
    meta = write_patch(out_path, [(p[0], p[1]) for p in pieces], meta)
    return PatchBuild(Path(out_path), meta, entries, sum(e.nbytes for e in entries), unchanged, tuple(skipped))


def _resolve(key: str, index: Mapping[str, Mapping[str, object]]) -> tuple[str, str]:
    """Find which base file holds a tensor; model and mmproj names are disjoint in practice."""
    role, _, name = key.partition(":")
    if name and role in index:
        if name not in index[role]:
            raise KeyError(f"tensor {name!r} not in the {role} GGUF")
        return role, name
    found = [r for r in index if key in index[r]]
    if len(found) != 1:
        raise KeyError(f"tensor {key!r} found in {found or 'no'} base file(s); use 'role:name'")
    return found[0], key


def _tensor_pieces(role: str, name: str, t, array: np.ndarray, ranges: RowRanges,
                   quantizer: Quantizer) -> tuple[list[tuple[PatchEntry, bytes, bytes]], int]:
    """(entry, new bytes, old bytes) per run of changed rows in the selected ranges."""
    shape = tuple(int(x) for x in t.shape)
    arr = np.asarray(array, dtype=np.float32)
    if arr.shape != tuple(reversed(shape)):
        raise ValueError(f"{role}:{name}: new array shape {arr.shape}, expected {tuple(reversed(shape))} "
                         f"(torch order; the GGUF says ggml ne={list(shape)})")
    per_row = row_nbytes(t.tensor_type, shape)
    rows = arr.reshape(-1, shape[0])
    old = t.data.reshape(-1).view(np.uint8).reshape(-1, per_row)
    out, same = [], 0
    for start, count in ranges if ranges is not None else [(0, n_rows(shape))]:
        rows_bytes(t.tensor_type, shape, start, count)
        want = rows[start:start + count]
        new = np.frombuffer(quantizer(want, t.tensor_type), np.uint8).reshape(count, per_row).copy()
        same_floats = (want == dequantize(old[start:start + count], t.tensor_type).reshape(count, -1)).all(axis=1)
        new[same_floats] = old[start:start + count][same_floats]  # untouched rows keep their bytes
        changed = (new != old[start:start + count]).any(axis=1)
        same += int(count - changed.sum())
        for s, n in _runs(changed):
            entry = PatchEntry.for_rows(role, name, t.tensor_type, shape, start + s, n)
            out.append((entry, new[s:s + n].tobytes(), old[start + s:start + s + n].tobytes()))
    return out, same


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(offset, length) of each run of True in a 1-D bool array."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return [(int(s), int(e - s)) for s, e in zip(starts, ends)]
