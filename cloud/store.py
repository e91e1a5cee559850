"""The cloud's storage: devices, uploaded samples and rounds in SQL, sample payloads as blobs.

Rows live in any SQLAlchemy database (SQLite under ``<home>/cloud`` by default) so the server can
move to Postgres by changing ``db_url`` alone.  Payloads live on disk, content-addressed by their
SHA-256, because they are write-once and a database is a poor place for megabytes of base64.

Tokens are stored only as SHA-256 hashes: a leaked database does not leak credentials.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON, Column, DateTime, Float, ForeignKey, Integer, MetaData, String, Table, UniqueConstraint,
    create_engine, event, func, insert, select, update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from device.contracts.config import Settings
from device.contracts.wire import RoundRequest, RoundStatus, SampleCounts, UplinkSample
from device.patch import fsync_dir as _fsync_dir

DEVICE_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

metadata = MetaData()

devices = Table(
    "devices", metadata,
    Column("name", String(64), primary_key=True),
    Column("token_sha256", String(64), nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

samples = Table(
    "samples", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("device", String(64), ForeignKey("devices.name"), nullable=False, index=True),
    Column("sample_id", String(64), nullable=False),
    Column("payload_sha256", String(64), nullable=False),
    Column("blob_path", String(200), nullable=False),
    Column("bytes", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("round_id", String(32), ForeignKey("rounds.id"), nullable=True, index=True),
    UniqueConstraint("device", "sample_id", name="uq_samples_device_sample"),
)

rounds = Table(
    "rounds", metadata,
    Column("id", String(32), primary_key=True),
    Column("device", String(64), ForeignKey("devices.name"), nullable=False, index=True),
    Column("base_model", String(128), nullable=False),
    Column("state", String(16), nullable=False, index=True),
    Column("stage", String(64), nullable=False, default=""),
    Column("progress", Float, nullable=False, default=0.0),
    Column("message", String(1000), nullable=False, default=""),
    Column("n_samples", Integer, nullable=False, default=0),
    Column("options", JSON, nullable=False),
    Column("metrics", JSON, nullable=False, default=dict),
    Column("patch_path", String(1000), nullable=True),
    Column("patch_sha256", String(64), nullable=True),
    Column("patch_bytes", Integer, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=True),
    Column("finished_at", DateTime(timezone=True), nullable=True),
)


def utcnow() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime | None) -> datetime | None:
    """SQLite drops tzinfo on the way back; every timestamp we write is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()




def write_atomic(path: Path, data: bytes) -> None:
    """tmp + fsync + rename: a reader sees the old file or the whole new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


class BlobStore:
    """Content-addressed files ``<root>/<sha[:2]>/<sha>``; identical payloads are stored once."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path_for(self, sha: str) -> Path:
        return self.root / sha[:2] / sha

    def put(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self.path_for(sha)
        if not path.is_file():
            write_atomic(path, data)
        return sha

    def get(self, sha: str) -> bytes:
        data = self.path_for(sha).read_bytes()
        if hashlib.sha256(data).hexdigest() != sha:
            raise OSError(f"blob {sha} is corrupt on disk (sha256 mismatch)")
        return data


@dataclass(frozen=True)
class DeviceRow:
    name: str
    created_at: datetime


@dataclass(frozen=True)
class PatchFile:
    path: Path
    sha256: str
    bytes: int


def _make_engine(url: str) -> Engine:
    """SQLite needs cross-thread connections (FastAPI threadpool + round worker), WAL so that
    readers polling progress never block the writer, and a busy timeout instead of errors."""
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn, _record) -> None:  # pragma: no cover - trivial
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    return engine


class Store:
    """All persistent state of the cloud server, behind plain methods (no ORM sessions leak out)."""

    def __init__(self, settings: Settings) -> None:
        self.root = settings.cloud_dir
        self.root.mkdir(parents=True, exist_ok=True)
        self.blobs = BlobStore(self.root / "blobs")
        self.engine = _make_engine(settings.db_url or f"sqlite:///{self.root / 'cloud.sqlite'}")
        metadata.create_all(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    # --- devices and tokens -------------------------------------------------------------------
    def add_device(self, name: str) -> str:
        """Register a device and return its bearer token; the token is shown once, never stored."""
        if not DEVICE_NAME_PATTERN.match(name):
            raise ValueError(f"invalid device name {name!r}: use 1-64 letters, digits, '_', '.', '-'")
        token = secrets.token_urlsafe(32)
        row = {"name": name, "token_sha256": hash_token(token), "created_at": utcnow()}
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(devices).values(**row))
        except IntegrityError:
            raise ValueError(f"device {name!r} already exists") from None
        return token

    def device_for_token(self, token: str) -> str | None:
        """The device owning ``token``.  The lookup is by hash, so its timing reveals nothing
        useful; the final equality is still checked in constant time."""
        if not token:
            return None
        digest = hash_token(token)
        with self.engine.connect() as conn:
            row = conn.execute(
                select(devices.c.name, devices.c.token_sha256).where(devices.c.token_sha256 == digest)
            ).first()
        if row is None or not hmac.compare_digest(row.token_sha256, digest):
            return None
        return row.name

    def get_device(self, name: str) -> DeviceRow | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(devices).where(devices.c.name == name)).first()
        return None if row is None else DeviceRow(row.name, _aware(row.created_at))

    def list_devices(self) -> list[DeviceRow]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(devices).order_by(devices.c.name)).all()
        return [DeviceRow(r.name, _aware(r.created_at)) for r in rows]

    # --- samples ------------------------------------------------------------------------------
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
        # an orphan blob after a crash is harmless because blobs are content-addressed.
        payload = sample.model_dump_json().encode()
        sha = self.blobs.put(payload)
        return {"device": device, "sample_id": sample.sample_id, "payload_sha256": sha,
                "blob_path": str(self.blobs.path_for(sha).relative_to(self.root)),
                "bytes": len(payload), "created_at": utcnow(), "round_id": None}

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
        query = select(func.count(), func.count(samples.c.round_id)).where(samples.c.device == device)
        with self.engine.connect() as conn:
            total, used = conn.execute(query).one()
        return SampleCounts(total=total, unused=total - used)

    def unused_samples(self, device: str, limit: int | None = None) -> list[UplinkSample]:
        """Samples no finished round has used, oldest first, loaded (and verified) from blobs."""
        query = (select(samples.c.payload_sha256)
                 .where(samples.c.device == device, samples.c.round_id.is_(None))
                 .order_by(samples.c.id).limit(limit))
        with self.engine.connect() as conn:
            shas = list(conn.execute(query).scalars())
        return [UplinkSample.model_validate_json(self.blobs.get(sha)) for sha in shas]

    # --- rounds -------------------------------------------------------------------------------
    def create_round(self, device: str, request: RoundRequest) -> RoundStatus:
        round_id = secrets.token_hex(8)
        row = {"id": round_id, "device": device, "base_model": request.base_model,
               "state": "queued", "stage": "queued", "progress": 0.0, "message": "",
               "n_samples": 0, "options": request.options.model_dump(mode="json"), "metrics": {},
               "created_at": utcnow()}
        with self.engine.begin() as conn:
            conn.execute(insert(rounds).values(**row))
        return self.get_round(round_id)

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
        return PatchFile(Path(row.patch_path), row.patch_sha256, row.patch_bytes)

    def _round_row(self, round_id: str, device: str | None = None):
        query = select(rounds).where(rounds.c.id == round_id)
        if device is not None:
            query = query.where(rounds.c.device == device)
        with self.engine.connect() as conn:
            return conn.execute(query).first()

    def transition(self, round_id: str, expected: Collection[str], state: str, **fields: Any) -> bool:
        """Compare-and-set the state: succeeds only if the round is still in ``expected``.
        This is what makes a cancel racing a finishing worker resolve to exactly one outcome."""
        values = {"state": state, **fields}
        with self.engine.begin() as conn:
            result = conn.execute(update(rounds).where(
                rounds.c.id == round_id, rounds.c.state.in_(list(expected))).values(**values))
        return result.rowcount == 1

    def complete_round(self, round_id: str, device: str, sample_ids: Collection[str],
                       **fields: Any) -> bool:
        """running -> done and mark its samples used, in one transaction: a crash can never leave
        samples consumed by a round that did not finish (or a finished round with samples free)."""
        values = {"state": "done", **fields}
        with self.engine.begin() as conn:
            result = conn.execute(update(rounds).where(
                rounds.c.id == round_id, rounds.c.state == "running").values(**values))
            if result.rowcount != 1:
                return False
            conn.execute(update(samples).where(
                samples.c.device == device, samples.c.sample_id.in_(list(sample_ids)),
                samples.c.round_id.is_(None)).values(round_id=round_id))
        return True

    def update_round(self, round_id: str, **fields: Any) -> None:
        """Progress fields only; state changes go through :meth:`transition`."""
        if "state" in fields:
            raise ValueError("use transition() to change a round's state")
        with self.engine.begin() as conn:
            conn.execute(update(rounds).where(rounds.c.id == round_id).values(**fields))

    def rounds_in(self, states: Collection[str]) -> list[str]:
        with self.engine.connect() as conn:
            return list(conn.execute(select(rounds.c.id).where(
                rounds.c.state.in_(list(states)))).scalars())


def _round_status(row) -> RoundStatus:
    return RoundStatus(
        round_id=row.id, state=row.state, stage=row.stage, progress=row.progress,
        message=row.message, base_model=row.base_model, n_samples=row.n_samples,
        created_at=_aware(row.created_at), started_at=_aware(row.started_at),
        finished_at=_aware(row.finished_at), metrics=row.metrics or {},
        patch_bytes=row.patch_bytes, patch_sha256=row.patch_sha256)


def jsonable(metrics: dict[str, Any]) -> dict[str, Any]:
    """Runners return numpy/torch scalars; the JSON column needs plain values."""
    def fallback(value: Any) -> Any:
        try:
            return float(value)
        except (TypeError, ValueError):
            return str(value)

    return json.loads(json.dumps(metrics, default=fallback))
