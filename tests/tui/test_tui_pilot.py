"""Headless pilot tests of `cdcca tui` against the real device (embedded model through llama.cpp,
SQLite queue, versioned store) and, for the round, a real loopback cloud running the real round
job.  Set CDCCA_UPDATE_DOCS=1 to rewrite docs/tui-round.svg from the live round."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from rich.color import Color
from textual.widgets import DataTable

from cdcca_cli.render import entropy_colour
from device.contracts.config import load_settings
from device.contracts.wire import RoundOptions
from device.sync import SyncOptions
from tui.app import CdccaApp
from tui.backend import DeviceBackend
from tui_helpers import ask, save_images, screen_segments, screen_text, wait_for

pytestmark = pytest.mark.anyio

DOCS = Path(__file__).resolve().parents[2] / "docs"
DOWN = "http://127.0.0.1:9"  # nothing listens on the discard port: the cloud is down


def offline_backend() -> DeviceBackend:
    return DeviceBackend(load_settings(cloud_url=DOWN, device_token="t"), retries=0)


def record_tokens(app: CdccaApp) -> list[tuple[str, float]]:
    """Every streamed token as the UI received it (before the final Turn arrives)."""
    seen: list[tuple[str, float]] = []
    original = app._token

    def spy(piece: str, entropy: float) -> None:
        seen.append((piece, entropy))
        original(piece, entropy)

    app._token = spy
    return seen


async def test_ask_about_an_image_streams_a_shaded_answer_while_the_cloud_is_down(images):
    backend = offline_backend()
    app = CdccaApp(backend, health_interval=None)
    try:
        async with app.run_test(size=(80, 24)) as pilot:
            tokens = record_tokens(app)
            (img, question), (img2, question2) = images[0], images[1]
            await ask(pilot, question, img, typing=True)
            turn = app.state.turns[-1]
            assert turn.error is None and turn.answer.strip(), turn
            # streamed token by token, each with its entropy, then replaced by the session's result
            assert [p for p, _ in tokens] == turn.pieces
            assert np.allclose([h for _, h in tokens], turn.entropies)
            assert turn.kept is not None and turn.reason  # UTS decided about it
            # on screen: each piece drawn in the colour of its entropy
            colours: dict[str, set] = {}
            for seg in screen_segments(app):
                colours.setdefault(seg.text.strip(), set()).add(seg.style.color if seg.style else None)
            for piece, h in zip(turn.pieces, turn.entropies):
                assert Color.parse(entropy_colour(h)) in colours[piece.strip()], piece
            assert "kept for uplink" in screen_text(app) if turn.kept else "not kept" in screen_text(app)
            assert app.chat.image_view.image is not None and app.chat.image_view.image.shape[:2] == (32, 32)
            # the cloud is down: the panel says so; the chat keeps working
            await wait_for(pilot, lambda: app.state.cloud.online is False, 10, "the health check")
            await ask(pilot, question2, img2)
            assert app.state.turns[-1].error is None and len(app.state.turns) == 2
            await pilot.press("escape", "u")
            await wait_for(pilot, lambda: app.state.uplink.last_ok is False, 20, "the failed upload")
            assert app.state.uplink.last_upload == "failed: cloud unreachable"
            await pilot.press("s")
            await wait_for(pilot, lambda: app.state.round.outcome == "failed", 20, "the failed round")
            assert "unreachable" in app.state.round.error
            assert app.state.round.stage("upload").status == "pending"  # nothing was sent
            await ask(pilot, question, img)
            assert app.state.turns[-1].error is None and app.is_running
            kept = sum(bool(t.kept) for t in app.state.turns)
            assert app.state.uplink.pending == kept  # a failed upload leaves the samples waiting
    finally:
        backend.close()


async def test_a_bad_image_is_one_line_in_the_chat_not_a_crash(tmp_path):
    bad = tmp_path / "not-an-image.png"
    bad.write_bytes(b"this is not a PNG")
    backend = offline_backend()
    app = CdccaApp(backend, health_interval=None)
    try:
        async with app.run_test(size=(80, 24)) as pilot:
            await ask(pilot, "what colour is it?", bad)
            err = app.state.turns[-1].error
            assert err and "\n" not in err and app.is_running
            await ask(pilot, "what colour is it?", tmp_path / "missing.png")
            assert app.state.turns[-1].error and not app.state.chat_busy
    finally:
        backend.close()


@pytest.fixture
def loopback(tmp_path):
    from cloud.loopback import LoopbackCloud

    with LoopbackCloud(load_settings()) as cloud:
        yield cloud


@pytest.mark.timeout(300)
async def test_sync_key_runs_a_real_round_then_rollback_from_the_history(tmp_path, loopback, monkeypatch):
    monkeypatch.chdir(tmp_path)  # short relative image paths on screen (and in the docs screenshot)
    settings = load_settings(cloud_url=loopback.url, device_token=loopback.add_device("tui"))
    opts = SyncOptions(RoundOptions(steps=10, learning_rate=1e-3, downlink_budget_bytes=48 * 1024),
                       eval_per_domain=5)
    backend = DeviceBackend(settings, sync_options=opts)
    app = CdccaApp(backend, health_interval=None)
    try:
        async with app.run_test(size=(80, 24)) as pilot:
            for img, question in save_images(Path("img"), "noise", 12, 3):
                await ask(pilot, question, img)
            assert app.state.uplink.pending > 0, "UTS kept nothing to upload"
            await wait_for(pilot, lambda: app.state.cloud.online, 10, "the health check")
            await pilot.press("escape", "s")
            await wait_for(pilot, lambda: app.state.round.running, 5, "the round to start")
            distil = app.state.round.stage
            await wait_for(pilot, lambda: distil("distil").fraction > 0.3 or distil("distil").status == "done",
                           60, "distillation")
            svg = app.export_screenshot(title="cdcca tui: a round in progress")
            assert "distil" in svg
            if os.environ.get("CDCCA_UPDATE_DOCS"):
                (DOCS / "tui-round.svg").write_text(svg)
            await wait_for(pilot, lambda: not app.state.round.running, 180, "the round to finish")
            assert app.state.round.outcome == "done", app.state.round.error
            row = app.state.rounds[-1]
            assert row.uploaded > 0 and 0 < row.downlink_bytes < row.full_gguf_bytes
            assert row.tensors_patched > 0 and row.version_after == "v1" and row.vqa_after is not None
            await wait_for(pilot, lambda: app.state.current_version == "v1", 10, "the versions")
            assert app.state.uplink.pending == 0 and "v1" in app.chat.border_title
            assert backend._session.model.version == "v1"  # the live chat model was swapped
            await pilot.press("2")
            table = app.query_one("#rounds-table", DataTable)
            assert table.row_count == 1 and table.get_row_at(0)[0] == row.round_id[:8]
            assert app.state.accuracy_series()  # the plot has points
            # rollback from the history, confirmed in the dialog
            await pilot.press("r")
            await wait_for(pilot, lambda: app.screen.__class__.__name__ == "ConfirmScreen", 5, "the dialog")
            await pilot.press("y")
            await wait_for(pilot, lambda: app.state.current_version == "v0", 20, "the rollback")
            assert backend._session.model.version == "v0"
            versions = app.query_one("#versions-table", DataTable)
            assert versions.row_count == 2 and str(versions.get_row_at(1)[1]) == "v0"
            await pilot.press("1")
            img, question = save_images(Path("img2"), "source", 1, 4)[0]
            await ask(pilot, question, img)
            assert app.state.turns[-1].error is None
    finally:
        backend.close()


# --- keys whose outcome the scripted backend makes quick to reach -------------------------------
async def test_cancel_stops_the_round_and_the_footer_follows(images):
    from tui_fakes import FakeBackend

    backend = FakeBackend(pause_at="distil")
    app = CdccaApp(backend, health_interval=None)
    try:
        async with app.run_test(size=(80, 24)) as pilot:
            await ask(pilot, images[0][1], images[0][0])
            assert app.check_action("cancel_round", ()) is None  # greyed: nothing to cancel
            await pilot.press("escape", "s")
            await wait_for(pilot, backend.paused.is_set, 5, "the round")
            assert app.check_action("sync", ()) is None and app.check_action("cancel_round", ())
            await ask(pilot, images[1][1], images[1][0])  # the chat works during a round
            await pilot.press("escape", "c")
            await wait_for(pilot, lambda: app.state.round.outcome == "cancelled", 5, "the cancel")
            assert app.state.round.stage("distil").status == "cancelled" and not app.state.rounds
            assert app.check_action("sync", ())
    finally:
        backend.resume.set()


async def test_upload_now_and_the_help_screen(images):
    from tui_fakes import FakeBackend

    backend = FakeBackend()
    app = CdccaApp(backend, health_interval=None)
    async with app.run_test(size=(80, 24)) as pilot:
        for img, q in images:
            await ask(pilot, q, img)
        kept = sum(bool(t.kept) for t in app.state.turns)
        await wait_for(pilot, lambda: app.state.uplink.pending == kept, 5, "the queue")
        await pilot.press("escape", "u")
        await wait_for(pilot, lambda: app.state.uplink.last_ok, 5, "the upload")
        assert app.state.uplink.last_upload == f"{kept} sent" and app.state.uplink.pending == 0
        await pilot.press("question_mark")
        assert app.screen.__class__.__name__ == "HelpScreen"
        await pilot.press("escape")
        assert app.screen.__class__.__name__ == "Screen"
        await pilot.press("d")
        assert app.theme == "textual-light"
        await pilot.press("q")
    assert not app.is_running
