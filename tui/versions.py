"""The TUI's version actions (a mixin of ``CdccaApp``): follow a CURRENT another face switched,
and switch versions through a confirmation that names the versions it will really act on.

Every dialog is built from the versions re-read from disk right before it opens, and the switch
itself is refused if CURRENT moved again while the dialog was open (``Backend.switch``).
"""
from __future__ import annotations

from typing import Any

from textual import work
from textual.widgets import DataTable

from tui.screens import ConfirmScreen
from tui.state import one_line

TAB_ROUNDS = "tab-rounds"


class VersionActions:
    """Needs from the app: backend, state, chat, tabs, notify, push_screen, _ui, _refresh_device,
    render_rounds."""

    # --- another face (cdcca sync, cdcca versions) may switch the model under us ------------
    @work(thread=True, exclusive=True, group="watch")
    def watch_current(self) -> None:
        """(timer) read the store's CURRENT; on a change, reload the chat model and redraw."""
        try:
            on_disk = self.backend.disk_version()
        except Exception:
            return
        if self.state.round.running or not self.state.version_changed(on_disk):
            return
        try:
            now = self.backend.follow_disk()
        except Exception as e:
            self._ui(self.notify, one_line(e), title="device model", severity="error")
            return
        if now is not None:  # (None: this app made the change itself and has reloaded already)
            self._ui(self.notify, f"the device model changed on disk: now {now} (reloaded)", title="device model")
        self._refresh_device()

    # --- versions -------------------------------------------------------------------------
    def _selected_version(self) -> str | None:
        """The version row highlighted in the history table (on the Rounds tab), if any."""
        if self.tabs.active != TAB_ROUNDS:
            return None
        table = self.query_one("#versions-table", DataTable)
        if not table.row_count:
            return None
        try:
            return str(table.coordinate_to_cell_key((table.cursor_row, 0)).row_key.value)
        except Exception:
            return None

    def action_switch_version(self) -> None:
        """F9: roll back to the parent, or (Rounds tab) switch to the highlighted version.  The
        versions are read from disk first, so the dialog names the ones it will really act on."""
        if self.state.round.running:
            self.notify("a round is running", title="versions", severity="warning")
            return
        self.ask_switch(self._selected_version())

    @work(thread=True, exclusive=True, group="versions")
    def ask_switch(self, target: str | None) -> None:
        try:
            self.backend.follow_disk()
            versions, current = self.backend.versions()
            sizes = self.backend.patch_sizes()
        except Exception as e:
            self._ui(self.notify, one_line(e), title="versions", severity="error")
            return
        self._ui(self._confirm_switch, versions, current, sizes, target)

    def _confirm_switch(self, versions: list[Any], current: str | None, sizes: dict[str, int],
                        target: str | None) -> None:
        self.state.set_versions(versions, current, sizes)
        self.chat.set_model(self.state.model_label)
        self.render_rounds()
        q = self.state.switch_question(target)
        if q is None:
            self.notify("nothing to switch to (highlight a version on the Rounds tab)", title="versions",
                        severity="warning")
            return
        cur, dest, question = q

        def answered(yes: bool | None) -> None:
            if yes:
                self.switch(dest, cur)

        self.push_screen(ConfirmScreen(question), answered)

    @work(thread=True, exclusive=True, group="versions")
    def switch(self, target: str, expected_current: str) -> None:
        try:
            version = self.backend.switch(target, expected_current)
        except Exception as e:
            self._ui(self.notify, one_line(e), title="versions", severity="error")
        else:
            self._ui(self.notify, f"now on {version.id}", title="versions")
        self._refresh_device()
