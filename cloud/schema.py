"""The cloud's SQL tables: one definition, used by the store and by the Alembic migrations.

Any change here needs a migration in ``cloud/migrations/versions`` (tests/cloud/test_migrations.py
checks that upgrading an old database gives exactly these tables).
"""
from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON, Boolean, Column, DateTime, Float, ForeignKey, Index, Integer, MetaData, String, Table,
    UniqueConstraint, text,
)

# States that hold a device's single active-round slot (see the partial unique index below).
ACTIVE_STATES = ("queued", "running")
_ACTIVE = text("state IN ('queued', 'running')")

metadata = MetaData()


def utcnow() -> datetime:
    """Every timestamp the cloud writes: UTC, timezone-aware."""
    return datetime.now(UTC)


devices = Table(
    "devices", metadata,
    Column("name", String(64), primary_key=True),
    # NULL once revoked: no token hashes to NULL, and UNIQUE allows many NULLs
    Column("token_sha256", String(64), nullable=True, unique=True),
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
    # why a round could not use it; such a sample is never offered to a round again
    Column("skipped", String(200), nullable=True),
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
    # worker bookkeeping (issue 13): who runs it, until when its lease holds, how often tried
    Column("worker", String(100), nullable=True),
    Column("lease_until", DateTime(timezone=True), nullable=True),
    Column("attempts", Integer, nullable=False, default=0, server_default="0"),
    Column("cancel_requested", Boolean, nullable=False, default=False, server_default="0"),
)

# At most one queued-or-running round per device, enforced by the database itself, so two racing
# POST /v1/rounds (or two API processes) cannot both win.
Index("uq_rounds_one_active", rounds.c.device, unique=True,
      sqlite_where=_ACTIVE, postgresql_where=_ACTIVE)
Index("ix_rounds_queue", rounds.c.state, rounds.c.created_at)
