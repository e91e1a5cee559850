"""`cdcca bench`: the measured report (Markdown + JSON + PNG plots)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import console, one_line_errors
from .main import app


@app.command()
def bench(
    quick: bool = typer.Option(False, "--quick", help="the short profile (3 held-out seeds instead of 5)"),
    out: Path = typer.Option(Path("results"), "--out", help="folder for report.md, results.json and the PNG plots"),
    seeds: Optional[int] = typer.Option(None, "--seeds", min=1, help="chat streams / AKD seeds for table 1"),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="training processes (default 2)"),
    profile: Optional[str] = typer.Option(None, "--profile", hidden=True, help="tiny | quick | full (tests use tiny)"),
    model_dir: Optional[Path] = typer.Option(None, "--model-dir", help="a cdcca build folder (default: the shipped "
                                             "assets/default; `cdcca models build --out DIR` makes one)"),
):
    """Benchmark the whole system with fixed seeds: accuracy vs baselines, ablations, transmission,
    device speed, a fleet with a cloud restart, and continual rounds."""
    with one_line_errors():
        from bench.profiles import PROFILES
        from bench.run import run_bench

        name = profile or ("quick" if quick else "full")
        if name not in PROFILES:
            raise ValueError(f"unknown profile {name!r}; choose from {', '.join(PROFILES)}")
        cmd = "cdcca bench" + (" --quick" if quick else "") + f" --out {out}" + (f" --seeds {seeds}" if seeds else "")
        if model_dir is not None:
            cmd += f" --model-dir {model_dir}"
            if not model_dir.is_dir():
                raise ValueError(f"--model-dir {model_dir}: no such folder")
        kw = {"model_dir": model_dir} if model_dir is not None else {}
        md = run_bench(name, out, seeds, workers, command=cmd, **kw)
        console.print(f"report: {md}")
