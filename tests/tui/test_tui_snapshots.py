"""Snapshot tests of the main screens at 80x24 (pytest-textual-snapshot).  The backend is the
scripted one in tui_fakes.py: fixed answers, numbers and dates, so every run draws the same
screen.  Update the baselines with `pytest tests/tui --snapshot-update` and look at them."""
from __future__ import annotations

import pytest

from tui.app import CdccaApp
from tui_fakes import FakeBackend
from tui_helpers import ask, no_blink, save_images, wait_for

SIZE = (80, 24)


@pytest.fixture
def scene(tmp_path, monkeypatch) -> tuple[str, str]:
    """A generated image under a fixed relative name (the path shows on screen)."""
    path, question = save_images(tmp_path, "noise", 1, 11)[0]
    path.rename(tmp_path / "scene.png")
    monkeypatch.chdir(tmp_path)
    return "scene.png", question


@pytest.fixture
def backend():
    b = FakeBackend()
    yield b
    b.resume.set()


def make_app(backend: FakeBackend, image: str | None = None) -> CdccaApp:
    return CdccaApp(backend, image=image, health_interval=None)


async def chat(pilot, scene, n: int = 2) -> None:
    no_blink(pilot)
    await wait_for(pilot, lambda: pilot.app.state.cloud.online is not None, 5, "the health check")
    for q in ("how many circles are there?", "what colour is the square?", "is it on the left?")[:n]:
        await ask(pilot, q, scene[0])
    await wait_for(pilot, lambda: pilot.app.chat.image_view.image is not None, 5, "the image")


async def one_round(pilot) -> None:
    app = pilot.app
    await pilot.press("f5")
    await wait_for(pilot, lambda: app.state.round.outcome == "done", 10, "the round")
    await wait_for(pilot, lambda: app.state.current_version == f"v{len(app.state.rounds)}", 5, "versions")


def test_chat_screen(snap_compare, backend, scene):
    async def run_before(pilot):
        await chat(pilot, scene, 3)
        await pilot.press("escape")

    assert snap_compare(make_app(backend, scene[0]), terminal_size=SIZE, run_before=run_before)


def test_mid_round(snap_compare, scene):
    backend = FakeBackend(pause_at="distil")

    async def run_before(pilot):
        await chat(pilot, scene, 2)
        await pilot.press("f5")
        await wait_for(pilot, lambda: backend.paused.is_set(), 5, "the round")
        await wait_for(pilot, lambda: pilot.app.state.round.message == "step 20/50", 5, "the stage")

    try:
        assert snap_compare(make_app(backend, scene[0]), terminal_size=SIZE, run_before=run_before)
    finally:
        backend.resume.set()


def test_rounds_tab_after_two_rounds(snap_compare, backend, scene):
    async def run_before(pilot):
        await chat(pilot, scene, 2)
        await one_round(pilot)
        await chat(pilot, scene, 1)
        await one_round(pilot)
        await pilot.press("escape", "2")

    assert snap_compare(make_app(backend, scene[0]), terminal_size=SIZE, run_before=run_before)


def test_plots_tab(snap_compare, backend, scene):
    async def run_before(pilot):
        await chat(pilot, scene, 3)
        await one_round(pilot)
        await one_round(pilot)
        await pilot.press("escape", "3")

    assert snap_compare(make_app(backend, scene[0]), terminal_size=SIZE, run_before=run_before)


def test_rollback_asks_first(snap_compare, backend, scene):
    async def run_before(pilot):
        await chat(pilot, scene, 1)
        await one_round(pilot)
        await pilot.press("escape", "2", "f9")

    assert snap_compare(make_app(backend, scene[0]), terminal_size=SIZE, run_before=run_before)


def test_help_screen(snap_compare, backend):
    async def run_before(pilot):
        await pilot.press("f1")

    assert snap_compare(make_app(backend), terminal_size=SIZE, run_before=run_before)


def test_cloud_down_light_theme(snap_compare, scene):
    backend = FakeBackend(online=False)

    async def run_before(pilot):
        await chat(pilot, scene, 1)
        await pilot.press("f10", "f2")
        await wait_for(pilot, lambda: pilot.app.state.uplink.last_ok is False, 5, "the upload")
        await pilot.press("f5")
        await wait_for(pilot, lambda: pilot.app.state.round.outcome == "failed", 5, "the round")

    assert snap_compare(make_app(backend, scene[0]), terminal_size=SIZE, run_before=run_before)


def test_a_round_that_lowered_accuracy_warns(snap_compare, scene):
    """Bug 9: the warning names the version F9 goes back to."""
    backend = FakeBackend(drop=True)

    async def run_before(pilot):
        await chat(pilot, scene, 1)
        await one_round(pilot)

    assert snap_compare(make_app(backend, scene[0]), terminal_size=SIZE, run_before=run_before)


def test_a_rejected_token(snap_compare, scene):
    """Bug 8: online, but the cloud refuses this device's token."""
    backend = FakeBackend(token_ok=False)

    async def run_before(pilot):
        await chat(pilot, scene, 1)

    assert snap_compare(make_app(backend, scene[0]), terminal_size=SIZE, run_before=run_before)
