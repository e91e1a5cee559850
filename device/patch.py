"""Device side of the DWC downlink: check a patch against the exact files it targets, then write it.

Everything that can refuse a patch is checked by ``plan_patch`` BEFORE any byte is written, so a
refused patch leaves the device untouched. On the device the bytes are written in place by
``device.versions.VersionStore`` under a write-ahead undo journal (``device/journal.py``), which is
what makes in-place writes crash-safe. ``apply_to_files`` is the unjournaled variant for scratch
copies (the cloud's preview); the store's file clone (reflink/copy_file_range) lives at the
bottom, atomic small-file writes and the folder fsync in ``device/contracts/atomic.py``.
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from device.contracts.atomic import fsync_dir  # noqa: F401  (re-exported: device.uplink)
from device.contracts.gguf_index import GGUFIndex, GGUFIndexError, read_index
from device.contracts.model_id import file_sha256 as sha256_file  # noqa: F401  (used by versions)
from device.contracts.patch_format import Patch, PatchEntry, PatchError, data_region_sha256, n_rows, read_patch

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no reflink, no flock
    fcntl = None  # type: ignore[assignment]

FICLONE = 0x40049409  # linux/fs.h: share extents (reflink) on btrfs/XFS/bcachefs


@dataclass(frozen=True)
class Placement:
    """One patch entry resolved to an absolute byte span of a concrete device file."""

    entry: PatchEntry
    payload: bytes
    file_offset: int


def plan_patch(patch: Patch, files: Mapping[str, Path]) -> list[Placement]:
    """Verify every entry against ``files`` ({role: path}) and return where each payload goes.

    Refuses (``PatchError``, one line) unknown roles/tensors, type or shape mismatches, rows out of
    bounds, and a base hash that differs from the bytes now in the files: that single check catches
    a patch built for another base AND a patch applied twice.
    """
    indexes = {}
    for role in sorted({e.role for e in patch.entries}):
        if role not in files:
            raise PatchError(f"{patch.path}: targets the {role} file, which this version does not have")
        try:
            indexes[role] = read_index(files[role])
        except GGUFIndexError as e:
            raise PatchError(str(e)) from None
    placements = [_place(patch.path, e, p, indexes[e.role]) for e, p in zip(patch.entries, patch.payloads)]
    if _spans_hash(files, placements) != patch.meta.base_hash:
        raise PatchError(f"{patch.path}: base hash mismatch: the patch was built for other weights "
                         "or is already applied; nothing written")
    _check_data_hashes(patch, files)
    return placements


def _spans_hash(files: Mapping[str, Path], placements: Sequence[Placement]) -> str:
    """sha256 over the bytes the placements cover, in patch order: before writing it must equal the
    patch's base hash, after writing its target hash."""
    h = hashlib.sha256()
    handles = {}
    try:
        for pl in placements:
            f = handles.get(pl.entry.role) or handles.setdefault(pl.entry.role, open(files[pl.entry.role], "rb"))
            f.seek(pl.file_offset)
            h.update(f.read(pl.entry.nbytes))
    finally:
        for f in handles.values():
            f.close()
    return h.hexdigest()


def _place(path: Path, e: PatchEntry, payload: bytes, index: GGUFIndex) -> Placement:
    """Resolve one entry; every mismatch names the tensor so the cloud side can be debugged."""
    tensor = index.tensor(e.tensor)
    where = f"{path}: {e.role}:{e.tensor}"
    if tensor is None:
        raise PatchError(f"{where}: no such tensor in the device's {e.role} file")
    if tensor.tensor_type != e.ggml_type:
        raise PatchError(f"{where}: patch type {e.ggml_type.name}, device tensor is {tensor.tensor_type.name}")
    shape = tuple(int(x) for x in tensor.shape)
    if shape != e.shape:
        raise PatchError(f"{where}: patch shape {list(e.shape)}, device tensor is {list(shape)}")
    if e.row_start + e.row_count > n_rows(shape) or e.byte_offset + e.nbytes > tensor.n_bytes:
        raise PatchError(f"{where}: rows [{e.row_start}, {e.row_start + e.row_count}) out of bounds")
    return Placement(e, payload, tensor.data_offset + e.byte_offset)


def _check_data_hashes(patch: Patch, files: Mapping[str, Path]) -> None:
    """Optional whole-base pin: costs one read of each file, so the cloud decides whether to send it."""
    for role, expected in patch.meta.base_data_hashes.items():
        if role in files and data_region_sha256(files[role]) != expected:
            raise PatchError(f"{patch.path}: the device's {role} file is not the base this patch was built on")


def write_placements(path: Path, placements: Sequence[Placement], crash_hook=None) -> int:
    """Write payloads into ``path`` (a scratch copy) and fsync it; returns the bytes written.

    ``crash_hook(step)`` lets the crash tests kill the process between two writes.
    """
    written = 0
    with open(path, "r+b") as f:
        for i, pl in enumerate(placements):
            f.seek(pl.file_offset)
            f.write(pl.payload)
            written += len(pl.payload)
            if crash_hook is not None and i == len(placements) // 2:
                f.flush()
                crash_hook("write")
        f.flush()
        os.fsync(f.fileno())
    return written


def verify_written(patch: Patch, placements: Sequence[Placement], files: Mapping[str, Path]) -> None:
    """Re-read the written spans and compare with the patch's target hash (catches a short write,
    a wrong offset, or a file that is not the copy we think it is)."""
    if _spans_hash(files, placements) != patch.meta.target_hash:
        raise PatchError(f"{patch.path}: target hash mismatch after writing; new version discarded")


def apply_to_files(patch_path: str | os.PathLike, files: Mapping[str, Path]) -> int:
    """Verify and apply a patch IN PLACE to scratch files ({role: path}); returns bytes written.

    For copies nobody runs (the cloud previews the exact weights the device will get). Not
    crash-safe by design: the device goes through ``VersionStore.apply_patch`` instead.
    """
    patch = read_patch(patch_path)
    placements = plan_patch(patch, files)
    written = sum(write_placements(Path(files[r]), [p for p in placements if p.entry.role == r])
                  for r in sorted({p.entry.role for p in placements}))
    verify_written(patch, placements, files)
    return written


# ---------------------------------------------------------------- durable file primitives

def clone_file(src: Path, dst: Path) -> str:
    """Copy ``src`` to a NEW file ``dst`` as cheaply as the filesystem allows; fsynced.
    Returns the method used (reflink / copy_file_range / copyfile), for the measurements."""
    with open(src, "rb") as fs, open(dst, "wb") as fd:
        try:
            if fcntl is None:
                raise OSError(errno.EOPNOTSUPP, "no ioctl")
            fcntl.ioctl(fd.fileno(), FICLONE, fs.fileno())
            method = "reflink"
        except OSError:
            method = _copy_range(fs, fd) or "copyfile"
            if method == "copyfile":
                fs.seek(0)
                fd.seek(0)
                fd.truncate()
                shutil.copyfileobj(fs, fd, 1 << 22)
        fd.flush()
        os.fsync(fd.fileno())
    return method


def _copy_range(fs, fd) -> str | None:
    """Kernel-side copy (no user-space buffers; may reflink on XFS/btrfs); None if unsupported."""
    if not hasattr(os, "copy_file_range"):
        return None
    size, off = os.fstat(fs.fileno()).st_size, 0
    try:
        while off < size:
            n = os.copy_file_range(fs.fileno(), fd.fileno(), size - off, off, off)
            if n == 0:
                break
            off += n
    except OSError as e:
        if e.errno in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL) and off == 0:
            return None
        raise
    return "copy_file_range" if off == size else None
