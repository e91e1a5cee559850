"""The cloud's storage: devices, uploaded samples and rounds in SQL, payloads and patches as blobs.

Rows live in SQLite (under ``<home>/cloud``, the default) or PostgreSQL (``db_url``), with the
schema in ``cloud/schema.py`` and its history in Alembic migrations (``cloud/migrate.py``).
Payloads live in a :class:`~cloud.blobs.BlobStore`, content-addressed, because they are
write-once and a database is a poor place for megabytes of base64.

Devices and their hashed tokens (``cloud/device_tokens.py``) and the round queue that workers
claim from (``cloud/round_queue.py``) are mixins of the store, so that API and workers agree
through the database alone.
"""
from __future__ import annotations

import json
import os
import secrets
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import (
    create_engine, delete, event, func, insert, select, update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from device.contracts.config import Settings
from device.contracts.wire import (
    RoundRequest, RoundStatus, SampleCounts, SampleInfo, UplinkSample,
)

from .blobs import BlobStore, private_dir, write_atomic  # noqa: F401  (write_atomic re-exported)
from .device_tokens import DeviceTokens, aware
from .round_queue import RoundQueue
from .schema import ACTIVE_STATES, devices, metadata, rounds, samples, utcnow  # noqa: F401


class ActiveRound(Exception):
    """The device already has a queued or running round (at most one each)."""

    def __init__(self, round_id: str) -> None:
        super().__init__(round_id)
        self.round_id = round_id


@dataclass(frozen=True)
class PatchFile:
    sha256: str
    bytes: int


def _private_sqlite(url: str) -> None:
    """Create the SQLite file 0600 before SQLite does (it would follow the umask, often 0644);
    SQLite gives its -wal and -shm files the same mode."""
    path = url.split("///", 1)[1] if "///" in url else ""
    if not path or path.startswith(":memory:"):
        return
    p = Path(path)
    private_dir(p.parent)
    os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o600))
    if p.stat().st_mode & 0o077:
        p.chmod(0o600)


def make_engine(url: str) -> Engine:
    """SQLite needs cross-thread connections (FastAPI threadpool + round workers), WAL so that
    readers polling progress never block the writer, and a busy timeout instead of errors."""
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    _private_sqlite(url)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn, _record) -> None:  # pragma: no cover - trivial
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    return engine


class Store(DeviceTokens, RoundQueue):
    """All persistent state of the cloud server, behind plain methods (no ORM sessions leak out)."""

    def __init__(self, settings: Settings) -> None:
        from .migrate import upgrade

        self.root = private_dir(settings.cloud_dir)
        self.blobs = BlobStore(private_dir(self.root / "blobs"), settings.blob_url)
        self.engine = make_engine(settings.db_url or f"sqlite:///{self.root / 'cloud.sqlite'}")
        upgrade(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def add_samples(self, device: str, batch: Sequence[UplinkSample]) -> tuple[list[str], list[str]]:
        """Store new samples; returns (accepted, duplicates).  Idempotent on ``sample_id``:
        a re-sent sample is acknowledged as a duplicate and neither its row nor blob is rewritten."""
        known = self._known_ids(device, [s.sample_id for s in batch])
        accepted: list[str] = []
        duplicates: list[str] = []
        rows: list[dict[str, Any]] = []
        for sample in batch:
            if sample.sample_id in known:
                duplicates.append(sample.sample_id)
                continue
            known.add(sample.sample_id)
            rows.append(self._sample_row(device, sample))
            accepted.append(sample.sample_id)
        if rows:
            lost = self._insert_samples(rows)
            accepted = [i for i in accepted if i not in lost]
            duplicates += sorted(lost)
        return accepted, duplicates

    def _known_ids(self, device: str, ids: Iterable[str]) -> set[str]:
        with self.engine.connect() as conn:
            result = conn.execute(select(samples.c.sample_id).where(
                samples.c.device == device, samples.c.sample_id.in_(list(ids))))
            return set(result.scalars())

    def _sample_row(self, device: str, sample: UplinkSample) -> dict[str, Any]:
        # The blob is written before its row exists, so no row ever points at a missing file;
        # an orphan blob after a crash is harmless (content-addressed; `cdcca cloud gc` sweeps it).
        payload = sample.model_dump_json().encode()
        sha = self.blobs.put(payload)
        return {"device": device, "sample_id": sample.sample_id, "payload_sha256": sha,
                "blob_path": self.blobs.key(sha), "bytes": len(payload), "created_at": utcnow(),
                "round_id": None}

    def _insert_samples(self, rows: list[dict[str, Any]]) -> set[str]:
        """Bulk insert; if a concurrent upload of the same ids won the race, fall back to one
        insert per row and report the ids that lost as duplicates."""
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(samples), rows)
            return set()
        except IntegrityError:
            pass
        lost: set[str] = set()
        for row in rows:
            try:
                with self.engine.begin() as conn:
                    conn.execute(insert(samples), [row])
            except IntegrityError:
                lost.add(row["sample_id"])
        return lost

    def sample_counts(self, device: str) -> SampleCounts:
        # count(column) skips NULLs, so this stays portable (no FILTER clause needed).
        query = select(func.count(), func.count(samples.c.round_id), func.count(samples.c.skipped)
                       ).where(samples.c.device == device)
        with self.engine.connect() as conn:
            total, used, skipped = conn.execute(query).one()
        return SampleCounts(total=total, unused=total - used - skipped)

    def list_samples(self, device: str, after: str | None = None, limit: int = 100) -> list[SampleInfo]:
        query = select(samples).where(samples.c.device == device).order_by(samples.c.id).limit(limit)
        if after is not None:
            anchor = select(samples.c.id).where(samples.c.device == device,
                                                samples.c.sample_id == after).scalar_subquery()
            query = query.where(samples.c.id > func.coalesce(anchor, -1))
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [SampleInfo(sample_id=r.sample_id, bytes=r.bytes, created_at=aware(r.created_at),
                           round_id=r.round_id, skipped=r.skipped) for r in rows]

    def delete_sample(self, device: str, sample_id: str) -> bool:
        """Forget one of the device's samples, its payload too unless another row shares it."""
        with self.engine.begin() as conn:
            sha = conn.execute(select(samples.c.payload_sha256).where(
                samples.c.device == device, samples.c.sample_id == sample_id)).scalar()
            if sha is None:
                return False
            conn.execute(delete(samples).where(samples.c.device == device,
                                               samples.c.sample_id == sample_id))
            shared = conn.execute(select(func.count()).select_from(samples)
                                  .where(samples.c.payload_sha256 == sha)).scalar_one()
        if not shared:
            self.blobs.delete(sha)
        return True

    def unused_samples(self, device: str, limit: int | None = None) -> list[UplinkSample]:
        """Usable samples no finished round has learned from, oldest first; see load_usable."""
        return self.load_usable(device, limit, lambda _s: None)[0]

    def load_usable(self, device: str, limit: int | None, problem) -> tuple[list[UplinkSample], dict[str, str]]:
        """Load up to ``limit`` unused samples, skipping (and marking, so no round retries them)
        any that cannot be read back or that ``problem(sample) -> reason | None`` refuses.
        Returns (samples, {sample_id: reason})."""
        query = (select(samples.c.sample_id, samples.c.payload_sha256)
                 .where(samples.c.device == device, samples.c.round_id.is_(None),
                        samples.c.skipped.is_(None))
                 .order_by(samples.c.id))
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        good: list[UplinkSample] = []
        skipped: dict[str, str] = {}
        for row in rows:
            if limit is not None and len(good) >= limit:
                break
            reason = self._why_unusable(row.payload_sha256, problem, good)
            if reason is not None:
                skipped[row.sample_id] = reason[:200]
        if skipped:
            with self.engine.begin() as conn:
                for sid, reason in skipped.items():
                    conn.execute(update(samples).where(samples.c.device == device,
                                                       samples.c.sample_id == sid).values(skipped=reason))
        return good, skipped

    def _why_unusable(self, sha: str, problem, good: list[UplinkSample]) -> str | None:
        try:
            sample = UplinkSample.model_validate_json(self.blobs.get(sha))
        except (OSError, ValidationError) as exc:
            return f"unreadable: {str(exc).splitlines()[0][:150]}"
        reason = problem(sample)
        if reason is None:
            good.append(sample)
        return reason

    # --- rounds -------------------------------------------------------------------------------
    def create_round(self, device: str, request: RoundRequest) -> RoundStatus:
        """A queued round; raises :class:`ActiveRound` if the device already has one."""
        round_id = secrets.token_hex(8)
        row = {"id": round_id, "device": device, "base_model": request.base_model,
               "state": "queued", "stage": "queued", "progress": 0.0, "message": "",
               "n_samples": 0, "options": request.options.model_dump(mode="json"), "metrics": {},
               "created_at": utcnow(), "attempts": 0, "cancel_requested": False}
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(rounds).values(**row))
        except IntegrityError:
            active = self.active_round(device)
            raise ActiveRound(active or "?") from None
        return self.get_round(round_id)

    def active_round(self, device: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(select(rounds.c.id).where(
                rounds.c.device == device, rounds.c.state.in_(ACTIVE_STATES))).scalar()

    def rounds_created_since(self, device: str, since: datetime) -> int:
        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(rounds).where(
                rounds.c.device == device, rounds.c.created_at >= since)).scalar_one()

    def get_round(self, round_id: str, device: str | None = None) -> RoundStatus | None:
        """A round's status; with ``device`` given, another device's round reads as missing."""
        row = self._round_row(round_id, device)
        return None if row is None else _round_status(row)

    def list_rounds(self, device: str, limit: int = 50) -> list[RoundStatus]:
        query = (select(rounds).where(rounds.c.device == device)
                 .order_by(rounds.c.created_at.desc()).limit(limit))
        with self.engine.connect() as conn:
            return [_round_status(r) for r in conn.execute(query).all()]

    def round_request(self, round_id: str) -> tuple[str, RoundRequest]:
        """(device, request) as submitted: what a worker needs to run the round."""
        row = self._round_row(round_id)
        if row is None:
            raise KeyError(round_id)
        return row.device, RoundRequest(base_model=row.base_model, options=row.options)

    def round_patch(self, round_id: str, device: str) -> PatchFile | None:
        row = self._round_row(round_id, device)
        if row is None or row.patch_path is None:
            return None
        return PatchFile(row.patch_sha256, row.patch_bytes)

    def _round_row(self, round_id: str, device: str | None = None):
        query = select(rounds).where(rounds.c.id == round_id)
        if device is not None:
            query = query.where(rounds.c.device == device)
        with self.engine.connect() as conn:
            return conn.execute(query).first()

    def transition(self, round_id: str, expected: Collection[str], state: str,
                   owner: str | None = None, **fields: Any) -> bool:
        """Compare-and-set the state: succeeds only if the round is still in ``expected`` (and,
        with ``owner``, still held by that worker).  This is what makes a cancel racing a
        finishing worker, or two workers after a lost lease, resolve to exactly one outcome."""
        guard = [rounds.c.id == round_id, rounds.c.state.in_(list(expected))]
        if owner is not None:
            guard.append(rounds.c.worker == owner)
        values = {"state": state, **fields}
        if state not in ACTIVE_STATES:
            values.setdefault("lease_until", None)
        with self.engine.begin() as conn:
            result = conn.execute(update(rounds).where(*guard).values(**values))
        return result.rowcount == 1

    def complete_round(self, round_id: str, device: str, sample_ids: Collection[str],
                       owner: str | None = None, **fields: Any) -> bool:
        """running -> done and mark its samples used, in one transaction: a crash can never leave
        samples consumed by a round that did not finish (or a finished round with samples free)."""
        guard = [rounds.c.id == round_id, rounds.c.state == "running"]
        if owner is not None:
            guard.append(rounds.c.worker == owner)
        with self.engine.begin() as conn:
            result = conn.execute(update(rounds).where(*guard).values(
                state="done", lease_until=None, **fields))
            if result.rowcount != 1:
                return False
            conn.execute(update(samples).where(
                samples.c.device == device, samples.c.sample_id.in_(list(sample_ids)),
                samples.c.round_id.is_(None)).values(round_id=round_id))
        return True

    def release_round(self, round_id: str, device: str) -> int | None:
        """The device will never apply this done round's patch (refused, failed its smoke test,
        device moved on): its samples become unused again, in one transaction.  Returns how many
        were freed, or None when the device has no such done round."""
        with self.engine.begin() as conn:
            result = conn.execute(update(rounds).where(
                rounds.c.id == round_id, rounds.c.device == device, rounds.c.state == "done").values(
                message="released by the device: its patch was not applied; samples usable again"))
            if result.rowcount != 1:
                return None
            return conn.execute(update(samples).where(
                samples.c.device == device, samples.c.round_id == round_id).values(round_id=None)).rowcount

    def update_round(self, round_id: str, owner: str | None = None, **fields: Any) -> bool:
        """Progress fields only; state changes go through :meth:`transition`.  With ``owner``,
        a worker that lost its lease cannot overwrite the new holder's progress."""
        if "state" in fields:
            raise ValueError("use transition() to change a round's state")
        guard = [rounds.c.id == round_id]
        if owner is not None:
            guard += [rounds.c.worker == owner, rounds.c.state == "running"]
        with self.engine.begin() as conn:
            return conn.execute(update(rounds).where(*guard).values(**fields)).rowcount == 1

    def rounds_in(self, states: Collection[str]) -> list[str]:
        with self.engine.connect() as conn:
            return list(conn.execute(select(rounds.c.id).where(
                rounds.c.state.in_(list(states)))).scalars())


def _round_status(row) -> RoundStatus:
    return RoundStatus(
        round_id=row.id, state=row.state, stage=row.stage, progress=row.progress,
        message=row.message, base_model=row.base_model, n_samples=row.n_samples,
        created_at=aware(row.created_at), started_at=aware(row.started_at),
        finished_at=aware(row.finished_at), metrics=row.metrics or {},
        patch_bytes=row.patch_bytes, patch_sha256=row.patch_sha256)


def jsonable(metrics: dict[str, Any]) -> dict[str, Any]:
    """Runners return numpy/torch scalars; the JSON column needs plain values (and finite ones:
    a NaN loss is reported as a string rather than breaking the status endpoint)."""
    def fallback(value: Any) -> Any:
        try:
            return float(value)
        except (TypeError, ValueError):
            return str(value)

    text = json.dumps(metrics, default=fallback)
    return json.loads(text, parse_constant=str)
