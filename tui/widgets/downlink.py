"""Downlink panel: one row per round (patch bytes, ratio to the full model, tensors patched,
apply time, accuracy before -> after) and the device model's version history (rollback).
Draws ``tui.state.RoundRow`` / ``VersionRow`` lists."""
from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from tui.state import RoundRow, VersionRow, human_bytes, percent, short_id

# "learned": samples the round trained on (also ones uploaded before it); "patch": the patch file
ROUND_COLUMNS = ("round", "learned", "patch", "÷model", "tensors", "apply", "VQA before→after")
VERSION_COLUMNS = ("", "version", "parent", "round", "patch", "created")


def round_cells(r: RoundRow) -> tuple:
    acc = "-" if r.vqa_after is None else f"{percent(r.vqa_before, 1)} → {percent(r.vqa_after, 1)}"
    return (short_id(r.round_id), str(r.samples_learned), human_bytes(r.downlink_bytes), percent(r.downlink_ratio),
            str(r.tensors_patched), f"{1000 * r.apply_seconds:.0f} ms", acc)


def version_cells(v: VersionRow) -> tuple:
    mark = Text("●", style="bold green") if v.current else Text("")
    return (mark, Text(v.id, style="bold" if v.current else ""), v.parent or "-", short_id(v.round_id),
            human_bytes(v.patch_bytes) if v.parent else "base", v.created[:19].replace("T", " "))


class DownlinkPanel(Vertical):
    def compose(self) -> ComposeResult:
        yield DataTable(id="rounds-table", cursor_type="row", zebra_stripes=True)
        yield Static("", id="history-title")
        yield DataTable(id="versions-table", cursor_type="row")

    def on_mount(self) -> None:
        self.border_title = "Downlink"
        self.border_subtitle = "F9 switch to the highlighted version"
        self.query_one("#history-title", Static).update(Text("version history", style="bold"))

    def show(self, rounds: list[RoundRow], versions: list[VersionRow]) -> None:
        rt = self.query_one("#rounds-table", DataTable)
        rt.clear(columns=True)  # columns too, so their widths follow the rows
        rt.add_columns(*ROUND_COLUMNS)
        for r in rounds:
            rt.add_row(*round_cells(r), key=r.round_id or None)
        if not rounds:
            rt.add_row("none yet", *[""] * (len(ROUND_COLUMNS) - 1))
        vt = self.query_one("#versions-table", DataTable)
        vt.clear(columns=True)
        vt.add_columns(*VERSION_COLUMNS)
        for v in reversed(versions):
            vt.add_row(*version_cells(v), key=v.id)
