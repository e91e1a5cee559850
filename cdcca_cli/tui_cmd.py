"""`cdcca tui`: the device in a terminal window (Textual). Imports nothing heavy (no torch)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import (cloud_url_option, load_device_settings, max_tokens_option, one_line_errors, quant_option,
                     round_option, threads_option, token_option)
from .main import app


@app.command()
def tui(
    image: Optional[Path] = typer.Option(None, "--image", "-i", help="image to start with"),
    quant: Optional[str] = quant_option(),
    threads: Optional[int] = threads_option(),
    max_tokens: Optional[int] = max_tokens_option(),
    cloud_url: Optional[str] = cloud_url_option(),
    token: Optional[str] = token_option(),
    steps: int = round_option("steps", "--steps", help="distillation steps on the cloud per round"),
    budget: int = round_option("downlink_budget_bytes", "--budget", help="largest patch file in bytes"),
    lr: float = round_option("learning_rate", "--lr"),
    seed: int = round_option("seed", "--seed", help="seed of the cloud's training"),
    no_eval: bool = typer.Option(False, "--no-eval", help="skip the on-device accuracy before/after"),
    eval_per_domain: Optional[int] = typer.Option(None, help="held-out questions per domain for the accuracy "
                                                                   "(default: the same as `cdcca sync`)"),
):
    """Chat, watch the uplink queue, run and follow cloud rounds, switch versions: one window.

    Keys: F5 sync, F6 cancel, F2 upload, F9 versions, F10 theme, F1 help, ctrl+q quit; Tab moves
    between the two inputs (no letter you type is ever an action)."""
    with one_line_errors():
        from device.contracts.wire import RoundOptions
        from device.sync import SyncOptions
        from tui.app import run
        from tui.backend import DeviceBackend

        s = load_device_settings(threads=threads, max_tokens=max_tokens, cloud_url=cloud_url, device_token=token)
        opts = SyncOptions(RoundOptions(steps=steps, downlink_budget_bytes=budget, learning_rate=lr, seed=seed),
                           evaluate=not no_eval,
                           **({"eval_per_domain": eval_per_domain} if eval_per_domain else {}))
        run(DeviceBackend(s, quant=quant, sync_options=opts), image)
