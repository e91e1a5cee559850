"""The cloud's copies of device models, keyed by ``model_id`` (content hash of the GGUF files).

A device uploads its base model once; after each round the cloud registers the patched files it
evaluated, so the device's next round finds its new version here without another upload.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from device.contracts.model_id import ROLES, model_id


class ModelRegistry:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _dir(self, mid: str) -> Path:
        if not mid.isalnum():
            raise ValueError(f"bad model id {mid!r}")
        return self.root / mid

    def get(self, mid: str) -> dict[str, Path] | None:
        d = self._dir(mid)
        files = {r: d / f"{r}.gguf" for r in ROLES}
        return files if all(p.is_file() for p in files.values()) else None

    def put(self, files: dict[str, Path]) -> str:
        """Copy files in (atomically: a half-copied model is never visible); returns the id."""
        mid = model_id(files)
        if self.get(mid):
            return mid
        tmp = self.root / f".{mid}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for r in ROLES:
            shutil.copyfile(files[r], tmp / f"{r}.gguf")
        if model_id({r: tmp / f"{r}.gguf" for r in ROLES}) != mid:
            shutil.rmtree(tmp)
            raise ValueError("model files changed while being registered")
        try:
            tmp.rename(self._dir(mid))
        except OSError:  # another request registered it first
            shutil.rmtree(tmp, ignore_errors=True)
        return mid

    def put_role(self, mid: str, role: str, src: Path) -> bool:
        """Stage one uploaded file; the model becomes visible once both roles are present and
        their content hash equals ``mid``. Returns True when the model is complete."""
        if role not in ROLES:
            raise ValueError(f"unknown model file role {role!r}")
        staging = self.root / f".{mid}.upload"
        staging.mkdir(exist_ok=True)
        os.replace(src, staging / f"{role}.gguf")
        files = {r: staging / f"{r}.gguf" for r in ROLES}
        if not all(p.is_file() for p in files.values()):
            return False
        got = model_id(files)
        if got != mid:
            shutil.rmtree(staging)
            raise ValueError(f"uploaded files hash to {got}, not {mid}")
        try:
            staging.rename(self._dir(mid))
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
        return True
