"""`cdcca` — the front door. Commands import their heavy modules lazily so that the device
commands (chat, queue, sync, versions) never import torch or transformers."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import console, one_line_errors

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Cloud-device collaborative continual adaptation of multimodal LLMs.")
models_app = typer.Typer(no_args_is_help=True, help="Build and inspect the embedded default models.")
data_app = typer.Typer(no_args_is_help=True, help="Generate datasets in LLaVA JSON format.")
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")

from . import device_cmds  # noqa: E402,F401  (registers chat/queue/versions/rollback)
from . import tui_cmd  # noqa: E402,F401
from . import cloud_cmds  # noqa: E402,F401
from . import sync_cmd  # noqa: E402,F401
from . import demo  # noqa: E402,F401
from . import bench_cmd  # noqa: E402,F401
from . import models_cmds  # noqa: E402,F401  (models add/use/list)


@models_app.command("build")
def models_build(
    preset: str = typer.Option("default", help="tiny | default"),
    out: Optional[Path] = typer.Option(None, help="output folder (default: <home>/zoo/<preset>)"),
    force: bool = typer.Option(False, "--force", help="rebuild even if a cached build matches"),
):
    """Train the embedded default (HF Idefics3 student + teacher on the generated world), convert the
    student with llama.cpp's official converter, quantize it, report device-measured accuracies."""
    with one_line_errors():
        from cloud.zoo import hf_build
        from device.contracts.config import load_settings

        if preset not in hf_build.PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(hf_build.PRESETS)}")
        _print_manifest(hf_build.build(preset, out or load_settings().zoo_dir / preset, force=force))


@models_app.command("info")
def models_info(path: Optional[Path] = typer.Argument(None, help="a build folder (default: the embedded one)")):
    """Sizes, build time and accuracies of a model build."""
    with one_line_errors():
        from device.contracts.config import DEFAULT_MODEL_DIR

        _print_manifest(path or DEFAULT_MODEL_DIR)


def _print_manifest(path: Path) -> None:
    import json

    from rich.table import Table

    mf = Path(path) / "manifest.json"
    if not mf.is_file():
        raise ValueError(f"{path}: no manifest.json (not a cdcca model build)")
    m = json.loads(mf.read_text())
    console.print(f"[bold]{path}[/]  preset={m['preset']} hash={m['config_hash']} seed={m['seed']} "
                  f"built in {m['build_seconds']:.0f}s; params student={m['params']['student']:,} "
                  f"teacher={m['params']['teacher']:,}")
    console.print("GGUF bytes: " + ", ".join(f"{k}={v:,}" for k, v in m["gguf_bytes"].items()))
    t = Table("domain", "student VQA", "teacher VQA", "student caption F1", "teacher caption F1")
    acc = m["accuracy"]
    for d in acc["student"]["domains"]:
        s, te = acc["student"]["domains"][d], acc["teacher"]["domains"][d]
        t.add_row(d, f"{s['vqa']:.3f}", f"{te['vqa']:.3f}", f"{s['caption_f1']:.3f}", f"{te['caption_f1']:.3f}")
    console.print(t)


@data_app.command("generate")
def data_generate(
    out: Path = typer.Argument(..., help="folder to write <domain>.json and images/ into"),
    domains: str = typer.Option("source,texture,noise,combo,rotate", help="comma-separated domains"),
    n: int = typer.Option(100, help="samples per domain"),
    seed: int = typer.Option(1234, help="generator seed (same seed, same samples)"),
):
    """Write generated samples as LLaVA conversation JSON with PNG images beside it."""
    with one_line_errors():
        from cloud.zoo.llava_io import write_generated

        for d in domains.split(","):
            p = write_generated(out, d.strip(), n, seed)
            console.print(f"wrote {p}")


def main() -> None:  # pragma: no cover
    app()
