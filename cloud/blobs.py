"""Content-addressed blob storage for sample payloads and patches: ``<root>/<sha[:2]>/<sha>``.

Two back ends behind one small class, because the common case must stay simple and durable:

* a local folder (the default, ``<home>/cloud/blobs``): tmp + fsync + rename, files 0600;
* any fsspec URL (``blob_url``: ``file:///shared/blobs``, ``s3://bucket/cdcca`` with s3fs, ...)
  so the API and workers on many machines share one store.  Objects are written under a temp
  key and moved into place, so a reader never sees half a blob.

Blobs are write-once and named by their hash: two writers of the same bytes cannot conflict,
and every read is verified.
"""
from __future__ import annotations

import hashlib
import secrets
from pathlib import Path
from typing import Callable

from device.contracts.atomic import write_bytes_atomic

PRIVATE_DIR = 0o700


def private_dir(path: Path) -> Path:
    """mkdir -p with owner-only permissions (issue 11, item 9): the cloud's folders hold users'
    images and prompts."""
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    if path.stat().st_mode & 0o077:
        path.chmod(PRIVATE_DIR)
    return path


def write_atomic(path: Path, data: bytes) -> None:
    """tmp + fsync + rename + dir fsync: a reader sees the old file or the whole new one, never a
    torn one. Files (the temp included) are 0600; a dead write's temp is ``.<sha>.<random>.tmp``."""
    private_dir(path.parent)
    write_bytes_atomic(path, data, mode=0o600)


def put_via_temp(fs, base: str, final: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` a temp key under ``base``, then move it to ``final``: object stores have no
    atomic rename of a growing file, so a reader never sees half an object this way."""
    tmp = f"{base.rstrip('/')}/.tmp-{secrets.token_hex(8)}"
    write(tmp)
    fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
    fs.mv(tmp, final)


class BlobStore:
    """``put(bytes) -> sha``, ``get(sha) -> bytes`` (verified), ``delete``, ``shas()``."""

    def __init__(self, root: Path, url: str | None = None) -> None:
        self.root = root
        self.url = url
        self._fs = None
        if url is not None:
            import fsspec

            self._fs, self._base = fsspec.core.url_to_fs(url)
            self._fs.makedirs(self._base, exist_ok=True)

    def key(self, sha: str) -> str:
        """Where a blob lives, as stored in the database (relative, back-end neutral)."""
        return f"blobs/{sha[:2]}/{sha}"

    def path_for(self, sha: str) -> Path:
        """The local file of a blob (local back end only)."""
        return self.root / sha[:2] / sha

    def _remote(self, sha: str) -> str:
        return f"{self._base.rstrip('/')}/{sha[:2]}/{sha}"

    def put(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if self._fs is None:
            path = self.path_for(sha)
            if not path.is_file():
                write_atomic(path, data)
            return sha
        final = self._remote(sha)
        if not self._fs.exists(final):
            put_via_temp(self._fs, self._base, final, lambda tmp: self._fs.pipe_file(tmp, data))
        return sha

    def get(self, sha: str) -> bytes:
        data = self.path_for(sha).read_bytes() if self._fs is None else self._fs.cat_file(self._remote(sha))
        if hashlib.sha256(data).hexdigest() != sha:
            raise OSError(f"blob {sha} is corrupt (sha256 mismatch)")
        return data

    def exists(self, sha: str) -> bool:
        return self.path_for(sha).is_file() if self._fs is None else self._fs.exists(self._remote(sha))

    def delete(self, sha: str) -> None:
        if self._fs is None:
            self.path_for(sha).unlink(missing_ok=True)
        elif self._fs.exists(self._remote(sha)):
            self._fs.rm_file(self._remote(sha))

    def shas(self) -> set[str]:
        """Every blob held (for garbage collection)."""
        if self._fs is None:
            return {p.name for p in self.root.glob("??/*") if len(p.name) == 64}
        found = self._fs.glob(f"{self._base.rstrip('/')}/??/*")
        return {p.rsplit("/", 1)[-1] for p in found if len(p.rsplit("/", 1)[-1]) == 64}
