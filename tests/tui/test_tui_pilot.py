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
            await pilot.press("f2")
            await wait_for(pilot, lambda: app.state.uplink.last_ok is False, 20, "the failed upload")
            assert app.state.uplink.last_upload == "failed: cloud unreachable"
            await pilot.press("f5")
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
async def test_sync_key_runs_a_real_round_and_an_external_version_change_is_followed(tmp_path, loopback, monkeypatch):
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
            await pilot.press("f5")
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
            await pilot.press("escape", "2")
            table = app.query_one("#rounds-table", DataTable)
            assert table.row_count == 1 and table.get_row_at(0)[0] == row.round_id[:8]
            assert app.state.accuracy_series()  # the plot has points
            # bug 5: one patch size: the history shows the bytes the round downloaded
            assert next(v for v in app.state.versions if v.id == "v1").patch_bytes == row.downlink_bytes
            # bug 2: another face (`cdcca rollback` in a second terminal) switches CURRENT under us
            from device.models import store_for

            store_for(settings, settings.device_quant).rollback()
            await wait_for(pilot, lambda: app.state.current_version == "v0", 10, "the external change")
            assert backend._session.model.version == "v0"  # reloaded: answers come from v0's weights
            assert "v0" in app.chat.border_title
            store = store_for(settings, settings.device_quant)
            if hasattr(store, "switch"):  # roll forward from the history, confirmed in the dialog
                table = app.query_one("#versions-table", DataTable)
                table.move_cursor(row=0)  # v1 (the history lists newest first)
                await pilot.press("f9")
                await wait_for(pilot, lambda: app.screen.__class__.__name__ == "ConfirmScreen", 5, "the dialog")
                assert "from v0 to v1" in screen_text(app)
                await pilot.press("tab", "enter")  # Yes takes a deliberate Tab + Enter
                await wait_for(pilot, lambda: app.state.current_version == "v1", 20, "the switch")
                assert backend._session.model.version == "v1"
            else:  # at the base, with no store.switch(): F9 offers nothing rather than a stale question
                await pilot.press("f9")
                await pilot.pause(0.5)
                assert app.screen.__class__.__name__ == "Screen"
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
            await pilot.press("f5")
            await wait_for(pilot, backend.paused.is_set, 5, "the round")
            assert app.check_action("sync", ()) is None and app.check_action("cancel_round", ())
            await ask(pilot, images[1][1], images[1][0])  # the chat works during a round
            await pilot.press("f6")
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
        await pilot.press("f2")
        await wait_for(pilot, lambda: app.state.uplink.last_ok, 5, "the upload")
        assert app.state.uplink.last_upload == f"{kept} sent" and app.state.uplink.pending == 0
        await pilot.press("f1")
        assert app.screen.__class__.__name__ == "HelpScreen"
        await pilot.press("escape")
        assert app.screen.__class__.__name__ == "Screen"
        await pilot.press("f10")
        assert app.theme == "textual-light"
        await pilot.press("ctrl+q")
    assert not app.is_running


def screen_rows(app) -> list[str]:
    import io

    from rich.console import Console

    w, h = app.size
    c = Console(width=w, height=h, file=io.StringIO(), force_terminal=True, record=True, color_system=None)
    c.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return c.export_text().splitlines()


# --- bugs a user hit (issue 14), each reproduced ----------------------------------------------
async def test_typing_text_after_a_tab_changes_nothing(images):
    """Bug 1: a question typed after a Tab once uploaded, opened rollback and confirmed it with
    the "y" of "yellow".  Now Tab stays in the inputs and no letter is an action."""
    from tui_fakes import FakeBackend

    backend = FakeBackend()
    app = CdccaApp(backend, health_interval=None)
    async with app.run_test(size=(80, 24)) as pilot:
        await ask(pilot, images[0][1], images[0][0])
        await pilot.press("f5")
        await wait_for(pilot, lambda: app.state.current_version == "v1", 10, "the round")
        acked, pending = backend.acked, len(backend.pending)

        def unchanged() -> None:
            assert app.is_running and app.screen.__class__.__name__ == "Screen"
            assert backend.current == "v1" and backend.rounds == 1 and not app.state.round.running
            assert (backend.acked, len(backend.pending)) == (acked, pending) and app.theme != "textual-light"

        app.chat.question.focus()
        await pilot.press(*"what colour is the ")
        await pilot.press("tab")
        assert app.focused is app.query_one("#image-path")  # Tab moved to the other input only
        await pilot.press(*"yellow thing? sure, upload, cancel, rollback, dark, quit")
        await pilot.press("shift+tab")
        assert app.focused is app.chat.question
        await pilot.press(*"yes y q")
        await pilot.pause(0.2)
        unchanged()
        await pilot.press("escape", *"syrucdqy")  # even with no input focused, letters do nothing
        await pilot.pause(0.2)
        unchanged()
        # the dialog: no typed letter answers it, Enter says No (it has the focus)
        await pilot.press("f9")
        await wait_for(pilot, lambda: app.screen.__class__.__name__ == "ConfirmScreen", 5, "the dialog")
        await pilot.press(*"yellow yes")
        await pilot.pause(0.2)
        assert app.screen.__class__.__name__ == "ConfirmScreen" and backend.current == "v1"
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.screen.__class__.__name__ == "Screen", 5, "the dialog to close")
        await pilot.pause(0.2)
        unchanged()


async def test_a_dialog_names_the_versions_it_will_really_act_on(images):
    """Bug 2: with the TUI at v2, another face made v3; the dialog must say v3 -> v2."""
    from tui_fakes import FakeBackend

    backend = FakeBackend()
    app = CdccaApp(backend, health_interval=None, watch_interval=0.1)
    async with app.run_test(size=(80, 24)) as pilot:
        await ask(pilot, images[0][1], images[0][0])
        for v in ("v1", "v2"):
            await pilot.press("f5")
            await wait_for(pilot, lambda v=v: app.state.current_version == v, 10, v)
        backend.sync(lambda *a: None, __import__("threading").Event())  # `cdcca sync` elsewhere
        await wait_for(pilot, lambda: app.state.current_version == "v3", 5, "the external change")
        assert "v3" in app.chat.border_title
        await pilot.press("f9")
        await wait_for(pilot, lambda: app.screen.__class__.__name__ == "ConfirmScreen", 5, "the dialog")
        assert "from v3 to v2" in screen_text(app)
        backend.current = "v1"  # and once more while the dialog is open
        await pilot.press("tab", "enter")
        await wait_for(pilot, lambda: app.state.current_version == "v1", 5, "the refresh")
        assert backend.current == "v1"  # the switch refused: it was asked about v3, not v1


async def test_no_false_kept_marker_and_no_answer_without_an_image(images):
    """Bugs 3 and 4 on the real device: asking the same image + question again is not "kept";
    no image, or a path typed as the question, is refused in one line and never queued."""
    backend = offline_backend()
    app = CdccaApp(backend, health_interval=None)
    try:
        async with app.run_test(size=(80, 24)) as pilot:
            kept = None
            for img, q in save_images(Path(images[0][0]).parent, "noise", 12, 5):
                await ask(pilot, q, img)
                if app.state.turns[-1].kept:
                    kept = (img, q)
                    break
            assert kept, "UTS kept none of 12 noise chats"
            await wait_for(pilot, lambda: app.state.uplink.pending >= 1, 5, "the queue")
            pending = app.state.uplink.pending
            await ask(pilot, kept[1], kept[0])
            t = app.state.turns[-1]
            assert t.error is None and t.kept is False and "already queued" in t.reason
            await ask(pilot, kept[1], None)  # empty image field
            assert "about an image" in app.state.turns[-1].error
            await ask(pilot, str(kept[0]), None)  # the path typed into the question field
            assert "looks like an image path" in app.state.turns[-1].error
            await pilot.pause(0.3)
            assert backend.queue_stats().pending == pending and "kept for uplink" not in screen_text(app)[-400:]
    finally:
        backend.close()


@pytest.mark.timeout(120)
async def test_a_wrong_token_shows_token_rejected(loopback):
    """Bug 8: /health answers anyone; the TUI probes with the device's token."""
    loopback.add_device("someone")
    settings = load_settings(cloud_url=loopback.url, device_token="0" * 32)
    backend = DeviceBackend(settings, retries=0)
    app = CdccaApp(backend, health_interval=None)
    try:
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for(pilot, lambda: app.state.cloud.online is not None, 15, "the health check")
            assert app.state.cloud.online and app.state.cloud.token_ok is False
            assert "token rejected" in screen_text(app)
            await pilot.press("f5")
            await wait_for(pilot, lambda: app.state.round.outcome == "failed", 10, "the refused round")
            assert "token" in app.state.round.error
            assert app.state.round.stage("measure").status == "pending"  # failed before measuring
    finally:
        backend.close()


@pytest.mark.timeout(120)
async def test_a_round_with_nothing_new_says_so_at_once(loopback):
    """Bug 3's second half: no queued sample and none unused on the cloud -> one line, before
    the on-device measurement (it used to measure for ~20 s, then fail 409 'upload some first')."""
    settings = load_settings(cloud_url=loopback.url, device_token=loopback.add_device("empty"))
    backend = DeviceBackend(settings, retries=0)
    app = CdccaApp(backend, health_interval=None)
    try:
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for(pilot, lambda: app.state.model_ready and app.state.cloud.online, 15, "model + cloud")
            assert app.state.cloud.token_ok
            await pilot.press("f5")
            await wait_for(pilot, lambda: app.state.round.outcome == "failed", 10, "the refused round")
            assert "nothing new to learn from" in app.state.round.error
            assert app.state.round.stage("measure").status == "pending"
    finally:
        backend.close()


async def test_at_80x24_the_uts_reason_and_both_legends_are_whole(images):
    """What the snapshots show, as text: the UTS reason is not cut, nor is either legend."""
    from tui_fakes import FakeBackend

    backend = FakeBackend()
    app = CdccaApp(backend, health_interval=None)
    async with app.run_test(size=(80, 24)) as pilot:
        await ask(pilot, "how many circles are there?", images[0][0])  # the fake keeps this one
        chat_pane = " ".join(" ".join(row[:48].replace("│", " ").replace("▌", " ").split())
                             for row in screen_rows(app))  # the chat pane's columns, row by row
        assert "kept for uplink (1.5 kB): entropy above the adaptive threshold" in chat_pane
        assert "entropy ■0 ■.5 ■1 ■1.5+" in chat_pane
        await pilot.press("f5")
        await wait_for(pilot, lambda: app.state.round.outcome == "done", 10, "the round")
        await pilot.press("escape", "3")
        await pilot.pause(0.3)
        text = screen_text(app)
        for d in ("source", "texture", "noise", "combo", "rotate"):
            assert f"━━ {d}" in text, d
