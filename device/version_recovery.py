"""Recovery of a version store on start (``VersionStore`` inherits it): finish or undo a switch a
crash tore (the journal says which: CURRENT moved = roll forward, else back; the bytes are then
proved by sha256), delete temp files and orphan delta records, and migrate a store from the old
copy-per-version layout.  Kept apart from ``device/versions.py`` because it runs only after a
crash or an upgrade, and each of its paths is tested by killing a real apply (tests/device).
"""
from __future__ import annotations

import os
import shutil
from dataclasses import replace

from device import journal as jr
from device.contracts.atomic import fsync_dir, temp_target
from device.patch import clone_file, sha256_file
from device.version_records import FILE_NAMES, PENDING, RecoverReport, VersionError

_RECORDS = {"CURRENT", "versions.json", "JOURNAL"}  # the store's own small files (written under its lock)


def _own_temp(name: str) -> bool:
    """A temp file an atomic write of one of the store's records left (its writer was killed).
    Not the feature-stats temps: the chat process writes those without the store lock."""
    target = temp_target(name)
    return target is not None and (target in _RECORDS or target.endswith(".delta"))


class Recovery:
    """Mixin over a VersionStore's ``dir``, ``undo``, ``live``, log and fingerprint helpers."""

    def _recover_locked(self) -> RecoverReport:
        removed, fixed = [], []
        if not self.dir.is_dir():
            return RecoverReport((), ())
        for p in list(self.dir.iterdir()) + (list(self.undo.iterdir()) if self.undo.is_dir() else []):
            if p.name.startswith(".staging-") or ".tmp-" in p.name or _own_temp(p.name):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
                removed.append(p.name)
        if self.installed() and not self.live.is_dir():
            removed += self._migrate_copies()
        j = jr.read_journal(self.dir / "JOURNAL")
        if j is not None:
            fixed.append(self._finish(j))
        if self.installed():
            log = self._load_log()
            for p in self.undo.glob("*.delta"):
                if p.stem not in log["versions"]:
                    p.unlink()
                    removed.append(p.name)
        if removed or fixed:
            fsync_dir(self.dir)
        return RecoverReport(tuple(removed), tuple(fixed))

    def _finish(self, j: jr.Journal) -> str:
        """Roll a torn switch forward (CURRENT already moved) or back; prove the bytes by sha256."""
        committed = (self.dir / "CURRENT").read_text().strip() == j.target
        log = self._load_log()
        if not committed and j.new_version is not None and j.target in log["versions"]:
            del log["versions"][j.target]  # logged but never switched to: forget it
            self._save_log(log)
        end = j.target if committed else j.source
        rec = log["versions"][end]  # an apply logs its version before CURRENT moves
        files = self.paths_for(rec).roles()
        deltas = {v: jr.read_delta(self.undo / f"{v}.delta") for v, _ in j.steps}
        for p in files.values():
            os.chmod(p, 0o644)
        try:
            jr.replay(files, deltas, j, committed)
        finally:
            for p in files.values():
                os.chmod(p, 0o444)
        for role, p in files.items():  # rare path: prove the whole file, not just the spans
            if rec.files[role].sha256 != PENDING and sha256_file(p) != rec.files[role].sha256:
                raise VersionError(f"{p}: bytes after recovery do not match the record of {end}")
        self._save_fingerprint(files, rec.files)
        if committed:
            self._identify_locked(rec)
        if not committed and j.new_version is not None:
            (self.undo / f"{j.target}.delta").unlink(missing_ok=True)
        (self.dir / "JOURNAL").unlink()
        return f"{j.source}->{j.target}: {'rolled forward' if committed else 'rolled back'}"

    def _migrate_copies(self) -> list[str]:
        """A store written by the copy-per-version layout (``v<N>/`` dirs): keep the current version
        as the new root, its files as the live copy; older copies have no delta records."""
        cur = self.current()
        src = self.dir / cur.id
        staging = self.dir / ".staging-live"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        for role in cur.files:
            clone_file(src / FILE_NAMES[role], staging / FILE_NAMES[role])
            os.chmod(staging / FILE_NAMES[role], 0o444)
        fsync_dir(staging)
        os.rename(staging, self.live)
        self.undo.mkdir(exist_ok=True)
        log = self._load_log()
        log["versions"] = {cur.id: replace(cur, parent=None)}
        self._save_log(log)
        self.check()
        gone = [p.name for p in self.dir.iterdir() if p.is_dir() and p.name[:1] == "v" and p.name[1:].isdigit()]
        for name in gone:
            shutil.rmtree(self.dir / name)
        return gone
