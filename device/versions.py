"""Versioned model store: one live copy of the model, patched in place; versions are delta records.

Layout (one store per model)::

    <device_dir>/models/<name>/CURRENT        "v3\\n": the version the live files hold (the commit point)
    <device_dir>/models/<name>/versions.json  log of versions (+ the next free number, + a stat
                                              fingerprint of the live files, see ``check``)
    <device_dir>/models/<name>/live/          model.gguf [mmproj.gguf]: what llama.cpp memory-maps
    <device_dir>/models/<name>/undo/v<N>.delta  old + new bytes of every span v<N> changed
    <device_dir>/models/<name>/JOURNAL        only while a switch is in flight (device/journal.py)

Why in place: a full copy per version costs O(model) time and disk (4.8 s and 1 GiB per version of
a 1 GiB model); a patch changes kilobytes. The write-ahead journal (device/journal.py) makes the
in-place write crash-safe on any filesystem: old and new bytes are durable before the live file is
touched, CURRENT is the commit record, recovery on start rolls a torn switch back or forward.
Any version whose delta chain to the current one is kept can be switched to (back AND forward);
``prune`` drops the versions beyond a retention count together with their records.

The store knows the sha256 each version's files must have. ``check`` proves the live files are those
bytes before they are loaded: a (inode, size, mtime, ctime) fingerprint taken right after the
store's own write avoids re-hashing on every start; any other change to the file (it was replaced,
copied over, edited) changes the fingerprint (ctime cannot be set from user space), and the file is
re-hashed and refused if it differs. llama.cpp memory-maps the live file, so a running runtime
sees the new text-model bytes at once (``Runtime.refresh``; an mmproj change needs a reload); do not
decode during an apply (``before_write`` is called right before the first in-place byte).
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

from device import journal as jr
from device.contracts.atomic import atomic_open, fsync_dir, write_text_atomic
from device.contracts.gguf_index import GGUFIndexError, read_index
from device.contracts.patch_format import PatchError, read_patch
from device.patch import clone_file, fcntl, plan_patch, sha256_file, verify_written
from device.version_recovery import Recovery
from device.version_records import (  # noqa: F401  (re-exported: callers import them from here)
    CRASH_ENV, FILE_NAMES, PENDING, ApplyResult, FileRecord, RecoverReport, Version, VersionError, VersionPaths,
    _fingerprint, _file_record, _Laps, _now, crash_point, tree_steps,
)

DEFAULT_KEEP = 20  # versions kept by prune(): records are ~2x a patch, so history is cheap
class VersionStore(Recovery):
    """Versions of one model under ``root/name`` (root is ``<device_dir>/models``)."""

    def __init__(self, root: str | os.PathLike, name: str = "default", keep: int = DEFAULT_KEEP) -> None:
        self.dir = Path(root) / name
        self.name = name
        self.keep = keep  # retention: every apply prunes the history down to this many versions
        self.live = self.dir / "live"
        self.undo = self.dir / "undo"

    # ------------------------------------------------------------ queries
    def installed(self) -> bool:
        return (self.dir / "CURRENT").is_file()

    def current(self) -> Version:
        try:
            vid = (self.dir / "CURRENT").read_text().strip()
        except FileNotFoundError:
            raise VersionError(f"{self.dir}: no model installed") from None
        return self.version(vid)

    def version(self, vid: str) -> Version:
        v = self._load_log()["versions"].get(vid)
        if v is None:
            raise VersionError(f"{self.dir}: unknown version {vid!r}")
        return v

    def list(self) -> list[Version]:
        return sorted(self._load_log()["versions"].values(), key=lambda v: v.number)

    def paths(self, version: Version | str | None = None) -> VersionPaths:
        """The live files; only the current version has files (switch to another one first)."""
        vid = version.id if isinstance(version, Version) else version
        cur = self.current()
        if vid is not None and vid != cur.id:
            raise VersionError(f"{self.dir}: {vid} is not the current version ({cur.id}); switch to it first")
        return VersionPaths(self.live / FILE_NAMES["model"],
                            self.live / FILE_NAMES["mmproj"] if "mmproj" in cur.files else None)

    def check(self) -> Version:
        """Prove the live files hold the current version's bytes before anyone loads them."""
        cur = self.current()
        fp = self._load_log().get("fingerprint", {})
        for role, rec in cur.files.items():
            p = self.live / FILE_NAMES[role]
            if not p.is_file():
                raise VersionError(f"{p}: missing; the store's {cur.id} cannot be loaded")
            if fp.get(role) == _fingerprint(p, rec.sha256):
                continue
            if rec.sha256 == PENDING:
                raise VersionError(f"{p}: changed since cdcca patched it, before its hash was recorded; "
                                   "refusing to load it")
            if p.stat().st_size != rec.size or sha256_file(p) != rec.sha256:
                raise VersionError(f"{p}: bytes differ from the record of {cur.id} (the file was replaced or "
                                   "changed outside cdcca); refusing to load it")
            self._save_fingerprint({role: p})
        return cur

    def identify(self) -> Version:
        """The current version with every file's sha256 known: an apply writes O(patch) bytes and
        leaves the whole-file hash (an O(model) read, the version's identity for the cloud) to
        the first use; this computes and records it, after ``check`` proved the bytes are ours."""
        with self._lock():
            self._recover_locked()
            return self._identify_locked(self.check())

    def _identify_locked(self, cur: Version) -> Version:
        pending = [r for r, rec in cur.files.items() if rec.sha256 == PENDING]
        if not pending:
            return cur
        files = self.paths_for(cur).roles()
        recs = {**cur.files, **{r: _file_record(files[r]) for r in pending}}
        log = self._load_log()
        v = log["versions"][cur.id] = replace(cur, files=recs)
        self._save_log(log)
        self._save_fingerprint({r: files[r] for r in pending}, recs)
        return v

    # ------------------------------------------------------------ install / apply / switch
    def install_base(self, model_path: str | os.PathLike, mmproj_path: str | os.PathLike | None = None,
                     note: str = "base") -> Version:
        """Copy the base GGUF(s) in as v0 (a copy, not a link: the store must own its bytes)."""
        sources = {"model": Path(model_path), **({"mmproj": Path(mmproj_path)} if mmproj_path else {})}
        for role, src in sources.items():
            try:
                read_index(src)
            except GGUFIndexError as e:
                raise VersionError(f"not a loadable GGUF {role} file: {e}") from None
        self.dir.mkdir(parents=True, exist_ok=True)
        with self._lock():
            self._recover_locked()
            if self.installed():
                raise VersionError(f"{self.dir}: already installed (current {self.current().id})")
            shutil.rmtree(self.live, ignore_errors=True)
            staging = self.dir / ".staging-live"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            files = {}
            for role, src in sources.items():
                clone_file(src, staging / FILE_NAMES[role])
                os.chmod(staging / FILE_NAMES[role], 0o444)
                files[role] = _file_record(staging / FILE_NAMES[role])
            fsync_dir(staging)
            os.rename(staging, self.live)
            self.undo.mkdir(exist_ok=True)
            fsync_dir(self.dir)
            v = Version("v0", None, "", _now(), files, 0, note)
            log = {"model": self.name, "next": 1, "versions": {"v0": v}}
            self._save_log(log)
            self._save_fingerprint(self.paths_for(v).roles(), files)
            self._set_current("v0")
            return v

    def apply_patch(self, patch_path: str | os.PathLike,
                    before_write: Callable[[], None] | None = None) -> ApplyResult:
        """Verify the patch against the exact current version, then write it in place (journaled)."""
        laps = _Laps()
        with self._lock():
            self._recover_locked()
            cur = self.check()
            files = self.paths_for(cur).roles()
            patch = read_patch(patch_path)
            if patch.meta.parent_version and patch.meta.parent_version != cur.id:
                raise PatchError(f"{patch.path}: built for version {patch.meta.parent_version}, the device is at "
                                 f"{cur.id}; nothing written")
            placements = plan_patch(patch, files)  # every refusal happens here: nothing written yet
            cur = self._identify_locked(cur)  # its hash must be known before its bytes go
            laps("verify")
            log = self._load_log()
            vid = f"v{log['next']}"
            spans = []
            for pl in placements:
                with open(files[pl.entry.role], "rb") as f:
                    f.seek(pl.file_offset)
                    spans.append((pl.entry.role, pl.file_offset, f.read(pl.entry.nbytes), pl.payload))
            delta = jr.make_delta(vid, cur.id, spans)
            jbytes = jr.write_delta(self.undo / f"{vid}.delta", delta)
            crash_point("undo")
            # patch_bytes: the patch *file* (what the round downloaded), the one patch size the faces show
            v_stub = Version(vid, cur.id, patch.meta.round_id, _now(), cur.files, os.path.getsize(patch_path),
                             patch.meta.note)
            jr.write_journal(self.dir / "JOURNAL", jr.Journal(cur.id, vid, ((vid, "redo"),), v_stub.to_json()))
            crash_point("journal")
            laps("journal")
            if before_write is not None:
                before_write()
            written = self._write(files, delta, "redo")
            crash_point("written")
            verify_written(patch, placements, files)
            laps("write")
            touched = {s.role for s in delta.spans}
            recs = {r: FileRecord(FILE_NAMES[r], PENDING, files[r].stat().st_size) if r in touched else cur.files[r]
                    for r in cur.files}
            v = Version(vid, cur.id, patch.meta.round_id, v_stub.created, recs, v_stub.patch_bytes, patch.meta.note)
            log["versions"][vid] = v
            log["next"] += 1
            self._save_log(log)
            crash_point("logged")
            self._save_fingerprint({r: files[r] for r in touched}, recs)
            self._set_current(vid)
            crash_point("switched")
            (self.dir / "JOURNAL").unlink()
            fsync_dir(self.dir)
            if len(log["versions"]) > self.keep:
                self._prune_locked(self.keep)
            laps("commit")
        return ApplyResult(v, self.paths_for(v), laps.total, written, 0, "in-place", dict(laps.times), jbytes)

    def rollback(self) -> Version:
        """Switch to the current version's parent."""
        cur = self.current()
        if cur.parent is None:
            raise VersionError(f"{self.dir}: {cur.id} is the base; nothing to roll back to")
        return self.switch(cur.parent)

    def switch(self, target: str, before_write: Callable[[], None] | None = None) -> Version:
        """Make any kept version current -- back or forward -- by replaying delta records."""
        with self._lock():
            self._recover_locked()
            cur = self._identify_locked(self.check())
            tv = self.version(target)
            if tv.id == cur.id:
                return cur
            steps = self._path(cur.id, tv.id)
            deltas = {v: jr.read_delta(self.undo / f"{v}.delta") for v, _ in steps}
            files = self.paths_for(cur).roles()
            jr.write_journal(self.dir / "JOURNAL", jr.Journal(cur.id, tv.id, tuple(steps)))
            crash_point("rollback")
            if before_write is not None:
                before_write()
            for v, d in steps:
                self._write(files, deltas[v], d)
            if steps and not jr.spans_hold(files, deltas[steps[-1][0]], steps[-1][1]):
                raise VersionError(f"{self.dir}: bytes after switching to {tv.id} do not match its record")
            self._save_fingerprint(files, tv.files)
            self._set_current(tv.id)
            crash_point("switched")
            (self.dir / "JOURNAL").unlink()
            fsync_dir(self.dir)
            return tv

    def prune(self, keep: int = DEFAULT_KEEP) -> list[str]:
        """Keep ``keep`` versions: the current one and, newest first, versions joined to it by kept
        delta records (parents to roll back to, children to roll forward to); drop the rest and
        their records. The log is rewritten first, so a crash mid-delete leaves only unlogged
        records (removed by ``recover``)."""
        with self._lock():
            self._recover_locked()
            return self._prune_locked(keep)

    def _prune_locked(self, keep: int) -> list[str]:
        log = self._load_log()
        keep_ids = {self.current().id}
        newest_first = sorted(log["versions"].values(), key=lambda v: -v.number)
        while len(keep_ids) < max(1, keep):  # grow a connected set around current, newest first
            nxt = next((v.id for v in newest_first if v.id not in keep_ids and (
                v.parent in keep_ids or any(log["versions"][k].parent == v.id for k in keep_ids))), None)
            if nxt is None:
                break
            keep_ids.add(nxt)
        oldest = {v for v in keep_ids if log["versions"][v].parent not in keep_ids}
        doomed = sorted((v for v in log["versions"] if v not in keep_ids), key=lambda x: int(x[1:]))
        for v in doomed:
            del log["versions"][v]
        for v in oldest:  # the oldest kept version becomes a root: its link to the parent goes too
            log["versions"][v] = replace(log["versions"][v], parent=None)
        self._save_log(log)
        for v in doomed + sorted(oldest):
            (self.undo / f"{v}.delta").unlink(missing_ok=True)
        return doomed

    def recover(self) -> RecoverReport:
        """Finish or undo a torn switch and clean up garbage; call on start."""
        if not self.dir.is_dir():
            return RecoverReport((), ())
        with self._lock():
            return self._recover_locked()

    # ------------------------------------------------------------ internals
    def paths_for(self, v: Version) -> VersionPaths:
        return VersionPaths(self.live / FILE_NAMES["model"], self.live / FILE_NAMES["mmproj"] if "mmproj" in v.files else None)

    def _write(self, files: dict[str, Path], delta: jr.Delta, direction: str) -> int:
        roles = {s.role for s in delta.spans}
        for r in roles:
            os.chmod(files[r], 0o644)
        try:
            return jr.write_spans(files, delta, direction, crash_point)
        finally:
            for r in roles:
                os.chmod(files[r], 0o444)

    def _path(self, src: str, dst: str) -> list[tuple[str, str]]:
        steps = tree_steps(self._load_log()["versions"], src, dst)
        if steps is None:
            raise VersionError(f"{self.dir}: no kept delta chain from {src} to {dst} (pruned?)")
        missing = [v for v, _ in steps if not (self.undo / f"{v}.delta").is_file()]
        if missing:
            raise VersionError(f"{self.dir}: delta record of {missing[0]} is missing; cannot reach {dst}")
        return steps

    def _set_current(self, vid: str) -> None:
        with atomic_open(self.dir / "CURRENT", text=True) as f:
            f.write(vid + "\n")
            f.flush()
            crash_point("current_tmp")  # the temp holds the new record; CURRENT is still the old one

    def _save_fingerprint(self, files: dict[str, Path], recs: dict[str, FileRecord] | None = None) -> None:
        log = self._load_log()
        fp = dict(log.get("fingerprint", {}))
        for role, p in files.items():
            sha = (recs or self.current().files)[role].sha256
            fp[role] = _fingerprint(p, sha)
        log["fingerprint"] = fp
        self._save_log(log)

    def _load_log(self) -> dict:
        try:
            raw = json.loads((self.dir / "versions.json").read_text())
        except FileNotFoundError:
            return {"model": self.name, "next": 0, "versions": {}}
        return {**raw, "versions": {d["id"]: Version.from_json(d) for d in raw["versions"]}}

    def _save_log(self, log: dict) -> None:
        out = {**log, "versions": [v.to_json() for v in sorted(log["versions"].values(), key=lambda v: v.number)]}
        write_text_atomic(self.dir / "versions.json", json.dumps(out, indent=1))

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


