"""Fixtures for the TUI tests."""
from __future__ import annotations

from pathlib import Path

import pytest

from tui_helpers import save_images


@pytest.fixture
def images(tmp_path) -> list[tuple[Path, str]]:
    return save_images(tmp_path / "img", "noise", 3, 7)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # Textual runs on asyncio; the async tests use anyio's pytest plugin
