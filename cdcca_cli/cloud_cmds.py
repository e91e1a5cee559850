"""Cloud commands: `cdcca cloud add-device | devices | serve`. Heavy imports (torch, the round
job) happen inside `serve` only, so managing devices stays quick."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import console, one_line_errors
from .main import app

cloud_app = typer.Typer(no_args_is_help=True, help="Run the cloud server and manage its devices.")
app.add_typer(cloud_app, name="cloud")


@cloud_app.command("add-device")
def add_device(name: str = typer.Argument(..., help="device name: 1-64 letters, digits, '_', '.', '-'")):
    """Register a device and print its bearer token (shown only this once)."""
    with one_line_errors():
        from cloud.store import Store
        from device.contracts.config import load_settings

        store = Store(load_settings())
        try:
            token = store.add_device(name)
        finally:
            store.close()
        console.print(f"added device {name!r}; its token is shown only now (the cloud keeps just "
                      "a hash). On the device run:", highlight=False, soft_wrap=True)
        from cloud.signing import public_key  # the device pins it: patches must carry its signature

        console.print(f"export CDCCA_CLOUD_KEY={public_key(load_settings().cloud_dir)}",
                      highlight=False, soft_wrap=True)
        console.print(f"export CDCCA_DEVICE_TOKEN={token}", highlight=False, soft_wrap=True)


@cloud_app.command("devices")
def devices():
    """The registered devices, with how many samples each has uploaded."""
    with one_line_errors():
        from rich.table import Table

        from cloud.store import Store
        from device.contracts.config import load_settings

        store = Store(load_settings())
        try:
            rows = [(d, store.sample_counts(d.name)) for d in store.list_devices()]
        finally:
            store.close()
        if not rows:
            console.print("no devices yet; add one with `cdcca cloud add-device NAME`")
            return
        t = Table("device", "added (UTC)", "samples", "unused")
        for d, counts in rows:
            t.add_row(d.name, d.created_at.strftime("%Y-%m-%d %H:%M:%S"), str(counts.total),
                      str(counts.unused))
        console.print(t)


@cloud_app.command("serve")
def serve(
    host: Optional[str] = typer.Option(None, "--host", help="bind address (default: cloud_url's host)"),
    port: Optional[int] = typer.Option(None, "--port", help="port (default: the port of cloud_url)"),
    model_dir: Optional[Path] = typer.Option(None, "--model-dir",
                                             help="teacher build folder (default: the embedded one)"),
):
    """Run the cloud API; rounds distil the teacher into the devices' uploaded models."""
    with one_line_errors():
        from cloud.round_job import make_runner
        from cloud.server import serve as serve_api
        from device.contracts.config import load_settings

        settings = load_settings()
        # The runner's registry and the server's app.state.registry are the same folder:
        # <home>/cloud/models, where devices upload their models.
        runner = make_runner(settings, model_dir)
        serve_api(settings, host, port, round_runner=runner)
