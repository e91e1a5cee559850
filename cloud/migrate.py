"""Bring any cloud database to the current schema with Alembic (``cloud/migrations``).

Three cases, so that nobody has to run a migration command by hand:
* an empty database: create the tables from ``cloud/schema.py`` and stamp it current;
* a database from before migrations existed (tables, no ``alembic_version``): stamp the
  baseline it must be (0001), then upgrade;
* a migrated database: upgrade to head (a no-op when current).
"""
from __future__ import annotations

import time
from functools import lru_cache
from pathlib import Path

from sqlalchemy import inspect
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from .schema import metadata

BASELINE = "0001"
MIGRATIONS = Path(__file__).with_name("migrations")


@lru_cache(maxsize=1)
def _config():
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def head() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_config()).get_current_head()


def current(conn: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(conn).get_current_revision()


def _run(conn: Connection, fn, revision: str) -> None:
    cfg = _config()
    cfg.attributes["connection"] = conn
    fn(cfg, revision)


def _upgrade(engine: Engine) -> None:
    from alembic import command

    with engine.connect() as conn:
        sqlite = conn.dialect.name == "sqlite"
        if sqlite:  # batch migrations copy tables; foreign keys must not fire meanwhile
            conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
            conn.commit()
        try:
            with conn.begin():
                _steps(conn, command)
        finally:
            if sqlite:
                conn.exec_driver_sql("PRAGMA foreign_keys=ON")
                conn.commit()


def _steps(conn: Connection, command) -> None:
    tables = set(inspect(conn).get_table_names())
    if not tables & {"devices", "samples", "rounds"}:
        metadata.create_all(conn)
        _run(conn, command.stamp, "head")
        return
    if "alembic_version" not in tables:
        _run(conn, command.stamp, BASELINE)
    if current(conn) != head():
        _run(conn, command.upgrade, "head")


def upgrade(engine: Engine, attempts: int = 3) -> None:
    """Idempotent; retried because two processes (API and a worker) may open a fresh database
    at the same moment and one of them then finds the tables it was about to create."""
    for attempt in range(attempts):
        try:
            return _upgrade(engine)
        except DBAPIError as exc:
            racing = any(w in str(exc).lower() for w in ("already exists", "duplicate", "locked"))
            if not racing or attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
