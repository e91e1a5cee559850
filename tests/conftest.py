"""Shared fixtures. The embedded default models ship in assets/default (built by
`cdcca models build --out assets/default`); tests read them and never train big models."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from device.contracts.config import DEFAULT_MODEL_DIR


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Every test gets its own CDCCA_HOME: nothing touches the user's data directory."""
    monkeypatch.setenv("CDCCA_HOME", str(tmp_path / "home"))
    yield


@pytest.fixture(scope="session")
def assets() -> Path:
    d = DEFAULT_MODEL_DIR
    missing = [f for f in ("student-f32.gguf", "student-q8_0.gguf", "student-q4_0.gguf", "mmproj-f32.gguf",
                           "student.pt", "teacher.pt", "tokenizer.json", "manifest.json") if not (d / f).is_file()]
    assert not missing, f"embedded default models missing from {d}: {missing}"
    return d


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
