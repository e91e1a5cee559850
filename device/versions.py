"""Versioned model store: every patch makes a new immutable version; CURRENT names the live one.

Layout (one store per model)::

    <device_dir>/models/<name>/CURRENT          "v3\\n": the active version (the commit point)
    <device_dir>/models/<name>/versions.json    log of committed versions (+ the next free number)
    <device_dir>/models/<name>/v<N>/            model.gguf [mmproj.gguf] version.json (its own record)

Why copies: llama.cpp memory-maps the model and in-place writes are not crash-safe, so a patch is
written into a private copy of the files it touches (reflink when the filesystem can, else a
kernel-side copy_file_range); files it does not touch are hard-linked (safe: committed files are
never written again, and are made read-only to keep it so). The base is COPIED in, never linked:
the store must own bytes that nobody outside it can change.

Cost (measured on ext4, 2 cores; no reflink there): apply = verify + clone of the touched file
(with fsync) + a patch-sized write + sha256 of the new file for the log + 4 fsyncs to commit.
A 128 KiB patch: 16 MiB model ~70 ms; 256 MiB ~430 ms (copy 223, hash 197, write 0.7); 1 GiB
~4.8 s (copy+fsync 3.9 s, hash 0.8 s, write 0.7 ms). So it is O(file), not O(patch), unless the
filesystem reflinks; the price buys an untouched parent for rollback and a never-torn live model.

Atomicity: a version directory is built under ``.staging-v<N>`` and renamed into place only when
complete and fsynced; CURRENT is replaced atomically (tmp + fsync + rename + dir fsync) and is
the single commit point; versions.json is updated after it. ``recover()`` deletes staging dirs and
any ``v<N>`` that is neither CURRENT nor logged, and re-logs a CURRENT the log missed.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from gguf import GGUFReader

from device.contracts.patch_format import read_patch
from device.patch import (
    clone_file, fcntl, fsync_dir, plan_patch, sha256_file, verify_written, write_durable, write_placements,
)

CRASH_ENV = "CDCCA_CRASH_AT"
FILE_NAMES = {"model": "model.gguf", "mmproj": "mmproj.gguf"}
RECORD = "version.json"


class VersionError(RuntimeError):
    """The store cannot do what was asked (no version, no parent, a file's bytes changed)."""


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
    """One immutable model state; ``files`` pins every file by sha256 so rollback can prove it."""

    id: str
    parent: str | None
    round_id: str
    created: str
    files: dict[str, FileRecord]
    patch_bytes: int = 0
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
    """What the runtime loads; it hot-reloads from these after an apply or rollback."""

    model: Path
    mmproj: Path | None = None

    def roles(self) -> dict[str, Path]:
        return {"model": self.model, **({"mmproj": self.mmproj} if self.mmproj else {})}


@dataclass(frozen=True)
class ApplyResult:
    version: Version
    paths: VersionPaths
    seconds: float
    bytes_written: int  # payload bytes written into the new version (besides the copy)
    bytes_copied: int  # bytes cloned so that the parent stays intact for rollback
    copy_method: str  # reflink / copy_file_range / copyfile (how the clone was made)
    timings: dict[str, float] = field(default_factory=dict)  # verify/copy/write/check/commit


@dataclass(frozen=True)
class RecoverReport:
    removed: tuple[str, ...]
    relogged: tuple[str, ...]


class VersionStore:
    """Versions of one model under ``root/name`` (root is ``<device_dir>/models``)."""

    def __init__(self, root: str | os.PathLike, name: str = "default") -> None:
        self.dir = Path(root) / name
        self.name = name

    # ------------------------------------------------------------ queries
    def installed(self) -> bool:
        """True once a base has been committed (CURRENT exists)."""
        return (self.dir / "CURRENT").is_file()

    def current(self) -> Version:
        """The active version (readable without the lock: CURRENT only ever changes by rename)."""
        try:
            vid = (self.dir / "CURRENT").read_text().strip()
        except FileNotFoundError:
            raise VersionError(f"{self.dir}: no model installed") from None
        return self._record(vid)

    def list(self) -> list[Version]:
        return sorted(self._load_log()["versions"].values(), key=lambda v: v.number)

    def paths(self, version: Version | str) -> VersionPaths:
        v = self._record(version) if isinstance(version, str) else version
        d = self.dir / v.id
        return VersionPaths(d / FILE_NAMES["model"], d / FILE_NAMES["mmproj"] if "mmproj" in v.files else None)

    # ------------------------------------------------------------ install / apply / rollback
    def install_base(self, model_path: str | os.PathLike, mmproj_path: str | os.PathLike | None = None,
                     note: str = "base") -> Version:
        """Copy the base GGUF(s) in as v0 (copy, not link: see module docstring)."""
        sources = {"model": Path(model_path), **({"mmproj": Path(mmproj_path)} if mmproj_path else {})}
        for role, src in sources.items():
            try:
                GGUFReader(src, "r")
            except Exception as e:
                raise VersionError(f"{src}: not a loadable GGUF {role} file ({e})") from None
        self.dir.mkdir(parents=True, exist_ok=True)
        with self._lock():
            self._recover_locked()
            if self.installed():
                raise VersionError(f"{self.dir}: already installed (current {self.current().id})")
            staging = self._staging("v0")
            files = {}
            for role, src in sources.items():
                clone_file(src, staging / FILE_NAMES[role])
                files[role] = _file_record(staging / FILE_NAMES[role])
            v = Version("v0", None, "", _now(), files, 0, note)
            return self._commit(staging, v, {"next": 1})

    def apply_patch(self, patch_path: str | os.PathLike) -> ApplyResult:
        """Verify the patch fully, build v<N+1> from a copy, commit by switching CURRENT."""
        laps = _Laps()
        with self._lock():
            self._recover_locked()
            cur = self.current()
            cur_files = self.paths(cur).roles()
            patch = read_patch(patch_path)
            placements = plan_patch(patch, cur_files)  # every refusal happens here: nothing written yet
            laps("verify")
            log = self._load_log()
            staging = self._staging(f"v{log['next']}")
            try:
                touched = {p.entry.role for p in placements}
                copied, method = self._populate(staging, cur, touched)
                laps("copy")
                crash_point("copy")
                new_files = {r: staging / FILE_NAMES[r] for r in cur_files}
                written = sum(write_placements(new_files[r], [p for p in placements if p.entry.role == r],
                                               crash_point) for r in sorted(touched))
                laps("write")
                verify_written(patch, placements, new_files)
                files = {r: _file_record(new_files[r]) if r in touched else cur.files[r] for r in cur_files}
                laps("check")
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            v = Version(f"v{log['next']}", cur.id, patch.meta.round_id, _now(), files,
                        patch.payload_bytes, patch.meta.note)
            self._commit(staging, v, {"next": log["next"] + 1})
            laps("commit")
        return ApplyResult(v, self.paths(v), laps.total, written, copied, method, dict(laps.times))

    def rollback(self) -> Version:
        """Make the current version's parent current again, after proving its bytes by sha256."""
        with self._lock():
            self._recover_locked()
            cur = self.current()
            if cur.parent is None:
                raise VersionError(f"{self.dir}: {cur.id} is the base; nothing to roll back to")
            parent = self._record(cur.parent)
            for role, path in self.paths(parent).roles().items():
                if not path.is_file() or sha256_file(path) != parent.files[role].sha256:
                    raise VersionError(f"{path}: bytes differ from the record of {parent.id}; not switching")
            crash_point("rollback")
            self._set_current(parent.id)
            return parent

    def prune(self, keep: int = 3) -> list[str]:
        """Delete versions except v0, the current one and its ``keep - 1`` nearest ancestors.
        The log is rewritten first, so a crash mid-delete leaves only unlogged dirs (garbage)."""
        with self._lock():
            self._recover_locked()
            log = self._load_log()
            keep_ids, vid = {"v0"}, self.current().id
            while vid is not None and len(keep_ids) < keep + 1:
                keep_ids.add(vid)
                vid = log["versions"][vid].parent
            doomed = [v for v in log["versions"] if v not in keep_ids]
            for v in doomed:
                del log["versions"][v]
            self._save_log(log)
            for v in doomed:
                shutil.rmtree(self.dir / v, ignore_errors=True)
            return doomed

    def recover(self) -> RecoverReport:
        """Clean up after a crash: call on start. Never touches CURRENT or a logged version."""
        if not self.dir.is_dir():
            return RecoverReport((), ())
        with self._lock():
            return self._recover_locked()

    # ------------------------------------------------------------ internals
    def _recover_locked(self) -> RecoverReport:
        removed, relogged = [], []
        for p in self.dir.iterdir():
            if p.name.startswith(".staging-") or ".tmp-" in p.name:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
                removed.append(p.name)
        log = self._load_log()
        cur = (self.dir / "CURRENT").read_text().strip() if self.installed() else None
        if cur is not None and cur not in log["versions"]:
            v = Version.from_json(json.loads((self.dir / cur / RECORD).read_text()))
            log["versions"][cur] = v
            log["next"] = max(log["next"], v.number + 1)
            self._save_log(log)
            relogged.append(cur)
        for p in self.dir.iterdir():
            if p.is_dir() and p.name[:1] == "v" and p.name[1:].isdigit() and p.name != cur \
                    and p.name not in log["versions"]:
                shutil.rmtree(p)
                removed.append(p.name)
        if removed:
            fsync_dir(self.dir)
        return RecoverReport(tuple(removed), tuple(relogged))

    def _populate(self, staging: Path, cur: Version, touched: set[str]) -> tuple[int, str]:
        """Clone the files the patch touches; hard-link the rest. Returns (bytes cloned, method)."""
        copied, method = 0, "none"
        for role in cur.files:
            src, dst = self.dir / cur.id / FILE_NAMES[role], staging / FILE_NAMES[role]
            if role in touched:
                method = clone_file(src, dst)
                copied += dst.stat().st_size
            else:
                os.link(src, dst)
        return copied, method

    def _commit(self, staging: Path, v: Version, log_update: dict) -> Version:
        """Seal the staging dir, rename it into place, switch CURRENT, then log it."""
        for role in v.files:
            os.chmod(staging / FILE_NAMES[role], 0o444)
        write_durable(staging / RECORD, json.dumps(v.to_json(), indent=1))
        fsync_dir(staging)
        crash_point("staged")
        os.rename(staging, self.dir / v.id)
        fsync_dir(self.dir)
        crash_point("renamed")
        self._set_current(v.id)
        crash_point("switched")
        log = self._load_log()
        log["versions"][v.id] = v
        log.update(log_update)
        self._save_log(log)
        crash_point("logged")
        return v

    def _set_current(self, vid: str) -> None:
        tmp = self.dir / f"CURRENT.tmp-{os.getpid()}"
        write_durable(tmp, vid + "\n")
        crash_point("current_tmp")
        os.replace(tmp, self.dir / "CURRENT")
        fsync_dir(self.dir)

    def _record(self, vid: str) -> Version:
        v = self._load_log()["versions"].get(vid)
        if v is None:  # CURRENT switched but the log not yet updated (crash window): own record
            try:
                v = Version.from_json(json.loads((self.dir / vid / RECORD).read_text()))
            except FileNotFoundError:
                raise VersionError(f"{self.dir}: unknown version {vid!r}") from None
        return v

    def _load_log(self) -> dict:
        try:
            raw = json.loads((self.dir / "versions.json").read_text())
        except FileNotFoundError:
            return {"model": self.name, "next": 0, "versions": {}}
        return {**raw, "versions": {d["id"]: Version.from_json(d) for d in raw["versions"]}}

    def _save_log(self, log: dict) -> None:
        out = {**log, "versions": [v.to_json() for v in sorted(log["versions"].values(), key=lambda v: v.number)]}
        tmp = self.dir / f"versions.json.tmp-{os.getpid()}"
        write_durable(tmp, json.dumps(out, indent=1))
        os.replace(tmp, self.dir / "versions.json")
        fsync_dir(self.dir)

    def _staging(self, vid: str) -> Path:
        staging = self.dir / f".staging-{vid}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        return staging

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """One writer at a time per store (an apply racing a rollback would lose one of them)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "a+") as f:
            if fcntl is None:  # pragma: no cover - non-POSIX: single-process use assumed
                yield
                return
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------- file helpers

def _file_record(path: Path) -> FileRecord:
    return FileRecord(path.name, sha256_file(path), path.stat().st_size)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class _Laps:
    """Named phase timings, so apply can report where its time goes (copy vs write)."""

    def __init__(self) -> None:
        self.t0 = self.last = time.perf_counter()
        self.times: dict[str, float] = {}

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.times[name], self.last = now - self.last, now

    @property
    def total(self) -> float:
        return time.perf_counter() - self.t0
