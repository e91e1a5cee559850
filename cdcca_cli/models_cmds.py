"""`cdcca models add / use / list`: a user's own GGUF under the device's version control.

After ``models add`` the model is the device's current one: ``chat``, ``versions``, ``rollback``,
``sync`` and the TUI act on it exactly as on the embedded default (``--quant`` still picks the
default). Imports nothing heavy (no torch)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import console, one_line_errors
from .main import models_app


@models_app.command("add")
def models_add(
    model: Path = typer.Argument(..., help="a GGUF text model llama.cpp can run (any family it supports)"),
    mmproj: Optional[Path] = typer.Option(None, "--mmproj", help="its multimodal projector GGUF (omit for text-only)"),
    name: Optional[str] = typer.Option(None, "--name", help="store name (default: the file name)"),
    use: bool = typer.Option(True, "--use/--no-use", help="make it the device's current model"),
):
    """Import a GGUF (+ mmproj) into the device's version store as v0 of a new model."""
    with one_line_errors():
        from device.contracts.config import load_settings
        from device.models import add_user_model

        s = load_settings()
        store = add_user_model(s, model, mmproj, name, activate=use)
        v = store.current()
        kind = "text + vision" if "mmproj" in v.files else "text-only"
        console.print(f"added [bold]{store.name}[/] ({kind}, {sum(f.size for f in v.files.values()):,} bytes) as "
                      f"{v.id}{'; it is now the current device model' if use else ''}")


@models_app.command("use")
def models_use(name: str = typer.Argument(..., help="a name from `cdcca models list`, or 'default'")):
    """Make a device model current ('default' = the embedded model at --quant / device_quant)."""
    with one_line_errors():
        from device.contracts.config import load_settings
        from device.models import set_active

        set_active(load_settings(), None if name == "default" else name)
        console.print(f"current device model: {name}")


@models_app.command("list")
def models_list():
    """The device's versioned models and which one is current."""
    with one_line_errors():
        from device.contracts.config import load_settings
        from device.models import active_name, list_models

        s = load_settings()
        active = active_name(s)
        rows = list_models(s)
        if not rows:
            console.print("no device models yet (the default is installed on first use)")
        for name, store in rows:
            v = store.current()
            mark = "*" if name == active or (active is None and name == f"default-{s.device_quant}") else " "
            console.print(f"{mark} {name}  {v.id}  {', '.join(sorted(v.files))}  {len(store.list())} version(s)")
