"""Atomic replacement of small files: a crash at any instant leaves the old file or the new one.

Writing a file in place can be interrupted half-way (a kill, a full disk, a power cut), and a
reader then sees a torn file: half a JSON document, a truncated ``.npz``, a commit record naming
nothing. Every small file cdcca rewrites therefore goes the same way, and only through here:

1. the new bytes go to a **temp file in the same folder** (``.<name>.<random>.tmp``, created
   exclusively, with the caller's permission bits from the start, so a 0600 file is never
   readable by others even for an instant). Same folder, because ``os.replace`` is atomic only
   within one file system, and the folder decides that;
2. the temp file is **flushed and fsynced** before it is renamed. Without this a power cut after
   the rename can leave the *new name* with missing data on disk (the rename reached the
   journal, the data did not): a torn file, the very thing this avoids;
3. ``os.replace`` swaps it onto the target in one step: readers see the old file or the whole new
   one, never a mix;
4. the **folder is fsynced** (``sync_dir``, the default) so the rename itself survives a power cut
   before anything that relies on it happens (a commit record moving, a journal being dropped).
   A site whose file is merely a cache or an output nobody orders later writes against may pass
   ``sync_dir=False``: losing the rename then only brings the old file back, which is still
   "old or new".

If the writer raises (or the rename fails), the temp file is removed and the error propagates;
the target is untouched. A process killed mid-write leaves only its temp file behind, which is
recognisable by name (``temp_target``) so a recovery pass or a garbage collector can drop it.

Torch-free and dependency-free: both device/ and cloud/ use it.
"""
from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

TEMP_SUFFIX = ".tmp"


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in ``path`` durable; platforms that cannot open a directory skip it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_target(name: str) -> str | None:
    """The target file name if ``name`` is one of this module's temp files, else None
    (``".CURRENT.1a2b3c4d.tmp"`` -> ``"CURRENT"``)."""
    if not (name.startswith(".") and name.endswith(TEMP_SUFFIX)):
        return None
    target, dot, rand = name[1:-len(TEMP_SUFFIX)].rpartition(".")
    return target if dot and target and rand else None


def _create_temp(path: Path, mode: int | None) -> tuple[int, Path]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(16):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
        try:
            return os.open(tmp, flags, 0o666 if mode is None else mode), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path}: could not create a temp file beside it")


def _commit(tmp: Path, path: Path, sync_dir: bool) -> None:
    os.replace(tmp, path)
    if sync_dir:
        fsync_dir(path.parent)


@contextmanager
def atomic_open(path: str | os.PathLike, text: bool = False, *, mode: int | None = None,
                sync_dir: bool = True) -> Iterator[IO]:
    """``with atomic_open(p) as f: f.write(...)``: a file object on a temp file beside ``p``
    that replaces ``p`` when the block ends normally (after flush + fsync), and is removed if
    the block raises. For writers that stream; ``text=True`` gives a UTF-8 text file.

    ``mode``: permission bits of the new file, subject to the umask as with ``os.open``
    (None: 0o666 & ~umask, like ``open()``). The folder must exist."""
    path = Path(path)
    fd, tmp = _create_temp(path, mode)
    try:
        with os.fdopen(fd, "w" if text else "wb", **({"encoding": "utf-8"} if text else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _commit(tmp, path, sync_dir)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_path(path: str | os.PathLike, *, mode: int | None = None, sync_dir: bool = True) -> Iterator[Path]:
    """``with atomic_path(p) as tmp: library_write(tmp)``: for writers that take a path and open
    it themselves. ``tmp`` exists (empty, with ``mode``) when the block starts; when the block
    ends normally it is fsynced and replaces ``p``; if the block raises it is removed."""
    path = Path(path)
    fd, tmp = _create_temp(path, mode)
    os.close(fd)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _commit(tmp, path, sync_dir)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, mode: int | None = None,
                       sync_dir: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically and durably (see the module docstring)."""
    with atomic_open(path, mode=mode, sync_dir=sync_dir) as f:
        f.write(data)


def write_text_atomic(path: str | os.PathLike, text: str, *, mode: int | None = None,
                      sync_dir: bool = True) -> None:
    """``write_bytes_atomic`` of ``text`` encoded as UTF-8."""
    write_bytes_atomic(path, text.encode("utf-8"), mode=mode, sync_dir=sync_dir)
