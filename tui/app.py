"""`cdcca tui`: the device in a window.  Chat with the device model about an image, watch what
UTS keeps for the uplink, run a cloud round and follow it, see what the patch cost and rolled in,
roll back.  Long work runs in thread workers; the widgets only draw ``TuiState``.

The cloud is reached only through ``device.uplink.CloudClient`` (inside the backend), exactly as
``cdcca sync`` does; when it is down the panels say so and the chat keeps working.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from textual import on, work
from textual.app import App, ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Footer, Input, TabbedContent, TabPane

from tui import keys
from tui.backend import Backend
from tui.versions import TAB_ROUNDS, VersionActions
from tui.screens import HelpScreen
from tui.state import CloudView, TuiState, one_line
from tui.widgets.chat import ChatPane
from tui.widgets.downlink import DownlinkPanel
from tui.widgets.plots import AccuracyPanel, EntropyHistogram
from tui.widgets.rounds import RoundPanel
from tui.widgets.uplink import UplinkPanel

TABS = {"chat": "tab-chat", "rounds": TAB_ROUNDS, "plots": "tab-plots"}


class UiCall(Message):
    """A worker's request to run ``fn(*args)`` on the UI thread (posted: never blocks the worker,
    keeps order, and is dropped once the app has closed)."""

    def __init__(self, fn: Any, args: tuple, kwargs: dict) -> None:
        super().__init__()
        self.fn, self.args, self.kwargs = fn, args, kwargs


class CdccaApp(VersionActions, App[None]):
    CSS_PATH = "app.tcss"
    TITLE = "cdcca"
    ENABLE_COMMAND_PALETTE = False
    AUTO_FOCUS = None  # the question field gets focus once, at start (not after every dialog)
    # taller terminals get the image at full size (32x32 pixels = 32x16 cells)
    VERTICAL_BREAKPOINTS = [(0, "-short"), (36, "-tall")]
    BINDINGS = keys.BINDINGS  # function keys for actions; see tui/keys.py

    def __init__(self, backend: Backend, image: str | Path | None = None,
                 health_interval: float | None = 15.0, watch_interval: float | None = 1.0) -> None:
        super().__init__()
        self.backend = backend
        self.state = TuiState(cloud=CloudView(url=backend.cloud_url))
        self._image = str(image) if image else None
        self._health_interval = health_interval
        self._watch_interval = watch_interval
        self._cancel: threading.Event | None = None
        self._bindings_key: tuple = ()

    # --- layout ---------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        # kept as attributes: a modal screen on top must not hide them from the updates
        self.chat = ChatPane(self._image, id="chat")
        self.uplink_panel = UplinkPanel(id="uplink")
        self.round_panel = RoundPanel(id="round")
        self.downlink_panel = DownlinkPanel(id="downlink")
        self.accuracy_plot = AccuracyPanel(id="accuracy")
        self.entropy_plot = EntropyHistogram(id="entropy")
        with TabbedContent(initial=TABS["chat"]) as self.tabs:
            with TabPane("Chat", id=TABS["chat"]):
                with Horizontal(id="chat-row"):
                    yield self.chat
                    with Vertical(id="side"):
                        yield self.uplink_panel
                        yield self.round_panel
            with TabPane("Rounds", id=TABS["rounds"]):
                yield self.downlink_panel
            with TabPane("Plots", id=TABS["plots"]):
                with Horizontal(id="plots"):
                    yield self.accuracy_plot
                    yield self.entropy_plot
        yield Footer()

    def _ui(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        """(worker thread) run ``fn(*args, **kwargs)`` on the UI thread."""
        self.post_message(UiCall(fn, args, kwargs))

    @on(UiCall)
    def _run_ui_call(self, message: UiCall) -> None:
        if self.screen_stack:  # not while the app is shutting down
            message.fn(*message.args, **message.kwargs)

    def on_mount(self) -> None:
        self.chat.question.focus()
        self.chat.set_model(self.state.model_label)
        self.render_panels()
        self.render_rounds()
        self.render_plots()
        self.load_model()
        self.check_cloud()
        if self._health_interval:
            self.set_interval(self._health_interval, self.check_cloud)
        if self._watch_interval:
            self.set_interval(self._watch_interval, self.watch_current)

    def on_unmount(self) -> None:
        if self._cancel is not None:
            self._cancel.set()

    # --- drawing the state ----------------------------------------------------------------
    def render_panels(self) -> None:
        self.uplink_panel.show(self.state.uplink)
        self.round_panel.show(self.state.round, self.state.cloud)
        key = (self.state.round.running, self.state.round.cancelling, len(self.state.versions))
        if key != self._bindings_key:  # the footer greys out keys that do nothing now
            self._bindings_key = key
            self.refresh_bindings()

    def render_rounds(self) -> None:
        self.downlink_panel.show(self.state.rounds, self.state.versions)

    def render_plots(self) -> None:
        self.accuracy_plot.show(self.state.accuracy_series())
        self.entropy_plot.show(*self.state.entropy_histogram())

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        return keys.available(action, self.state)

    # --- model and device data ------------------------------------------------------------
    @work(thread=True, exclusive=True, group="model")
    def load_model(self) -> None:
        try:
            name = self.backend.open()
        except Exception as e:  # missing assets, bad files: the rest of the app still works
            self._ui(self._model_failed, e)
            return
        self._ui(self._model_ready, name)
        self._refresh_device()

    def _model_ready(self, name: str) -> None:
        self.state.model_name, self.state.model_ready = name, True
        self.chat.set_model(self.state.model_label)
        self.chat.set_status("ready")
        if self._image:
            self.preview_image(self._image)

    def _model_failed(self, error: BaseException) -> None:
        self.state.model_error = one_line(error)
        self.state.model_name = "no model"
        self.chat.set_model("no model")
        self.chat.set_status(f"model: {self.state.model_error}", error=True)

    def _refresh_device(self) -> None:
        """(worker thread) queue stats and versions, read fresh from disk."""
        try:
            stats = self.backend.queue_stats()
            versions, current = self.backend.versions()
            sizes = self.backend.patch_sizes()
        except Exception as e:
            self._ui(self.notify, one_line(e), title="device", severity="error")
            return
        self._ui(self._device_refreshed, stats, versions, current, sizes)

    def _device_refreshed(self, stats: Any, versions: list[Any], current: str | None,
                          sizes: dict[str, int] | None = None) -> None:
        self.state.set_queue(stats)
        self.state.set_versions(versions, current, sizes)
        self.chat.set_model(self.state.model_label)
        self.render_panels()
        self.render_rounds()

    # --- chat -----------------------------------------------------------------------------
    @on(Input.Submitted, "#image-path")
    def _image_submitted(self, event: Input.Submitted) -> None:
        if event.value.strip():
            self.preview_image(event.value.strip())
        else:
            self.chat.image_view.set_image(None)
        self.chat.question.focus()

    @work(thread=True, exclusive=True, group="preview")
    def preview_image(self, path: str) -> None:
        try:
            _, rgb = self.backend.load_image(path)
        except Exception as e:
            self._ui(self._show_image, None, one_line(e))
            return
        self._ui(self._show_image, rgb, f"image: {Path(path).name}")

    def _show_image(self, rgb: Any, status: str) -> None:
        if rgb is not None:
            self.chat.image_view.set_image(rgb)
        self.chat.set_status(status, error=rgb is None)

    @on(Input.Submitted, "#question")
    def _question_submitted(self, event: Input.Submitted) -> None:
        question = event.value.strip()
        if not question:
            return
        if not self.state.model_ready:
            self.chat.set_status(self.state.model_error or "the model is still loading", error=True)
            return
        if self.state.chat_busy:
            self.chat.set_status("still answering the last question", error=True)
            return
        event.input.clear()
        image = self.chat.image_path or None
        turn = self.state.start_turn(question, image)
        self.chat.transcript.add_turn(turn)
        self.chat.set_status("answering...")
        self.ask(question, image)

    @work(thread=True, group="chat")
    def ask(self, question: str, image: str | None) -> None:
        def on_token(piece: str, tok: Any) -> None:
            self._ui(self._token, piece, tok.entropy)

        try:
            data = self.backend.load_image(image) if image else None
            if data is not None:
                self._ui(self._show_image, data[1], "answering...")
            turn = self.backend.ask(question, image, data, on_token)
        except Exception as e:  # bad image, runtime error: one line in the transcript
            self._ui(self._turn_failed, e)
            return
        self._ui(self._turn_done, turn)
        try:
            stats = self.backend.queue_stats()
        except Exception:
            return
        self._ui(self._queue_changed, stats)

    def _token(self, piece: str, entropy: float) -> None:
        self.chat.transcript.update_last(self.state.add_token(piece, entropy))

    def _turn_done(self, turn: Any) -> None:
        t = self.state.finish_turn(turn)
        self.chat.transcript.update_last(t)
        self.chat.set_status("kept for the uplink" if t.kept else "ready")
        self.render_plots()

    def _turn_failed(self, error: BaseException) -> None:
        self.chat.transcript.update_last(self.state.fail_turn(error))
        self.chat.set_status("ready")

    def _queue_changed(self, stats: Any) -> None:
        self.state.set_queue(stats)
        self.render_panels()

    def action_focus_question(self) -> None:
        self.action_tab("chat")
        self.chat.question.focus()

    # --- cloud: health and upload ---------------------------------------------------------
    @work(thread=True, exclusive=True, group="health")
    def check_cloud(self) -> None:
        try:
            health = self.backend.health()
        except Exception as e:
            self._ui(self._cloud_down, e)
        else:
            self._ui(self._cloud_up, health)

    def _cloud_up(self, check: Any) -> None:
        self.state.cloud_up(check.version, check.token_ok)
        self.render_panels()

    def _cloud_down(self, error: BaseException) -> None:
        self.state.cloud_down(error)
        self.render_panels()

    def action_upload(self) -> None:
        if self.state.round.running:
            self.notify("a round is running; it uploads the queue itself", title="upload")
            return
        if self.state.upload_started():
            self.render_panels()
            self.upload()

    @work(thread=True, exclusive=True, group="uplink")
    def upload(self) -> None:
        try:
            result = self.backend.upload()
        except Exception as e:  # CloudUnavailable, CloudError: the panel says why
            self._ui(self._upload_failed, e)
        else:
            self._ui(self._upload_done, result)
        self._refresh_device()

    def _upload_done(self, result: Any) -> None:
        self.state.upload_done(result)
        self.render_panels()
        self.check_cloud()

    def _upload_failed(self, error: BaseException) -> None:
        self.state.upload_failed(error)
        self.render_panels()
        self.check_cloud()

    # --- the round ------------------------------------------------------------------------
    def action_sync(self) -> None:
        if self.state.round.running:
            return
        if self.state.uplink.busy:
            self.notify("an upload is running; sync again when it is done", title="sync")
            return
        self.state.round_started()
        self.render_panels()
        self._cancel = threading.Event()
        self.run_round(self._cancel)

    @work(thread=True, exclusive=True, group="round")
    def run_round(self, cancel: threading.Event) -> None:
        def on_stage(name: str, fraction: float, message: str) -> None:
            self._ui(self._stage, name, fraction, message, time.monotonic())

        try:
            check = self.backend.health()  # fail fast (and say so) when the cloud is down
        except Exception as e:
            self._ui(self._cloud_down, e)
            self._ui(self._round_failed, e)
            return
        self._ui(self._cloud_up, check)
        if check.token_ok is False:
            self._ui(self._round_failed, "the cloud rejected this device's token; check CDCCA_DEVICE_TOKEN")
            return
        try:
            if cancel.is_set():
                raise InterruptedError("sync cancelled")
            report = self.backend.sync(on_stage, cancel)
        except InterruptedError:
            self._ui(self._round_cancelled)
        except Exception as e:
            self._ui(self._round_failed, e)
        else:
            self._ui(self._round_done, report)
        self._refresh_device()

    def _stage(self, name: str, fraction: float, message: str, now: float | None = None) -> None:
        self.state.on_stage(name, fraction, message, now)
        self.render_panels()
        if name == "upload" and fraction >= 1.0:
            self._refresh_queue()

    @work(thread=True, group="queue")
    def _refresh_queue(self) -> None:
        try:
            stats = self.backend.queue_stats()
        except Exception:
            return
        self._ui(self._queue_changed, stats)

    def _round_done(self, report: Any) -> None:
        self.state.round_done(report)
        self.render_panels()
        self.render_rounds()
        self.render_plots()
        if self.state.round.warning:
            self.notify(self.state.round.warning, title="accuracy fell", severity="warning", timeout=20)

    def _round_failed(self, error: BaseException) -> None:
        self.state.round_failed(error)
        self.render_panels()

    def _round_cancelled(self) -> None:
        self.state.round_cancelled()
        self.render_panels()

    def action_cancel_round(self) -> None:
        if self._cancel is not None and self.state.cancel_requested():
            self._cancel.set()
            self.render_panels()

    # --- screens and tabs -----------------------------------------------------------------
    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_tab(self, name: str) -> None:
        self.tabs.active = TABS[name]


def run(backend: Backend, image: str | Path | None = None) -> None:
    try:
        CdccaApp(backend, image).run()
    finally:
        backend.close()
