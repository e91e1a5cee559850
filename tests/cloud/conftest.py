"""A real, throwaway PostgreSQL server for the store tests (issue 13, item 5): cloud.pg_local
starts one per test session, each test gets a fresh database.  Without PostgreSQL binaries
the PostgreSQL cases are skipped with the reason, except where ``CDCCA_REQUIRE_POSTGRES=1`` (``.ci/run`` sets it): there they fail.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud.pg_local import PostgresServer


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    try:
        server = PostgresServer()
    except FileNotFoundError as exc:
        if os.environ.get("CDCCA_REQUIRE_POSTGRES") == "1":
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path: Path) -> str | None:
    """None (the default SQLite under <home>/cloud) or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("postgres").new_database()


@pytest.fixture(scope="module")
def files(assets) -> dict[str, Path]:
    """The embedded default's device pair as shipped (Q4_0 text model + F32 mmproj)."""
    return {"model": assets / "student-q4_0.gguf", "mmproj": assets / "mmproj-f32.gguf"}


@pytest.fixture(scope="module")
def twin(files):
    """The HF twin rebuilt from ``files`` (one thread: tests run two at a time)."""
    import torch

    from cloud.families import family_for

    torch.set_num_threads(1)
    return family_for(files["model"], files["mmproj"]).load_twin(files["model"], files["mmproj"])

