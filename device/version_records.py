"""The version store's records: what a version is, what an apply reports, and small helpers.

Split from ``device/versions.py`` (the store's operations) so each file holds one idea.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from device.patch import sha256_file

CRASH_ENV = "CDCCA_CRASH_AT"
FILE_NAMES = {"model": "model.gguf", "mmproj": "mmproj.gguf"}
PENDING = ""  # a FileRecord.sha256 not computed yet (see ``VersionStore.identify``)


class VersionError(RuntimeError):
    """The store cannot do what was asked (no version, no path to it, a file's bytes changed)."""


def crash_point(step: str) -> None:
    """Test hook: SIGKILL ourselves at a named step (``CDCCA_CRASH_AT=<step>``), to prove that a
    crash at that instant leaves a recoverable store. Costs one dict lookup when unset."""
    if os.environ.get(CRASH_ENV) == step:
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


@dataclass(frozen=True)
class FileRecord:
    name: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Version:
    """One model state; ``files`` pins every file by sha256 so a switch can prove it."""

    id: str
    parent: str | None
    round_id: str
    created: str
    files: dict[str, FileRecord]
    patch_bytes: int = 0  # size of the patch file that made this version (0 for a base)
    note: str = ""

    @property
    def number(self) -> int:
        return int(self.id[1:])

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Version:
        return cls(**{**d, "files": {r: FileRecord(**f) for r, f in d["files"].items()}})


@dataclass(frozen=True)
class VersionPaths:
    """What the runtime loads; it hot-reloads from these after an apply or switch."""

    model: Path
    mmproj: Path | None = None

    def roles(self) -> dict[str, Path]:
        return {"model": self.model, **({"mmproj": self.mmproj} if self.mmproj else {})}


@dataclass(frozen=True)
class ApplyResult:
    version: Version
    paths: VersionPaths
    seconds: float
    bytes_written: int  # bytes written into the live files (== the patch payload)
    bytes_copied: int  # always 0 now: no copy of the model is made
    copy_method: str  # "in-place"
    timings: dict[str, float] = field(default_factory=dict)  # verify/journal/write/commit
    journal_bytes: int = 0  # the delta record kept for rollback (old + new bytes + header)


@dataclass(frozen=True)
class RecoverReport:
    removed: tuple[str, ...]
    relogged: tuple[str, ...]  # versions whose torn switch was rolled back or forward


def tree_steps(versions: dict[str, Version], src: str, dst: str) -> list[tuple[str, str]] | None:
    """Steps from src to dst in the version tree: undo up to the common ancestor, then redo down;
    None when they share no ancestor (a pruned link)."""

    def chain(v: str | None) -> list[str]:
        out = []
        while v is not None:
            out.append(v)
            v = versions[v].parent if v in versions else None
        return out

    up, down = chain(src), chain(dst)
    common = next((v for v in up if v in set(down)), None)
    if common is None:
        return None
    return [(v, "undo") for v in up[:up.index(common)]] + [(v, "redo") for v in reversed(down[:down.index(common)])]


# ---------------------------------------------------------------- file helpers

def _fingerprint(path: Path, sha256: str) -> list:
    st = path.stat()
    return [sha256, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _file_record(path: Path) -> FileRecord:
    return FileRecord(path.name, sha256_file(path), path.stat().st_size)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class _Laps:
    """Named phase timings, so apply can report where its time goes."""

    def __init__(self) -> None:
        self.t0 = self.last = time.perf_counter()
        self.times: dict[str, float] = {}

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.times[name], self.last = now - self.last, now

    @property
    def total(self) -> float:
        return time.perf_counter() - self.t0
