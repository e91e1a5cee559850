"""The cloud's copies of device models, keyed by ``model_id`` (content hash of the GGUF files).

A device uploads its base model once; after each round the cloud registers the patched files it
evaluated, so the device's next round finds its new version here without another upload.

Half-uploaded models wait in *staging* owned by the uploading device (issue 11, item 6):
``.stage-<owner>-<model_id>/``, where ``<owner>`` is a hash of the device name.  Another
device's upload of the same id never touches it, a device may park at most ``per_device``
stagings (a new one evicts its own oldest), and staging older than ``max_age_s`` is swept on
start and on every upload.

Given a blob URL (``blob_url``: many machines), the folder is this machine's cache and every
complete model is also published to ``<blob_url>/models/`` (cloud/model_blobs.py); a model the
cache lacks is fetched from there.  Staging stays local: only complete models are published.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

from device.contracts.model_id import ROLES, model_id

STAGE_PREFIX = ".stage-"
DRAFT_PREFIX = ".draft-"  # a round's new version being written (ModelRegistry.draft)


def owner_key(device: str) -> str:
    return hashlib.sha256(device.encode()).hexdigest()[:16]


class ModelRegistry:
    def __init__(self, root: Path, per_device: int = 2, max_age_s: float = 86400.0, url: str | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.per_device = per_device
        self.max_age_s = max_age_s
        self.remote = None
        if url is not None:
            from .model_blobs import RemoteModels

            self.remote = RemoteModels(url)

    @classmethod
    def from_settings(cls, settings) -> "ModelRegistry":
        """The one registry of a cloud process (API, worker, gc): ``<home>/cloud/models``,
        behind ``blob_url`` when set."""
        return cls(settings.cloud_dir / "models", settings.staging_per_device, settings.staging_max_age_s,
                   settings.blob_url)

    def _dir(self, mid: str) -> Path:
        if not mid.isalnum():
            raise ValueError(f"bad model id {mid!r}")
        return self.root / mid

    def _local(self, mid: str) -> dict[str, Path] | None:
        d = self._dir(mid)
        files = {r: d / f"{r}.gguf" for r in ROLES if (d / f"{r}.gguf").is_file()}
        return files if "model" in files else None  # a text-only model has no mmproj

    def get(self, mid: str) -> dict[str, Path] | None:
        """The model's local files, fetched from the blob URL first when only it holds them."""
        files = self._local(mid)
        if files is None and self.remote is not None:
            tmp = Path(tempfile.mkdtemp(prefix=f".fetch-{mid}-", dir=self.root))
            try:
                if self.remote.fetch(mid, tmp):
                    self._settle(tmp, mid)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            files = self._local(mid)
        return files

    def has(self, mid: str) -> bool:
        """Held here or at the blob URL (no download: the API only answers "present")."""
        return self._local(mid) is not None or (self.remote is not None and self.remote.exists(mid))

    def _settle(self, folder: Path, mid: str) -> None:
        """Rename a complete folder into place (losing a race to the same bytes is fine)."""
        try:
            folder.rename(self._dir(mid))
        except OSError:
            shutil.rmtree(folder, ignore_errors=True)

    def _publish(self, mid: str) -> None:
        if self.remote is not None:
            self.remote.publish(mid, self._local(mid))

    def ids(self) -> list[str]:
        local = {p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")}
        return sorted(local | set(self.remote.ids() if self.remote is not None else ()))

    def modified(self, mid: str) -> float:
        """When the model was registered (epoch s): its local folder, else its published copy."""
        d = self._dir(mid)
        if d.is_dir():
            return d.stat().st_mtime
        return self.remote.modified(mid) if self.remote is not None else time.time()

    def remove(self, mid: str) -> int:
        """Delete a held model; returns the bytes freed."""
        d = self._dir(mid)
        freed = sum(p.stat().st_size for p in d.glob("*") if p.is_file()) if d.is_dir() else 0
        shutil.rmtree(d, ignore_errors=True)
        if self.remote is not None:
            freed = max(freed, self.remote.remove(mid))
        return freed

    def put(self, files: dict[str, Path]) -> str:
        """Copy files in (atomically: a half-copied model is never visible); returns the id."""
        mid = model_id(files)
        if self._local(mid):
            self._publish(mid)
            return mid
        tmp = self.root / f".{mid}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        roles = [r for r in ROLES if files.get(r) is not None]
        for r in roles:
            shutil.copyfile(files[r], tmp / f"{r}.gguf")
        if model_id({r: tmp / f"{r}.gguf" for r in roles}) != mid:
            shutil.rmtree(tmp)
            raise ValueError("model files changed while being registered")
        try:
            tmp.rename(self._dir(mid))
        except OSError:  # another request registered it first
            shutil.rmtree(tmp, ignore_errors=True)
        self._publish(mid)
        return mid

    def draft(self) -> Path:
        """A private, empty folder inside the registry for a round's new version: the round writes
        (clones and patches) the files there, evaluates them, then :meth:`adopt` renames the folder
        into place -- one copy per file instead of scratch copy + registration copy.  A draft that
        is never adopted is the caller's to remove (``sweep`` removes stale ones)."""
        return Path(tempfile.mkdtemp(prefix=DRAFT_PREFIX, dir=self.root))

    def adopt(self, draft: Path, files: dict[str, Path]) -> str:
        """Register a draft's ``files`` ({role: file in ``draft``}) under their content id by renaming
        the folder (no copy); returns the id.  The draft is gone afterwards either way."""
        draft = Path(draft)
        if any(Path(p).parent != draft for p in files.values()) or "model" not in files:
            raise ValueError(f"adopt: {sorted(files)} are not the files of draft {draft.name}")
        for r, p in files.items():
            if Path(p).name != f"{r}.gguf":
                os.replace(p, draft / f"{r}.gguf")
        mid = model_id({r: draft / f"{r}.gguf" for r in files})
        if self._local(mid):
            shutil.rmtree(draft, ignore_errors=True)
        else:
            self._settle(draft, mid)
        self._publish(mid)
        return mid

    def put_role(self, mid: str, role: str, src: Path, owner: str = "") -> bool:
        """Stage one uploaded file in ``owner``'s staging; the model becomes visible once the
        staged files' content hash equals ``mid`` (model + mmproj, or the model alone for a
        text-only model).  True when complete."""
        if role not in ROLES:
            raise ValueError(f"unknown model file role {role!r}")
        self._dir(mid)  # validates the id
        self.sweep()
        staging = self.root / f"{STAGE_PREFIX}{owner_key(owner)}-{mid}"
        if not staging.is_dir():
            self._make_room(owner)
            staging.mkdir(mode=0o700)
        os.replace(src, staging / f"{role}.gguf")
        os.utime(staging)
        files = {r: staging / f"{r}.gguf" for r in ROLES if (staging / f"{r}.gguf").is_file()}
        if "model" not in files:
            return False
        got = model_id(files)  # the id says which files make the model: model alone = text-only
        if got != mid:
            if len(files) < len(ROLES):
                return False  # the mmproj is still to come
            shutil.rmtree(staging)
            raise ValueError(f"uploaded files hash to {got}, not {mid}")
        try:
            staging.rename(self._dir(mid))
        except OSError:  # another device completed the same model first: same bytes
            shutil.rmtree(staging, ignore_errors=True)
        self._publish(mid)
        return True

    def stagings(self, owner: str | None = None) -> list[Path]:
        prefix = STAGE_PREFIX + (owner_key(owner) + "-" if owner is not None else "")
        return sorted((p for p in self.root.iterdir() if p.name.startswith(prefix)),
                      key=lambda p: p.stat().st_mtime)

    def _make_room(self, owner: str) -> None:
        mine = self.stagings(owner)
        for old in mine[: max(0, len(mine) - self.per_device + 1)]:
            shutil.rmtree(old, ignore_errors=True)

    def sweep(self, max_age_s: float | None = None, dry_run: bool = False) -> int:
        """Remove staging and temp folders older than ``max_age_s``; returns how many."""
        cutoff = time.time() - (self.max_age_s if max_age_s is None else max_age_s)
        n = 0
        for p in self.root.iterdir():
            if p.name.startswith(".") and _mtime(p) < cutoff:
                n += 1
                if dry_run:
                    continue
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        return n


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return float("inf")
