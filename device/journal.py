"""The write-ahead undo journal that makes in-place patching of a live GGUF crash-safe.

A version change writes only the bytes that differ (O(patch), not O(model)). Before the first
byte of the live file is touched, two things are on disk and fsynced:

* a **delta record** per version (``undo/<vid>.delta``): for every changed span of a file its
  offset, the bytes before and after, and their sha256s. Kept after the apply, it is what rolls the
  version back (old bytes) or forward again (new bytes) later -- so a version costs a record of
  about twice the patch size instead of a full copy;
* the **journal** (``JOURNAL``): the switch in flight -- from which version to which, and the
  ordered steps (``[vid, "redo" | "undo"]``) that get there.

Then the spans are written, then the store's commit record (CURRENT) moves, then the journal is
removed. Recovery after a crash at any point (``replay``): if CURRENT still names the source, every
step is undone in reverse order (each span ends with the bytes of the step that first touched it:
exactly the source's bytes); if CURRENT names the target, every step is redone (exactly the target's
bytes). Both are idempotent, so a crash during recovery is recovered the same way.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from device.contracts.atomic import atomic_open

MAGIC = b"CDCCA-DELTA\x01\n"
Hook = Callable[[str], None]


class JournalError(RuntimeError):
    """A delta record or the journal is unreadable or does not match the bytes it describes."""


@dataclass(frozen=True)
class Span:
    role: str
    offset: int
    nbytes: int
    old_sha256: str
    new_sha256: str


@dataclass(frozen=True)
class Delta:
    """What turns ``parent``'s bytes into ``version``'s bytes, and back."""

    version: str
    parent: str
    spans: tuple[Span, ...]
    old: tuple[bytes, ...]
    new: tuple[bytes, ...]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.spans)

    def datas(self, direction: str) -> tuple[bytes, ...]:
        return self.new if direction == "redo" else self.old


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def make_delta(version: str, parent: str, spans: Sequence[tuple[str, int, bytes, bytes]]) -> Delta:
    """From (role, offset, old bytes, new bytes) per changed span."""
    recs = tuple(Span(r, o, len(a), _sha(a), _sha(b)) for r, o, a, b in spans)
    if any(len(a) != len(b) for _, _, a, b in spans):
        raise JournalError("a span's old and new bytes differ in length")
    return Delta(version, parent, recs, tuple(s[2] for s in spans), tuple(s[3] for s in spans))


def write_delta(path: Path, d: Delta) -> int:
    """Durably write a delta record (tmp + fsync + rename + dir fsync); returns its size."""
    head = json.dumps({"version": d.version, "parent": d.parent, "spans": [asdict(s) for s in d.spans]}).encode()
    with atomic_open(path) as f:
        f.write(MAGIC + struct.pack("<Q", len(head)) + head)
        for b in d.old + d.new:
            f.write(b)
    return path.stat().st_size


def read_delta(path: Path) -> Delta:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise JournalError(f"{path}: delta record missing (pruned?)") from None
    if not raw.startswith(MAGIC) or len(raw) < len(MAGIC) + 8:
        raise JournalError(f"{path}: not a cdcca delta record")
    (n,) = struct.unpack_from("<Q", raw, len(MAGIC))
    pos = len(MAGIC) + 8
    try:
        head = json.loads(raw[pos:pos + n])
        spans = tuple(Span(**s) for s in head["spans"])
    except (ValueError, TypeError, KeyError):
        raise JournalError(f"{path}: corrupt delta record header") from None
    pos += n
    old, new = [], []
    for out in (old, new):
        for s in spans:
            out.append(raw[pos:pos + s.nbytes])
            pos += s.nbytes
    if pos != len(raw) or any(_sha(a) != s.old_sha256 or _sha(b) != s.new_sha256 for s, a, b in zip(spans, old, new)):
        raise JournalError(f"{path}: delta record is truncated or its bytes do not match their hashes")
    return Delta(head["version"], head["parent"], spans, tuple(old), tuple(new))


def write_spans(files: Mapping[str, Path], d: Delta, direction: str, hook: Hook | None = None) -> int:
    """Write one direction of a delta into the live files and fsync them; returns bytes written.
    ``hook("write")`` fires half-way, for the crash tests."""
    datas, written, handles = d.datas(direction), 0, {}
    try:
        for i, (s, b) in enumerate(zip(d.spans, datas)):
            f = handles.get(s.role) or handles.setdefault(s.role, open(files[s.role], "r+b"))
            f.seek(s.offset)
            f.write(b)
            written += len(b)
            if hook is not None and i == len(datas) // 2:
                f.flush()
                hook("write")
        for f in handles.values():
            f.flush()
            os.fsync(f.fileno())
    finally:
        for f in handles.values():
            f.close()
    return written


def spans_hold(files: Mapping[str, Path], d: Delta, direction: str) -> bool:
    """True when every span of the live files holds that direction's bytes (checked by hash)."""
    for s in d.spans:
        with open(files[s.role], "rb") as f:
            f.seek(s.offset)
            if _sha(f.read(s.nbytes)) != (s.new_sha256 if direction == "redo" else s.old_sha256):
                return False
    return True


# ---------------------------------------------------------------- the journal (switch in flight)

@dataclass(frozen=True)
class Journal:
    source: str
    target: str
    steps: tuple[tuple[str, str], ...]  # (version whose delta to use, "redo" | "undo")
    new_version: dict | None = None  # the version record an apply will log on commit


def write_journal(path: Path, j: Journal) -> None:
    """Durably write the journal (tmp + fsync + rename + dir fsync)."""
    with atomic_open(path, text=True) as f:
        json.dump({"source": j.source, "target": j.target, "steps": [list(s) for s in j.steps],
                   "new_version": j.new_version}, f)


def read_journal(path: Path) -> Journal | None:
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        raise JournalError(f"{path}: corrupt journal") from None
    return Journal(d["source"], d["target"], tuple((a, b) for a, b in d["steps"]), d.get("new_version"))


def run_steps(files: Mapping[str, Path], deltas: Mapping[str, Delta], steps: Sequence[tuple[str, str]],
              hook: Hook | None = None) -> int:
    """Apply steps in order; returns bytes written."""
    return sum(write_spans(files, deltas[v], direction, hook) for v, direction in steps)


def replay(files: Mapping[str, Path], deltas: Mapping[str, Delta], j: Journal, committed: bool) -> int:
    """Finish (``committed``) or undo a torn switch; idempotent. Returns bytes written."""
    if committed:
        steps = list(j.steps)
    else:
        steps = [(v, "undo" if d == "redo" else "redo") for v, d in reversed(j.steps)]
    written = run_steps(files, deltas, steps)
    if steps and not spans_hold(files, deltas[steps[-1][0]], steps[-1][1]):  # the last step is intact
        raise JournalError(f"{sorted(files.values())[0].parent}: bytes do not match the journal after recovery")
    return written
