"""`cdcca sync`: one adaptation round with live progress and a round report.

On a terminal each stage is a progress row with its elapsed time and ETA; when stdout is not a
terminal (a log, CI) each stage prints one line when it ends.  A wrong token or a round with
nothing new to learn from fails first, in one line, before the slow on-device measurement.
"""
from __future__ import annotations

import time
from typing import Optional

import typer

from .common import (cloud_url_option, console, err_console, load_device_settings, one_line_errors, quant_option, round_option,
                     token_option)
from .main import app


def report_table(rep) -> "Table":  # noqa: F821
    from rich.table import Table

    from device.contracts.round_metrics import accuracy_drop, as_accuracy

    t = Table(title=f"round {rep.round_id}", show_header=False)
    learned = getattr(rep, "samples_learned", 0) or rep.uploaded
    t.add_row("learned from", f"{learned} samples ({rep.uploaded} uploaded by this sync"
                              + (f", {rep.duplicates} the cloud already had)" if rep.duplicates else ")"))
    if rep.uplink_raw_bytes:
        t.add_row("uplink", f"{rep.uplink_bytes:,} B shipped vs {rep.uplink_raw_bytes:,} B for a no-selection uplink "
                            f"of the same samples ({rep.uplink_ratio:.2%})")
    t.add_row("patch file", f"{rep.downlink_bytes:,} B = {rep.downlink_ratio:.2%} of the {rep.full_gguf_bytes:,} B "
                            f"device GGUF pair; every changed weight as fp16: {rep.full_fp16_delta_bytes:,} B")
    t.add_row("patched", f"{rep.tensors_patched} tensors, {rep.rows_patched} rows; version {rep.version_before} -> "
                         f"{rep.version_after}; apply {rep.apply_seconds * 1e3:.1f} ms, reload {rep.reload_seconds * 1e3:.0f} ms")
    t.add_row("cloud round", f"{rep.round_seconds:.1f} s")
    before, after = as_accuracy(rep.accuracy_before), as_accuracy(rep.accuracy_after)
    if before and after:
        b, a = before.vqa_by_domain(), after.vqa_by_domain()
        t.add_row("device accuracy", "  ".join(f"{d} {b[d]:.2f}->{a[d]:.2f}" for d in b if d in a))
        if accuracy_drop(before, after) is not None:
            t.add_row("[bold yellow]warning[/]", f"[bold yellow]VQA fell {before.overall:.3f} -> {after.overall:.3f}; "
                                                 f"`cdcca versions --switch {rep.version_before}` goes back[/]")
    return t


class _StageLines:
    """Not a terminal: one line per stage, printed when the stage ends (with its wall time)."""

    def __init__(self, stages: tuple[str, ...], clock=time.monotonic) -> None:
        self.stages, self.clock = stages, clock
        self.i, self.t0, self.msg = -1, clock(), ""

    def __call__(self, stage: str, frac: float, msg: str) -> None:
        i = self.stages.index(stage)
        if i != self.i:
            self.close(i)
            self.i, self.t0 = i, self.clock()
        self.msg = msg or self.msg

    def close(self, upto: int | None = None) -> None:
        end = len(self.stages) if upto is None else upto
        if 0 <= self.i < end:
            console.print(f"{self.stages[self.i]:>10}  done in {self.clock() - self.t0:5.1f} s  {self.msg}",
                          highlight=False, soft_wrap=True)
            for s in self.stages[self.i + 1:end]:
                console.print(f"{s:>10}  skipped", highlight=False)
        self.msg = ""


def run_with_progress(settings, client, opts, quant=None, reload=None):
    from device.contracts.round_metrics import STAGES
    from device.sync import run_sync

    if not console.is_terminal:
        lines = _StageLines(STAGES)
        rep = run_sync(settings, client, opts, quant, lines, reload=reload)
        lines.close()
        return rep
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description:>10}"), BarColumn(bar_width=24), TimeElapsedColumn(),
                  TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[msg]}"),
                  console=console, transient=False) as prog:
        tasks = {s: prog.add_task(s, total=1.0, msg="", start=False) for s in STAGES}

        def on_stage(stage, frac, msg):
            i = STAGES.index(stage)
            for s in STAGES[:i]:
                prog.update(tasks[s], completed=1.0)
                prog.stop_task(tasks[s])
            prog.start_task(tasks[stage])
            prog.update(tasks[stage], completed=frac, msg=msg[:40])
            if frac >= 1.0:
                prog.stop_task(tasks[stage])

        rep = run_sync(settings, client, opts, quant, on_stage, reload=reload)
        for t in tasks.values():
            prog.update(t, completed=1.0)
    return rep


@app.command()
def sync(
    steps: int = round_option("steps", "--steps", help="distillation steps on the cloud"),
    budget: int = round_option("downlink_budget_bytes", "--budget", help="largest patch file in bytes"),
    lr: float = round_option("learning_rate", "--lr"),
    seed: int = round_option("seed", "--seed", help="seed of the cloud's training"),
    no_eval: bool = typer.Option(False, "--no-eval", help="skip the on-device accuracy before/after"),
    quant: Optional[str] = quant_option(),
    cloud_url: Optional[str] = cloud_url_option(),
    token: Optional[str] = token_option(),
):
    """Upload the queue, run a cloud round, download + apply the patch, report.

    Checks the token and that there is something new to learn from first (one request)."""
    with one_line_errors():
        from device.contracts.wire import RoundOptions
        from device.preflight import preflight
        from device.uplink import CloudClient

        s = load_device_settings(cloud_url=cloud_url, device_token=token)
        if not s.device_token:
            raise ValueError("no device token: run `cdcca cloud add-device NAME` on the cloud, then set CDCCA_DEVICE_TOKEN "
                             f"or write it to {s.device_dir / 'token'} (chmod 600)")
        client = CloudClient(s.cloud_url, s.device_token)
        if client.transport_warning:
            err_console.print(client.transport_warning, style="yellow", markup=False, highlight=False)
        preflight(s, client)  # before importing the round driver (llama.cpp, gguf): fails in ~startup time
        from device.sync import SyncOptions

        opts = SyncOptions(RoundOptions(steps=steps, downlink_budget_bytes=budget, learning_rate=lr, seed=seed),
                           evaluate=not no_eval)
        console.print(report_table(run_with_progress(s, client, opts, quant)))

