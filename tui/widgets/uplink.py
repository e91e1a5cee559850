"""Uplink panel: what UTS kept and is waiting to go up, how small it is next to raw, the last
upload's result.  Draws ``tui.state.UplinkView``."""
from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from tui.state import UplinkView, human_bytes, percent


def render_uplink(u: UplinkView) -> Table:
    t = Table.grid(padding=(0, 1))
    t.add_column(style="dim", no_wrap=True)
    t.add_column(overflow="fold")
    t.add_row("queue", f"{u.pending} pending · {u.acknowledged} acked")
    t.add_row("bytes", f"{human_bytes(u.pending_bytes)} pending")
    # shipped bytes vs what a no-selection uplink would send for the same samples (device.uts)
    t.add_row("ratio", f"{percent(u.ratio)} of no-UTS" if u.raw_bytes else "-")
    if u.busy:
        last = Text("uploading...", style="yellow")
    else:
        style = {True: "green", False: "red", None: "dim"}[u.last_ok]
        last = Text(u.last_upload, style=style, overflow="ellipsis", no_wrap=True)
    t.add_row("last", last)
    return t


class UplinkPanel(Static):
    def on_mount(self) -> None:
        self.border_title = "Uplink"
        self.border_subtitle = "F2 upload now"

    def show(self, u: UplinkView) -> None:
        self.update(render_uplink(u))
