"""Device models in object storage (issue 13, item 4): ``<blob_url>/models/<model_id>/``.

Why: with the API and the workers on different machines, a model one device uploaded to the
API must reach whichever worker claims its round, and the version a round registers must reach
the API that serves the next round -- without a shared folder.  So :class:`cloud.registry.ModelRegistry`
keeps its local folder as a *cache* (llama.cpp and the GGUF readers need local files) and, given
a URL, publishes every complete model here and fetches the ones it lacks.

Layout: ``<role>.gguf`` for each file, then ``complete`` (JSON: roles and sizes) written last, so
a reader never takes a half-published model for a whole one.  Files are written under a temp key
and moved into place (like cloud.blobs).  Models are content-addressed: two publishers of one id
write the same bytes, and every fetch is checked against the id.  Staging (half-uploaded models,
issue 11) never comes here: it stays in the API's local folder until the model is complete.
"""
from __future__ import annotations

import json
import shutil
import time
from datetime import datetime
from pathlib import Path

from device.contracts.model_id import ROLES, model_id

from .blobs import put_via_temp

MARKER = "complete"


class RemoteModels:
    def __init__(self, url: str) -> None:
        import fsspec

        self.url = url.rstrip("/")
        self.fs, base = fsspec.core.url_to_fs(self.url)
        self.base = f"{base.rstrip('/')}/models"
        self.fs.makedirs(self.base, exist_ok=True)

    def _key(self, mid: str, name: str = "") -> str:
        return f"{self.base}/{mid}" + (f"/{name}" if name else "")

    def exists(self, mid: str) -> bool:
        return self.fs.exists(self._key(mid, MARKER))

    def publish(self, mid: str, files: dict[str, Path]) -> None:
        """Upload a complete local model (``{role: path}``) unless it is already there."""
        if self.exists(mid):
            return
        for role, path in files.items():
            put_via_temp(self.fs, self.base, self._key(mid, f"{role}.gguf"),
                         lambda tmp, src=str(path): self.fs.put_file(src, tmp))
        sizes = {r: Path(p).stat().st_size for r, p in files.items()}
        self.fs.pipe_file(self._key(mid, MARKER), json.dumps(sizes).encode())

    def fetch(self, mid: str, dest: Path) -> bool:
        """Download ``mid`` into the (new, empty) folder ``dest``; False when it is not held.
        Raises when the bytes do not hash to ``mid``."""
        if not self.exists(mid):
            return False
        sizes = json.loads(self.fs.cat_file(self._key(mid, MARKER)))
        roles = [r for r in ROLES if r in sizes]
        for r in roles:
            self.fs.get_file(self._key(mid, f"{r}.gguf"), str(dest / f"{r}.gguf"))
        got = model_id({r: dest / f"{r}.gguf" for r in roles})
        if got != mid:
            shutil.rmtree(dest, ignore_errors=True)
            raise OSError(f"model {mid} in {self.url} is corrupt (its files hash to {got})")
        return True

    def ids(self) -> list[str]:
        found = self.fs.glob(f"{self.base}/*/{MARKER}")
        names = (p.rstrip("/").rsplit("/", 2)[-2] for p in found)
        return sorted(n for n in names if n.isalnum())  # a bucket's odd names never become local paths

    def remove(self, mid: str) -> int:
        """Delete a published model; returns the bytes freed."""
        if not self.fs.exists(self._key(mid)):
            return 0
        freed = sum(json.loads(self.fs.cat_file(self._key(mid, MARKER))).values()) if self.exists(mid) else 0
        self.fs.rm(self._key(mid), recursive=True)
        return freed

    def modified(self, mid: str) -> float:
        """When ``mid`` was published (epoch seconds); now when the back end does not say, so
        a model of unknown age is treated as young and kept."""
        info = self.fs.info(self._key(mid, MARKER))
        stamp = info.get("mtime", info.get("LastModified", info.get("updated", info.get("created"))))
        if isinstance(stamp, datetime):
            return stamp.timestamp()
        if isinstance(stamp, str):
            try:
                return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
            except ValueError:
                return time.time()
        return float(stamp) if stamp is not None else time.time()
