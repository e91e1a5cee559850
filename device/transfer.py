"""Streaming bodies of the device's cloud client: a model-file upload that survives retries, a
patch download capped in size, and the one definition of an insecure cloud URL.  Kept apart from
``device/uplink.py`` so that the client reads as its endpoints.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
from tqdm import tqdm

from device.cloud_errors import CloudError

_FILE_CHUNK = 1 << 20  # bytes read per chunk of a streamed model-file upload
MAX_PATCH_BYTES = 64 << 20  # a patch larger than this is refused whatever the cloud announces


def stream_to_temp(response: httpx.Response, dest: Path,
                   max_bytes: int = MAX_PATCH_BYTES) -> tuple[Path, str, int]:
    """Write ``response``'s body to a temp file beside ``dest`` (fsynced), refusing more than
    ``max_bytes``; returns (temp path, sha256, size).  A failure leaves no temp file behind."""
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(name)
    h = hashlib.sha256()
    size = 0
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in response.iter_bytes(1 << 16):
                size += len(chunk)
                if size > max_bytes:
                    raise CloudError(f"patch download of {dest.name} passed the {max_bytes}-byte "
                                     "limit: refusing it")
                f.write(chunk)
                h.update(chunk)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, httpx.HTTPError):
            raise CloudError(f"patch download of {dest.name} broke off: {exc!r}") from exc
        raise
    return tmp, h.hexdigest(), size


class FileBody:
    """A re-iterable request body over one file: every iteration reads the file from its start,
    so a retried request sends all of it again (a generator would be spent after one try), and
    the progress bar is wound back by what the failed try had counted."""

    def __init__(self, path: Path, bar: tqdm) -> None:
        self.path = path
        self.bar = bar
        self.counted = 0

    def __iter__(self) -> Iterator[bytes]:
        if self.counted:
            self.bar.update(-self.counted)
            self.counted = 0
        with open(self.path, "rb") as f:
            while chunk := f.read(_FILE_CHUNK):
                self.counted += len(chunk)
                self.bar.update(len(chunk))
                yield chunk


_LOOPBACK = ("localhost", "::1", "[::1]")


def plain_http_warning(url: str) -> str | None:
    """See ``CloudClient.transport_warning``; the one definition of "insecure cloud URL"."""
    u = httpx.URL(url)
    host = (u.host or "").lower()
    if u.scheme != "http" or host in _LOOPBACK or host.startswith("127."):
        return None
    return (f"warning: {url} is plain HTTP: the device token, images and prompts cross the network "
            "unencrypted; use https:// (patches stay signature-checked either way)")
