"""Cloud commands: `cdcca cloud add-device | devices | revoke | rotate | serve | worker | gc`.

Heavy imports (torch, the round job) happen inside `worker` only, so managing devices and even
the API server stay quick.  `serve` never trains: it starts `--workers` local worker processes
itself (default 1) so that the two-command demo stays two commands.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import typer

from .common import console, one_line_errors
from .main import app

cloud_app = typer.Typer(no_args_is_help=True, help="Run the cloud server and manage its devices.")
app.add_typer(cloud_app, name="cloud")

TOKEN_FILE_HELP = ("write the token to this file (created 0600) instead of printing it; "
                   "the device reads it with CDCCA_DEVICE_TOKEN=$(cat FILE)")


def _store():
    from cloud.store import Store
    from device.contracts.config import load_settings

    return Store(load_settings())


def _hand_out(name: str, token: str, token_file: Optional[Path], what: str) -> None:
    """Show a new token once, or put it in a private file (never in `ps`, logs or history)."""
    if token_file is not None:
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        os.chmod(token_file, 0o600)
        console.print(f"{what} device {name!r}; its token is in {token_file} (mode 0600). On the "
                      f"device: export CDCCA_DEVICE_TOKEN=$(cat {token_file})", highlight=False,
                      soft_wrap=True)
        return
    console.print(f"{what} device {name!r}; its token is shown only now (the cloud keeps just "
                  "a hash). On the device run:", highlight=False, soft_wrap=True)
    console.print(f"export CDCCA_DEVICE_TOKEN={token}", highlight=False, soft_wrap=True)


@cloud_app.command("add-device")
def add_device(name: str = typer.Argument(..., help="device name: 1-64 letters, digits, '_', '.', '-'"),
               token_file: Optional[Path] = typer.Option(None, "--token-file", help=TOKEN_FILE_HELP)):
    """Register a device and print its bearer token (shown only this once)."""
    with one_line_errors():
        store = _store()
        try:
            token = store.add_device(name)
        finally:
            store.close()
        _hand_out(name, token, token_file, "added")


@cloud_app.command("rotate")
def rotate(name: str = typer.Argument(..., help="the device whose token to replace"),
           token_file: Optional[Path] = typer.Option(None, "--token-file", help=TOKEN_FILE_HELP)):
    """Give a device a new token; the old one (or a revoked state) stops working at once."""
    with one_line_errors():
        store = _store()
        try:
            token = store.rotate_token(name)
        finally:
            store.close()
        _hand_out(name, token, token_file, "new token for")


@cloud_app.command("revoke")
def revoke(name: str = typer.Argument(..., help="the device to lock out")):
    """Revoke a device's token; its samples and rounds stay (`rotate` re-admits it)."""
    with one_line_errors():
        store = _store()
        try:
            store.revoke(name)
        finally:
            store.close()
        console.print(f"revoked the token of {name!r}; `cdcca cloud rotate {name}` issues a new one",
                      highlight=False)


@cloud_app.command("devices")
def devices():
    """The registered devices, with how many samples each has uploaded."""
    with one_line_errors():
        from rich.table import Table

        store = _store()
        try:
            rows = [(d, store.sample_counts(d.name)) for d in store.list_devices()]
        finally:
            store.close()
        if not rows:
            console.print("no devices yet; add one with `cdcca cloud add-device NAME`")
            return
        t = Table("device", "added (UTC)", "token", "samples", "unused")
        for d, counts in rows:
            t.add_row(d.name, d.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                      "revoked" if d.revoked else "active", str(counts.total), str(counts.unused))
        console.print(t)


TEACHER_HELP = "Hugging Face checkpoint dir (save_pretrained) of the teacher: rounds then run on the model-family seam"
REPLAY_HELP = "LLaVA-JSON replay set (ground truth the round rehearses against forgetting)"
EVAL_HELP = "LLaVA-JSON evaluation set (device-measured before/after each round)"


LOCAL_WORKER_NICE = 10  # serve's own workers yield the CPU to the API on a shared machine


def worker_command(model_dir: Optional[Path], teacher: Optional[Path] = None, replay: Optional[Path] = None,
                   eval_set: Optional[Path] = None) -> list[str]:
    cmd = [sys.executable, "-m", "cdcca_cli", "cloud", "worker", "--exit-with-parent",
           "--nice", str(LOCAL_WORKER_NICE)]
    for flag, val in (("--model-dir", model_dir), ("--teacher", teacher), ("--replay", replay), ("--eval", eval_set)):
        if val:
            cmd += [flag, str(val)]
    return cmd


@cloud_app.command("serve")
def serve(
    host: Optional[str] = typer.Option(None, "--host", help="bind address (default: cloud_url's host)"),
    port: Optional[int] = typer.Option(None, "--port", help="port (default: the port of cloud_url)"),
    model_dir: Optional[Path] = typer.Option(None, "--model-dir",
                                             help="teacher build folder for the local workers"),
    workers: int = typer.Option(1, "--workers", min=0,
                                help="local `cdcca cloud worker` processes to start (0: run them "
                                     "elsewhere, against the same db_url and blob storage)"),
    teacher: Optional[Path] = typer.Option(None, "--teacher", help=TEACHER_HELP),
    replay: Optional[Path] = typer.Option(None, "--replay", help=REPLAY_HELP),
    eval_set: Optional[Path] = typer.Option(None, "--eval", help=EVAL_HELP),
):
    """Run the cloud API (it never trains); rounds are run by worker processes."""
    with one_line_errors():
        from cloud.server import serve as serve_api
        from device.contracts.config import load_settings

        settings = load_settings()
        for what, p in (("--teacher", teacher), ("--replay", replay), ("--eval", eval_set)):
            if p is not None and not p.exists():
                raise ValueError(f"{what} {p}: no such file or directory")
        procs = [subprocess.Popen(worker_command(model_dir, teacher, replay, eval_set)) for _ in range(workers)]
        try:
            serve_api(settings, host, port, accept_rounds=True)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()


@cloud_app.command("worker")
def worker(
    model_dir: Optional[Path] = typer.Option(None, "--model-dir",
                                             help="teacher build folder (default: the embedded one)"),
    exit_with_parent: bool = typer.Option(False, "--exit-with-parent", hidden=True,
                                          help="stop when the process that started us is gone"),
    nice: int = typer.Option(0, "--nice", min=0, max=19,
                             help="lower this worker's CPU priority (serve's local workers use "
                                  f"{LOCAL_WORKER_NICE} so the API stays responsive)"),
    teacher: Optional[Path] = typer.Option(None, "--teacher", help=TEACHER_HELP),
    replay: Optional[Path] = typer.Option(None, "--replay", help=REPLAY_HELP),
    eval_set: Optional[Path] = typer.Option(None, "--eval", help=EVAL_HELP),
    train_processes: Optional[int] = typer.Option(
        None, "--train-processes", min=1,
        help="train each round on N processes under `accelerate launch` (one per GPU; gloo on CPU); "
             "default: settings' train_processes (1 = in this process)"),
    accelerate_config: Optional[Path] = typer.Option(
        None, "--accelerate-config", exists=True, dir_okay=False,
        help="accelerate config file passed to the training launch (e.g. FSDP, GPU ids)"),
    fsdp: Optional[bool] = typer.Option(None, "--fsdp/--no-fsdp",
                                        help="shard the twin with FSDP in the training launch (multi-GPU)"),
):
    """Claim queued rounds from the store and run them (AKD + DWC), until stopped."""
    with one_line_errors():
        import logging
        import threading

        from cloud.round_job import make_runner
        from cloud.worker import run_worker
        from device.contracts.config import load_settings

        logging.basicConfig(level=logging.WARNING, format="%(asctime)s worker %(message)s")
        if nice:
            os.nice(nice)
        settings = load_settings(train_processes=train_processes, accelerate_config=accelerate_config,
                                 train_fsdp=fsdp)
        # The runner's registry is <home>/cloud/models, where the API puts device uploads.
        runner = make_runner(settings, model_dir, teacher=teacher, replay=replay, eval_set=eval_set)
        stop = threading.Event()
        if exit_with_parent:
            parent = os.getppid()

            def watch() -> None:
                while not stop.wait(1.0):
                    if os.getppid() != parent:
                        stop.set()

            threading.Thread(target=watch, daemon=True).start()
        run_worker(settings, runner, stop)


@cloud_app.command("gc")
def gc(dry_run: bool = typer.Option(False, "--dry-run", help="only report what would go")):
    """Remove stale upload staging, old per-round models and patches, orphan blobs."""
    with one_line_errors():
        from cloud.gc import collect
        from device.contracts.config import load_settings

        store = _store()
        try:
            report = collect(load_settings(), store, dry_run=dry_run)
        finally:
            store.close()
        console.print(("would have " if dry_run else "") + report.line(), highlight=False)
