"""The device's durable uplink queue: one SQLite row per sample UTS kept.

Crash safety is the point: the device may be closed, killed or lose power at any moment, and a
sample the user already paid for (inference, UTS) must neither vanish nor corrupt the file.

* WAL journal: a writer appends to ``queue.sqlite-wal``; a crash mid-write leaves an incomplete
  tail that the next open ignores, so the database is never half-updated.
* ``synchronous=FULL``: every commit fsyncs the WAL before ``add`` returns.  With WAL, NORMAL is
  also corruption-free and survives a *process* crash, but a *power* loss may roll back the last
  commits; "never lose a row whose ``add`` returned" needs FULL.  The cost, one fsync per kept
  sample, is nothing next to the inference that produced the sample.
* Every write is one ``BEGIN IMMEDIATE ... COMMIT`` transaction; ``sample_id`` is the PRIMARY KEY
  and inserts are ``INSERT OR IGNORE``, so re-adding a sample (a retried chat, a replayed log) is
  a no-op and uploads stay idempotent end to end.

Statuses: pending -> sent (handed to the uplink) -> acknowledged (the cloud stored it).  After a
crash between "sent" and the cloud's answer, ``reset_sent_to_pending`` re-queues those rows; the
cloud's duplicate detection makes the re-send harmless.
"""
from __future__ import annotations

import os
import sqlite3
import stat
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from device.contracts.config import QUEUE_FILE  # noqa: F401  (the one spelling; re-exported)
from device.contracts.wire import UplinkSample

STATUSES = ("pending", "sent", "acknowledged")

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS samples (
        sample_id     TEXT PRIMARY KEY,
        created_at    REAL NOT NULL,
        status        TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'acknowledged')),
        score         REAL NOT NULL,
        ood_score     REAL NOT NULL,
        raw_bytes     INTEGER NOT NULL,
        shipped_bytes INTEGER NOT NULL,
        tag           TEXT,
        payload       BLOB NOT NULL)""",
    # rows of one status come back in rowid (= insertion) order straight from this index
    "CREATE INDEX IF NOT EXISTS samples_by_status ON samples (status)",
    # every answered chat, kept or not: the denominator of the end-to-end uplink ratio
    """CREATE TABLE IF NOT EXISTS seen (
        id        INTEGER PRIMARY KEY CHECK (id = 1),
        chats     INTEGER NOT NULL DEFAULT 0,
        raw_bytes INTEGER NOT NULL DEFAULT 0)""",
    # recent sample-stage scores, so adaptive UTS keeps its running quantile across processes;
    # per model lineage (``model``): one model's entropy scale says nothing about another's
    "CREATE TABLE IF NOT EXISTS recent (id INTEGER PRIMARY KEY, entropy REAL NOT NULL, ood REAL,"
    " model TEXT NOT NULL DEFAULT '')",
)
RECENT_KEEP = 4096


@dataclass(frozen=True)
class QueueStats:
    pending: int
    sent: int
    acknowledged: int
    pending_bytes: int  # shipped bytes still waiting for the uplink
    shipped_bytes: int  # all rows
    raw_bytes: int  # all rows: what a no-selection uplink would have sent
    chats_seen: int = 0  # every chat the device answered, kept or not
    seen_raw_bytes: int = 0  # what a no-selection uplink would have sent for all of them

    @property
    def ratio_all(self) -> float:
        """shipped / raw over EVERY chat: both UTS stages (sample drop + token selection)."""
        return self.shipped_bytes / self.seen_raw_bytes if self.seen_raw_bytes else 0.0

    @property
    def total(self) -> int:
        return self.pending + self.sent + self.acknowledged

    @property
    def ratio(self) -> float:
        """shipped / raw over all rows (the paper's uplink compression figure); 0 when empty."""
        return self.shipped_bytes / self.raw_bytes if self.raw_bytes else 0.0


@dataclass(frozen=True)
class QueueRow:
    """One queued sample.  ``payload`` is the exact UplinkSample JSON the uplink sends."""

    sample_id: str
    created_at: float
    status: str
    score: float
    ood_score: float
    raw_bytes: int
    shipped_bytes: int
    tag: str | None
    payload: bytes

    def sample(self) -> UplinkSample:
        return UplinkSample.model_validate_json(self.payload)


_COLUMNS = "sample_id, created_at, status, score, ood_score, raw_bytes, shipped_bytes, tag, payload"


def _create_private(path: Path) -> None:
    """The queue holds the user's images and prompts: its folder is 0700 and the database 0600
    before SQLite opens it (SQLite then creates -wal and -shm with the database's own mode)."""
    from device.trust import private_dir

    private_dir(path.parent)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    _tighten(path)


def _tighten(path: Path) -> None:
    """Files an older version created 0644 are made 0600 on the next open."""
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            if stat.S_IMODE(p.stat().st_mode) & 0o077:
                os.chmod(p, 0o600)
        except FileNotFoundError:
            pass


def default_path() -> Path:
    from device.contracts.config import load_settings

    return load_settings().queue_path


SCHEMA_VERSION = 2  # PRAGMA user_version of queue.sqlite; bump with a migration step below


def _check_version(db: sqlite3.Connection, path: Path) -> None:
    """Stamp the schema version (issue 13, item 5); refuse a queue written by a newer cdcca
    rather than guess at its rows, and migrate an older one in the same transaction.

    0 -> 1: a file from before versions, same tables.  1 -> 2: ``recent`` gains ``model``; the old
    rows keep ``''`` (their model is unknown), so every model's adaptive window starts afresh."""
    found = db.execute("PRAGMA user_version").fetchone()[0]
    if found > SCHEMA_VERSION:
        raise RuntimeError(f"{path}: queue schema version {found} is newer than this cdcca's "
                           f"({SCHEMA_VERSION}); upgrade cdcca")
    cols = {r[1] for r in db.execute("PRAGMA table_info(recent)")}
    if "model" not in cols:
        db.execute("ALTER TABLE recent ADD COLUMN model TEXT NOT NULL DEFAULT ''")
    db.execute("CREATE INDEX IF NOT EXISTS recent_by_model ON recent (model, id)")
    if found < SCHEMA_VERSION:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


class Queue:
    """``Queue(path)``; use as a context manager or call ``close()``.  Safe to share between
    threads (one lock) and between processes (SQLite file locks + busy timeout)."""

    def __init__(self, path: str | Path | None = None, *, timeout_s: float = 30.0) -> None:
        self.path = Path(path) if path is not None else default_path()
        _create_private(self.path)
        # isolation_level=None: no implicit transactions; _tx() says exactly where they are
        self._db = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise RuntimeError(f"{self.path}: SQLite refused WAL mode (got {mode!r}); is it on a network drive?")
        self._db.execute("PRAGMA synchronous=FULL")
        with self._tx() as db:
            for statement in _SCHEMA:
                db.execute(statement)
            _check_version(db, self.path)
        _tighten(self.path)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: all of it commits, or (on any error or crash) none of it."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # --- writes ---------------------------------------------------------------------------
    def add(self, sample: UplinkSample, shipped_bytes: int | None = None) -> bool:
        """Store a kept sample; True if inserted, False if its id was already queued.

        Once this returns the row is on disk (fsynced).  The payload is the exact JSON the uplink
        sends, so ``shipped_bytes`` defaults to its length.
        """
        payload = sample.model_dump_json().encode()
        with self._tx() as db:
            cur = db.execute(
                f"INSERT OR IGNORE INTO samples ({_COLUMNS}) VALUES (?, ?, 'pending', ?, ?, ?, ?, ?, ?)",
                (sample.sample_id, time.time(), sample.score, sample.ood_score, sample.raw_bytes,
                 len(payload) if shipped_bytes is None else int(shipped_bytes), sample.tag, payload))
            return cur.rowcount == 1

    def _move(self, ids: Iterable[str], to: str, from_: tuple[str, ...]) -> int:
        ids = [ids] if isinstance(ids, str) else list(ids)
        marks = ",".join("?" * len(from_))
        sql = f"UPDATE samples SET status = ? WHERE sample_id = ? AND status IN ({marks})"
        with self._tx() as db:
            before = db.total_changes
            db.executemany(sql, ((to, i, *from_) for i in ids))
            return db.total_changes - before

    def mark_sent(self, ids: Iterable[str]) -> int:
        """pending -> sent; returns how many rows moved (unknown or later-stage ids are ignored)."""
        return self._move(ids, "sent", ("pending",))

    def mark_acknowledged(self, ids: Iterable[str]) -> int:
        """pending/sent -> acknowledged: the cloud has the sample (accepted or duplicate)."""
        return self._move(ids, "acknowledged", ("pending", "sent"))

    def reset_sent_to_pending(self) -> int:
        """After a crash or failed upload: whatever was sent but never acknowledged is re-queued."""
        with self._tx() as db:
            return db.execute("UPDATE samples SET status = 'pending' WHERE status = 'sent'").rowcount

    def prune_acknowledged(self) -> int:
        """Free the payloads of acknowledged rows; the rows stay, so re-adds remain no-ops."""
        with self._tx() as db:
            return db.execute("UPDATE samples SET payload = x'' WHERE status = 'acknowledged' "
                              "AND length(payload) > 0").rowcount

    # --- reads ----------------------------------------------------------------------------
    def pending(self, limit: int | None = None) -> list[QueueRow]:
        """Pending rows, oldest first (insertion order); ``row.sample()`` parses the payload."""
        sql = f"SELECT {_COLUMNS} FROM samples WHERE status = 'pending' ORDER BY rowid LIMIT ?"
        with self._lock:
            rows = self._db.execute(sql, (-1 if limit is None else int(limit),)).fetchall()
        return [QueueRow(*r[:-1], bytes(r[-1])) for r in rows]

    def status_of(self, sample_id: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT status FROM samples WHERE sample_id = ?", (sample_id,)).fetchone()
        return None if row is None else row[0]

    def stats(self) -> QueueStats:
        with self._lock:
            counts = dict(self._db.execute("SELECT status, count(*) FROM samples GROUP BY status").fetchall())
            pend, shipped, raw = self._db.execute(
                "SELECT coalesce(sum(CASE WHEN status = 'pending' THEN shipped_bytes END), 0),"
                " coalesce(sum(shipped_bytes), 0), coalesce(sum(raw_bytes), 0) FROM samples").fetchone()
            seen = self._db.execute("SELECT chats, raw_bytes FROM seen WHERE id = 1").fetchone() or (0, 0)
        return QueueStats(counts.get("pending", 0), counts.get("sent", 0), counts.get("acknowledged", 0),
                          pend, shipped, raw, seen[0], seen[1])

    def note_seen(self, raw_bytes: int, entropy: float | None = None, ood: float | None = None,
                  model: str = "") -> None:
        """Count one answered chat (kept or not), its no-selection uplink size and its scores,
        filed under ``model`` (the model lineage that produced them)."""
        with self._tx() as db:
            db.execute("INSERT INTO seen (id, chats, raw_bytes) VALUES (1, 1, ?) ON CONFLICT(id) DO UPDATE "
                       "SET chats = chats + 1, raw_bytes = raw_bytes + excluded.raw_bytes", (int(raw_bytes),))
            if entropy is not None:
                db.execute("INSERT INTO recent (entropy, ood, model) VALUES (?, ?, ?)", (float(entropy), ood, model))
                db.execute("DELETE FROM recent WHERE model = ? AND id <= (SELECT id FROM recent WHERE model = ? "
                           "ORDER BY id DESC LIMIT 1 OFFSET ?)", (model, model, RECENT_KEEP))

    def recent_scores(self, n: int, model: str = "") -> list[tuple[float, float | None]]:
        """The last ``n`` (entropy, ood) sample scores of ``model``, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT entropy, ood FROM recent WHERE model = ? ORDER BY id DESC LIMIT ?",
                                    (model, int(n))).fetchall()
        return [(r[0], r[1]) for r in reversed(rows)]

    def integrity_check(self) -> str:
        with self._lock:
            return self._db.execute("PRAGMA integrity_check").fetchone()[0]

    # --- lifecycle ------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "Queue":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
