"""The app's keys in one place: the bindings (what each key does), the help screen's rows (what it
says about them), and when each action is available (the footer greys out the others).

Textual reads ``BINDINGS`` from the app class; ``available`` is plain logic on ``TuiState``, so it
needs no screen to test. Every action is on a function key or ctrl+q: no letter typed into a
question can reach one, even with the focus outside the inputs (Tab cycles between the two inputs
only). The tab digits and "i" only move the view, and only fire when no input has the focus.
"""
from __future__ import annotations

from textual.binding import Binding

from tui.state import TuiState

BINDINGS = [
    Binding("f5", "sync", "Sync"),
    Binding("f2", "upload", "Upload"),
    Binding("f6", "cancel_round", "Cancel"),
    Binding("f9", "switch_version", "Versions"),
    Binding("f10", "toggle_dark", "Theme"),
    Binding("f1", "help", "Help"),
    Binding("ctrl+q", "quit", "Quit"),
    Binding("1", "tab('chat')", "Chat tab", show=False),
    Binding("2", "tab('rounds')", "Rounds tab", show=False),
    Binding("3", "tab('plots')", "Plots tab", show=False),
    Binding("i", "focus_question", "Type a question", show=False),
]

KEYS = [("Enter", "in the image field: preview it; in the question field: ask"),
        ("Tab", "the other input (Tab never leaves the inputs)"),
        ("Esc / i", "leave the inputs (for 1 2 3) / back to the question"),
        ("F5", "sync: one cloud round (check, measure, upload, distil, compress, download, apply, evaluate)"),
        ("F6", "cancel the running round"),
        ("F2", "upload the queue now"),
        ("F9", "versions: roll back to the parent, or on the Rounds tab switch to the highlighted "
               "version (asks first; Tab to Yes, then Enter)"),
        ("1 2 3", "tabs: chat, rounds (downlink + versions), plots (outside the inputs)"),
        ("F10", "dark / light theme"),
        ("F1", "this help"),
        ("ctrl+q", "quit")]


def available(action: str, state: TuiState) -> bool | None:
    """``App.check_action``'s answer: True (enabled), None (shown greyed: nothing to do now)."""
    running = state.round.running
    if action == "sync":
        return None if running else True
    if action == "cancel_round":
        return True if running and not state.round.cancelling else None
    if action == "switch_version":
        return None if running or len(state.versions) < 2 else True
    return True
