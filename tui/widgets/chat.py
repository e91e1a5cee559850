"""The chat pane: transcript of turns (answers shaded by token entropy, UTS marker), the image
the next question is about, and the two inputs.  Draws ``tui.state.ChatTurn``s; decides nothing."""
from __future__ import annotations

from pathlib import Path

from rich.console import Group
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Input, Static

from cdcca_cli.render import legend, shaded
from tui.state import ChatTurn, human_bytes

from .image_view import ImageView

KEPT = "▲"  # the sample was kept for the uplink


def render_turn(turn: ChatTurn) -> Group:
    """Question, the answer shaded by token entropy, then one line: mean entropy + UTS marker."""
    head = Text()
    if turn.image:
        head.append(f"[{Path(turn.image).name}] ", style="dim")
    head.append(turn.question, style="bold")
    if turn.error:
        return Group(head, Text(f"error: {turn.error}", style="bold red"))
    pieces = list(turn.pieces)
    if pieces:
        pieces[0] = pieces[0].lstrip()
    answer = shaded(pieces, turn.entropies)
    if not turn.done:
        answer.append(" ▌", style="dim")
        return Group(head, answer)
    mark = Text(f"mean H {turn.mean_entropy:.2f}  ", style="dim", no_wrap=True, overflow="ellipsis")
    if turn.truncated:
        answer.append(" … (cut at max tokens)", style="dim italic")
    parts = [head, answer, Text(f"mean H {turn.mean_entropy:.2f}", style="dim")]
    # the UTS outcome on a line of its own, wrapped, so the reason stays readable at 80 columns
    if turn.kept:
        mark = Text(f"{KEPT} kept for uplink ({human_bytes(turn.shipped_bytes)}): ", style="bold yellow")
        mark.append(turn.reason.removeprefix("kept: "), style="yellow")  # the marker already says "kept"
        parts.append(mark)
    elif turn.kept is False:
        parts.append(Text(f"· not kept: {turn.reason}", style="dim"))
    return Group(*parts)


class ChatInput(Input):
    """An input that Esc leaves.  Tab and shift+Tab cycle between the chat's inputs only, so a Tab
    typed mid-question never moves the focus to a place where keys mean actions."""

    BINDINGS = [Binding("escape", "leave", "Leave input", show=False),
                Binding("tab", "cycle(1)", "Next input", show=False),
                Binding("shift+tab", "cycle(-1)", "Previous input", show=False)]

    def action_leave(self) -> None:
        self.screen.set_focus(None)

    def action_cycle(self, step: int) -> None:
        inputs = [w for w in self.screen.query(ChatInput) if w.display]
        if self in inputs:
            inputs[(inputs.index(self) + step) % len(inputs)].focus()


class TurnView(Static):
    DEFAULT_CSS = """
    TurnView { margin: 0 0 1 0; }
    """

    def show(self, turn: ChatTurn) -> None:
        self.update(render_turn(turn))
        self.set_class(bool(turn.kept), "-kept")


class Transcript(VerticalScroll):
    def add_turn(self, turn: ChatTurn) -> TurnView:
        view = TurnView(render_turn(turn))
        self.mount(view)
        self.scroll_end(animate=False)
        return view

    def update_last(self, turn: ChatTurn) -> None:
        views = self.query(TurnView)
        if views:
            views.last().show(turn)
            self.scroll_end(animate=False)


class ChatPane(Vertical):
    """Border title: the model; the inputs post ``Input.Submitted`` that the app handles."""

    def __init__(self, image: str | None = None, **kw) -> None:
        super().__init__(**kw)
        self._image = image

    def compose(self) -> ComposeResult:
        yield Transcript(id="transcript")
        with Horizontal(id="ask-row"):
            yield ImageView(id="image-view")
            with Vertical(id="ask-inputs"):
                yield ChatInput(self._image or "", placeholder="image path (Enter: preview)", id="image-path",
                                compact=True)
                yield ChatInput(placeholder="ask about the image (Enter)", id="question", compact=True)
                yield Static(legend(compact=True), id="legend")
                yield Static("", id="chat-status")

    def set_model(self, label: str) -> None:
        self.border_title = f"Chat · {label}"

    def set_status(self, text: str, error: bool = False) -> None:
        self.query_one("#chat-status", Static).update(Text(text, style="bold red" if error else "dim"))

    @property
    def transcript(self) -> Transcript:
        return self.query_one(Transcript)

    @property
    def image_view(self) -> ImageView:
        return self.query_one(ImageView)

    @property
    def image_path(self) -> str:
        return self.query_one("#image-path", Input).value.strip()

    @property
    def question(self) -> Input:
        return self.query_one("#question", Input)
