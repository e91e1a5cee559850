"""The one definition of a device model's identity: a content hash over its GGUF files.

Device and cloud both call ``model_id`` so "which model is this" never depends on file names or
paths: the same bytes give the same id on both sides, a patched model gets a new id.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from device.contracts.config import FILE_ROLES as ROLES  # the one list of a model's file roles


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_id_from_hashes(hashes: dict[str, str]) -> str:
    blob = "|".join(f"{r}={hashes[r]}" for r in ROLES if r in hashes)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def model_id(files: dict[str, str | Path]) -> str:
    return model_id_from_hashes({r: file_sha256(p) for r, p in files.items() if p is not None})
