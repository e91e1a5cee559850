"""Round panel: is the cloud there (and does it take our token), and where the current round is
(check, measure, upload, distil, compress, cloud eval, download, apply, evaluate) with the running
stage's elapsed time and ETA.  Draws ``tui.state.RoundProgress`` and ``CloudView``."""
from __future__ import annotations

from rich.console import Group
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from tui.state import CloudView, RoundProgress

BAR = 10
_STATUS = {"pending": ("", "dim"), "running": (None, "yellow"), "done": ("done", "green"),
           "failed": ("failed", "red"), "cancelled": ("cancel", "magenta")}


def render_cloud(c: CloudView) -> Text:
    dot, style = {True: ("●", "green"), False: ("●", "red"), None: ("○", "dim")}[c.online]
    if c.online and c.token_ok is False:
        dot, style = "●", "bold red"
    elif c.online and c.token_ok is None:
        style = "yellow"
    t = Text()
    t.append(f"{dot} ", style=style)
    t.append("cloud " + (c.message if c.online is not False else "unreachable"), style=style)
    if c.online is False:
        t.append("\nchat still works offline", style="dim")
    return t


def render_round(r: RoundProgress, c: CloudView) -> Group:
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True, width=10)
    grid.add_column(no_wrap=True, width=BAR - 2)
    grid.add_column(no_wrap=True, justify="right", width=6)
    for s in r.stages:
        label, style = _STATUS[s.status]
        if label is None:
            label = f"{s.fraction:.0%}"
        bar = ProgressBar(total=1.0, completed=s.fraction, width=BAR - 2,
                          complete_style=style if s.status != "pending" else "dim",
                          finished_style=style)
        grid.add_row(Text(s.name, style="bold" if s.status == "running" else ""), bar, Text(label, style=style))
    parts = [render_cloud(c), grid]
    msg_style = {"done": "green", "failed": "red", "cancelled": "magenta"}.get(r.outcome, "")
    running = next((s for s in r.stages if s.status == "running"), None)
    if running is not None and running.started is not None:
        eta = running.eta()
        parts.append(Text(f"{running.name} {running.elapsed:.0f} s" + (f", ~{eta:.0f} s left" if eta is not None else ""),
                          style="yellow", no_wrap=True, overflow="ellipsis"))
    parts.append(Text(r.message, style=msg_style, overflow="ellipsis"))
    if r.error:
        parts.append(Text(f"error: {r.error}", style="bold red"))
    if r.warning:
        parts.append(Text(r.warning, style="bold yellow"))
    return Group(*parts)


class RoundPanel(Static):
    def on_mount(self) -> None:
        self.border_title = "Round"
        self.border_subtitle = "F5 sync · F6 cancel"

    def show(self, r: RoundProgress, c: CloudView) -> None:
        self.update(render_round(r, c))
        self.set_class(r.running, "-running")
