"""`cdcca tui`: the device in a terminal window (Textual). Imports nothing heavy (no torch)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import one_line_errors
from .main import app


@app.command()
def tui(
    image: Optional[Path] = typer.Option(None, "--image", "-i", help="image to start with"),
    quant: Optional[str] = typer.Option(None, "--quant", help="embedded model type: f32 | f16 | q8_0 | q4_0"),
    threads: Optional[int] = typer.Option(None, "--threads"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens"),
    cloud_url: Optional[str] = typer.Option(None, "--cloud", help="cloud base URL (default: settings)"),
    token: Optional[str] = typer.Option(None, "--token", envvar="CDCCA_DEVICE_TOKEN"),
    steps: int = typer.Option(120, help="distillation steps on the cloud per round"),
    budget: int = typer.Option(48 * 1024, help="downlink byte budget for the patch"),
    lr: float = typer.Option(1e-3, help="adapter learning rate"),
    seed: int = typer.Option(0),
    no_eval: bool = typer.Option(False, "--no-eval", help="skip the on-device accuracy before/after"),
    eval_per_domain: int = typer.Option(40, help="held-out questions per domain for the accuracy"),
):
    """Chat, watch the uplink queue, run and follow cloud rounds, roll back: one window.
    Keys: s sync, c cancel, u upload, r rollback, d theme, ? help, q quit (Esc leaves the inputs)."""
    with one_line_errors():
        from device.contracts.config import load_settings
        from device.contracts.wire import RoundOptions
        from device.sync import SyncOptions
        from tui.app import run
        from tui.backend import DeviceBackend

        s = load_settings(threads=threads, max_tokens=max_tokens, cloud_url=cloud_url, device_token=token)
        opts = SyncOptions(RoundOptions(steps=steps, downlink_budget_bytes=budget, learning_rate=lr, seed=seed),
                           evaluate=not no_eval, eval_per_domain=eval_per_domain)
        run(DeviceBackend(s, quant=quant, sync_options=opts), image)
