"""`cdcca sync`: one adaptation round with live progress and a round report."""
from __future__ import annotations

from typing import Optional

import typer

from .common import console, one_line_errors
from .main import app

# one definition of the round defaults: the wire schema's
from device.contracts.wire import RoundOptions as _RO  # noqa: E402

_DEF = {k: f.default for k, f in _RO.model_fields.items()}


def report_table(rep) -> "Table":  # noqa: F821
    from rich.table import Table

    t = Table(title=f"round {rep.round_id}", show_header=False)
    t.add_row("uplink", f"{rep.uploaded} samples, {rep.uplink_bytes:,} B vs raw {rep.uplink_raw_bytes:,} B "
                        f"({rep.uplink_ratio:.3%})")
    t.add_row("downlink", f"{rep.downlink_bytes:,} B patch = {rep.downlink_ratio:.2%} of the {rep.full_gguf_bytes:,} B GGUF; "
                          f"full fp16 delta would be {rep.full_fp16_delta_bytes:,} B")
    t.add_row("patched", f"{rep.tensors_patched} tensors, {rep.rows_patched} rows; version {rep.version_before} -> "
                         f"{rep.version_after}; apply {rep.apply_seconds * 1e3:.1f} ms, reload {rep.reload_seconds * 1e3:.0f} ms")
    t.add_row("cloud round", f"{rep.round_seconds:.1f} s")
    if rep.accuracy_before and rep.accuracy_after:
        b, a = rep.accuracy_before["domains"], rep.accuracy_after["domains"]
        t.add_row("device accuracy", "  ".join(f"{d} {b[d]['vqa']:.2f}->{a[d]['vqa']:.2f}" for d in b))
    return t


def run_with_progress(settings, client, opts, quant=None, reload=None):
    from rich.progress import BarColumn, Progress, TextColumn

    from device.sync import STAGES, run_sync

    with Progress(TextColumn("{task.description:>9}"), BarColumn(), TextColumn("{task.fields[msg]}"),
                  console=console, transient=False) as prog:
        tasks = {s: prog.add_task(s, total=1.0, msg="") for s in STAGES}

        def on_stage(stage, frac, msg):
            i = STAGES.index(stage if stage in STAGES else "distil")
            for s in STAGES[:i]:
                prog.update(tasks[s], completed=1.0)
            prog.update(tasks[STAGES[i]], completed=frac, msg=msg[:50])

        rep = run_sync(settings, client, opts, quant, on_stage, reload=reload)
        for t in tasks.values():
            prog.update(t, completed=1.0)
    return rep


@app.command()
def sync(
    steps: int = typer.Option(_DEF["steps"], help="distillation steps on the cloud"),
    budget: int = typer.Option(_DEF["downlink_budget_bytes"], help="downlink byte budget for the patch"),
    lr: float = typer.Option(_DEF["learning_rate"], help="adapter learning rate"),
    seed: int = typer.Option(0),
    no_eval: bool = typer.Option(False, "--no-eval", help="skip the on-device accuracy before/after"),
    quant: Optional[str] = typer.Option(None, "--quant"),
    cloud_url: Optional[str] = typer.Option(None, "--cloud", help="cloud base URL (default: settings)"),
    token: Optional[str] = typer.Option(None, "--token", envvar="CDCCA_DEVICE_TOKEN"),
):
    """Upload the queue, run a cloud round, download + apply the patch, report."""
    with one_line_errors():
        from device.contracts.config import load_settings
        from device.contracts.wire import RoundOptions
        from device.sync import SyncOptions
        from device.uplink import CloudClient

        s = load_settings(cloud_url=cloud_url, device_token=token)
        if not s.device_token:
            raise ValueError("no device token: run `cdcca cloud add-device NAME` on the cloud and set CDCCA_DEVICE_TOKEN")
        client = CloudClient(s.cloud_url, s.device_token)
        opts = SyncOptions(RoundOptions(steps=steps, downlink_budget_bytes=budget, learning_rate=lr, seed=seed),
                           evaluate=not no_eval)
        console.print(report_table(run_with_progress(s, client, opts, quant)))
