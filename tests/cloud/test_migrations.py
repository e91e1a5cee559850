"""cloud.migrate: a database from before migrations (cdcca 0.1's schema, rows included) is
upgraded in place to exactly the tables of cloud/schema.py; on SQLite and PostgreSQL."""
from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from datetime import UTC, datetime, timedelta

from sqlalchemy import (
    JSON, Column, DateTime, Float, ForeignKey, Integer, MetaData, String, Table, UniqueConstraint,
    create_engine,
)

from cloud.migrate import current, head
from cloud.schema import metadata
from cloud.store import Store
from device.contracts.config import load_settings

def old_metadata() -> MetaData:
    """cdcca 0.1's tables exactly as its store.py declared them (before migrations existed)."""
    m = MetaData()
    Table("devices", m, Column("name", String(64), primary_key=True),
          Column("token_sha256", String(64), nullable=False, unique=True),
          Column("created_at", DateTime(timezone=True), nullable=False))
    Table("samples", m, Column("id", Integer, primary_key=True, autoincrement=True),
          Column("device", String(64), ForeignKey("devices.name"), nullable=False, index=True),
          Column("sample_id", String(64), nullable=False),
          Column("payload_sha256", String(64), nullable=False),
          Column("blob_path", String(200), nullable=False), Column("bytes", Integer, nullable=False),
          Column("created_at", DateTime(timezone=True), nullable=False),
          Column("round_id", String(32), ForeignKey("rounds.id"), nullable=True, index=True),
          UniqueConstraint("device", "sample_id", name="uq_samples_device_sample"))
    Table("rounds", m, Column("id", String(32), primary_key=True),
          Column("device", String(64), ForeignKey("devices.name"), nullable=False, index=True),
          Column("base_model", String(128), nullable=False),
          Column("state", String(16), nullable=False, index=True),
          Column("stage", String(64), nullable=False, default=""),
          Column("progress", Float, nullable=False, default=0.0),
          Column("message", String(1000), nullable=False, default=""),
          Column("n_samples", Integer, nullable=False, default=0),
          Column("options", JSON, nullable=False), Column("metrics", JSON, nullable=False, default=dict),
          Column("patch_path", String(1000), nullable=True),
          Column("patch_sha256", String(64), nullable=True),
          Column("patch_bytes", Integer, nullable=True),
          Column("created_at", DateTime(timezone=True), nullable=False),
          Column("started_at", DateTime(timezone=True), nullable=True),
          Column("finished_at", DateTime(timezone=True), nullable=True))
    return m


def test_old_database_is_upgraded_in_place(tmp_path: Path, db_url: str | None) -> None:
    url = db_url or f"sqlite:///{tmp_path / 'cloud' / 'cloud.sqlite'}"
    (tmp_path / "cloud").mkdir()
    old = create_engine(url)
    m = old_metadata()
    t = datetime(2026, 11, 1, tzinfo=UTC)
    with old.begin() as conn:
        m.create_all(conn)
        conn.execute(m.tables["devices"].insert().values(name="lap", token_sha256="ab" * 32, created_at=t))
        for i in (1, 2):  # two active rounds of one device: 0.1 allowed that
            conn.execute(m.tables["rounds"].insert().values(
                id=f"{i:016x}", device="lap", base_model="m0", state="queued", stage="queued",
                progress=0.0, message="", n_samples=0, options={}, metrics={},
                created_at=t + timedelta(seconds=i)))
    old.dispose()

    store = Store(load_settings(home=tmp_path, db_url=db_url))
    with store.engine.connect() as conn:
        assert current(conn) == head()
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == [], diff
    # rows survive; two active rounds of one device (allowed in 0.1) were failed with a reason
    assert store.get_device("lap") is not None
    states = {r.round_id: (r.state, r.message) for r in store.list_rounds("lap")}
    assert {s for s, _ in states.values()} == {"failed"} and all("upgraded" in m for _, m in states.values())
    store.create_round("lap", store.round_request(f"{1:016x}")[1])  # the new schema works
    store.close()
    Store(load_settings(home=tmp_path, db_url=db_url)).close()  # idempotent


def test_fresh_database_is_created_at_head(tmp_path: Path, db_url: str | None) -> None:
    store = Store(load_settings(home=tmp_path, db_url=db_url))
    with store.engine.connect() as conn:
        assert current(conn) == head() == "0002"
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
    store.close()
