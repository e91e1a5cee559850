"""Modal screens: the help screen (key bindings from ``tui/keys.py``, what the colours mean) and a yes/no
confirmation."""
from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Static

from cdcca_cli.render import legend
from tui.keys import KEYS

ABOUT = ("Ask the device model about an image. Every answer token is shaded by its entropy; "
         "▲ marks a sample UTS kept for the uplink. A round uploads the queue, lets the cloud "
         "distil its teacher into the device model and applies the small patch it sends back. "
         "Actions are on function keys, so nothing you type can trigger one.")


def help_table(bindings: list[tuple[str, str]]) -> Table:
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold cyan", no_wrap=True)
    t.add_column()
    for key, what in bindings:
        t.add_row(key, what)
    return t


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,f1", "dismiss", "Close")]

    def __init__(self, keys: list[tuple[str, str]] = KEYS) -> None:
        super().__init__()
        self._rows = keys

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-box") as box:
            box.border_title = "Help"
            box.border_subtitle = "Esc: close"
            yield Static(Text(ABOUT), id="help-about")
            yield Static(legend(), id="help-legend")
            yield Static(help_table(self._rows), id="help-keys")

    def action_dismiss(self) -> None:  # type: ignore[override]
        self.dismiss(None)


class ConfirmScreen(ModalScreen[bool]):
    """A yes/no question no typed letter can answer: "No" has the focus, Esc says no, and "Yes"
    takes a deliberate Tab (or arrow) + Enter, or a click.  Text typed by mistake while the dialog
    opens (the "y" of "yellow") changes nothing."""

    BINDINGS = [Binding("escape", "answer(False)", "No"),
                Binding("left,right", "app.focus_previous", "Other button", show=False)]

    def __init__(self, question: str) -> None:
        super().__init__()
        self._question = question

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm-box"):
            yield Static(self._question, id="confirm-question")
            yield Static(Text("Tab to Yes, then Enter · Esc: no", style="dim"), id="confirm-hint")
            with Horizontal(id="confirm-buttons"):
                yield Button("Yes", variant="error", id="yes")
                yield Button("No", variant="primary", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)
