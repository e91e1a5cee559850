"""Device commands: chat, queue, versions, rollback. Imports nothing heavy (no torch)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import console, err_console, one_line_errors
from .main import app


def _session(model, mmproj, quant, threads, queue: bool, max_tokens: int | None = None):
    from device.contracts.config import load_settings
    from device.models import open_device_model
    from device.queue import Queue
    from device.session import ChatSession

    s = load_settings(threads=threads)
    dm = open_device_model(s, model, mmproj, quant)
    q = Queue(s.device_dir / "queue.sqlite") if queue else None
    return ChatSession.open(dm, s.threads, s.n_ctx, q, max_tokens=max_tokens or s.max_tokens)


def _print_turn(turn, show_uncertainty: bool) -> None:
    from .render import shaded

    if show_uncertainty:
        console.print(shaded(turn.pieces, [t.entropy for t in turn.tokens]))
        ents = " ".join(f"{t.entropy:.2f}" for t in turn.tokens[: len(turn.pieces)])
        line = f"[dim]token entropy (nats): {ents}  mean {turn.mean_entropy:.3f}"
        if turn.decision is not None:
            line += f"  | UTS: {'KEPT' if turn.queued else 'skipped'} ({turn.decision.reason})"
        console.print(line + "[/]", highlight=False, soft_wrap=True)
    else:
        console.print(turn.answer, highlight=False)


@app.command()
def chat(
    question: Optional[str] = typer.Argument(None, help="ask once and exit; omit for the interactive REPL"),
    image: Optional[Path] = typer.Option(None, "--image", "-i", help="image to ask about"),
    model: Optional[Path] = typer.Option(None, "--model", help="GGUF text model (default: the embedded student)"),
    mmproj: Optional[Path] = typer.Option(None, "--mmproj", help="GGUF vision projector (omit for text-only)"),
    quant: Optional[str] = typer.Option(None, "--quant", help="embedded model type: f32 | f16 | q8_0 | q4_0"),
    threads: Optional[int] = typer.Option(None, "--threads"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens"),
    show_uncertainty: bool = typer.Option(False, "--show-uncertainty", "-u", help="shade tokens by entropy"),
    no_queue: bool = typer.Option(False, "--no-queue", help="do not keep uncertain samples for the uplink"),
):
    """Ask the device model about an image (one-shot or REPL: /image PATH, /quit)."""
    with one_line_errors():
        sess = _session(model, mmproj, quant, threads, not no_queue, max_tokens)
        try:
            if question is not None:
                data = sess.load_image(image) if image else None
                _print_turn(sess.ask(question, image_data=data, image=image), show_uncertainty)
                return
            _repl(sess, image, show_uncertainty)
        finally:
            sess.close()


def _repl(sess, image: Path | None, show_uncertainty: bool) -> None:
    from .render import legend

    console.print("[bold]cdcca chat[/] — ask about an image. Commands: /image PATH, /quit")
    if show_uncertainty:
        console.print(legend())
    data = None
    if image:
        data = sess.load_image(image)
        console.print(f"[dim]image: {image}[/]")
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            continue
        if line in ("/quit", "/exit", "/q"):
            break
        if line.startswith("/image"):
            path = Path(line[len("/image"):].strip())
            try:
                data, image = sess.load_image(path), path
                console.print(f"[dim]image: {path}[/]")
            except ValueError as e:
                err_console.print(f"[red]error:[/] {e}")
            continue
        try:
            _print_turn(sess.ask(line, image=image, image_data=data), show_uncertainty)
        except ValueError as e:
            err_console.print(f"[red]error:[/] {e}")


@app.command()
def queue():
    """What the device has kept for the uplink: pending samples, bytes, and the ratio to raw."""
    with one_line_errors():
        from device.contracts.config import load_settings
        from device.queue import Queue

        with Queue(load_settings().device_dir / "queue.sqlite") as q:
            st = q.stats()
        console.print(f"chats answered {st.chats_seen}; kept by UTS {st.total} "
                      f"(pending {st.pending}, sent {st.sent}, acknowledged {st.acknowledged})")
        console.print(f"pending bytes {st.pending_bytes:,}; all kept samples: shipped {st.shipped_bytes:,} B "
                      f"vs raw {st.raw_bytes:,} B of those samples ({st.ratio:.2%}); vs raw {st.seen_raw_bytes:,} B "
                      f"of every chat: {st.ratio_all:.3%}")


@app.command()
def versions(quant: Optional[str] = typer.Option(None, "--quant")):
    """The device model's versions (patches applied); * marks the current one."""
    with one_line_errors():
        from device.contracts.config import load_settings
        from device.models import open_device_model

        dm = open_device_model(load_settings(), quant=quant)
        cur = dm.store.current().id
        for v in dm.store.list():
            mark = "*" if v.id == cur else " "
            console.print(f"{mark} {v.id:5} parent={v.parent or '-':5} round={v.round_id or '-':12} "
                          f"patch={v.patch_bytes:>8,} B  {v.created}  {v.note}", highlight=False)


@app.command()
def rollback(quant: Optional[str] = typer.Option(None, "--quant")):
    """Make the previous model version current again (bytes verified by sha256)."""
    with one_line_errors():
        from device.contracts.config import load_settings
        from device.models import open_device_model

        dm = open_device_model(load_settings(), quant=quant)
        v = dm.store.rollback()
        console.print(f"rolled back: current version is now {v.id}")
