"""Device commands: chat, queue, versions, rollback. Imports nothing heavy (no torch)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import console, err_console, max_tokens_option, one_line_errors, quant_option, threads_option
from .main import app

CHAT_HELP = """Ask the device model about an image (one-shot, or a REPL: /image PATH, /help, /quit).

The embedded default model is tiny and knows one small world: 32x32 pictures of up to three
shapes (circle, square, triangle, cross) in six colours (red, green, blue, yellow, purple,
orange), on plain, textured, noisy or rotated backgrounds.  It answers in a word or a short
caption to questions like: "what colour is the circle?", "what shape is the red object?",
"how many shapes are there?", "is the red circle on the left or the right?", "is there a blue
square?", "describe the image."  Anything else (photos, other questions) gets a guess.
Every question needs an image.  To bring a real model, give a llama-family GGUF and its mmproj:
--model my.gguf --mmproj my-mmproj.gguf."""


def _session(model, mmproj, quant, threads, queue: bool, max_tokens: int | None = None):
    from device.contracts.config import load_settings
    from device.models import open_device_model
    from device.queue import Queue
    from device.session import ChatSession

    s = load_settings(threads=threads)
    dm = open_device_model(s, model, mmproj, quant)
    q = Queue(s.queue_path) if queue else None
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
    if getattr(turn, "truncated", False):
        err_console.print("[dim](answer cut at --max-tokens)[/]")
    if getattr(turn, "duplicate", False):
        err_console.print("[dim](this image and question are already queued: not queued again)[/]")


@app.command(help=CHAT_HELP)
def chat(
    question: Optional[str] = typer.Argument(None, help="ask once and exit; omit for the interactive REPL"),
    image: Optional[Path] = typer.Option(None, "--image", "-i", help="image to ask about (needed for every question)"),
    model: Optional[Path] = typer.Option(None, "--model", help="GGUF text model (default: the embedded student)"),
    mmproj: Optional[Path] = typer.Option(None, "--mmproj", help="GGUF vision projector (omit for text-only)"),
    quant: Optional[str] = quant_option(),
    threads: Optional[int] = threads_option(),
    max_tokens: Optional[int] = max_tokens_option(),
    show_uncertainty: bool = typer.Option(False, "--show-uncertainty", "-u", help="shade tokens by entropy"),
    no_queue: bool = typer.Option(False, "--no-queue", help="do not keep uncertain samples for the uplink"),
):
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


REPL_COMMANDS = {"/image PATH": "the image the next questions are about",
                 "/help": "this list", "/quit": "leave (also /exit, /q, Ctrl-D)"}


def _line_editing() -> None:
    """Arrow keys and history (kept in memory for this session) via the standard library."""
    try:
        import readline  # noqa: F401  (importing it is what turns line editing on for input())
    except ImportError:  # pragma: no cover - e.g. Windows without pyreadline
        pass


def repl_command(line: str) -> tuple[str, str]:
    """('image', path) | ('help', '') | ('quit', '') | ('unknown', name) for a '/' line."""
    name, _, arg = line.partition(" ")
    if name in ("/quit", "/exit", "/q"):
        return "quit", ""
    if name == "/help":
        return "help", ""
    if name == "/image":
        return "image", arg.strip()
    return "unknown", name


def _repl(sess, image: Path | None, show_uncertainty: bool) -> None:
    from .render import legend

    _line_editing()
    console.print("[bold]cdcca chat[/] — ask about an image. Commands: /image PATH, /help, /quit")
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
        if line.startswith("/"):
            what, arg = repl_command(line)
            if what == "quit":
                break
            if what == "help":
                for k, v in REPL_COMMANDS.items():
                    console.print(f"  {k:12} {v}", highlight=False)
            elif what == "unknown":
                err_console.print(f"[red]error:[/] unknown command {arg}; try /help", highlight=False)
            elif not arg:
                err_console.print("[red]error:[/] /image needs a path: /image PATH", highlight=False)
            else:
                try:
                    data, image = sess.load_image(Path(arg).expanduser()), Path(arg).expanduser()
                    console.print(f"[dim]image: {image}[/]")
                except (ValueError, OSError) as e:
                    err_console.print(f"[red]error:[/] {e}", highlight=False)
            continue
        try:
            _print_turn(sess.ask(line, image=image, image_data=data), show_uncertainty)
        except ValueError as e:
            err_console.print(f"[red]error:[/] {e}", highlight=False)


@app.command()
def queue(
    prune: bool = typer.Option(False, "--prune", help="free the stored payloads (images, prompts, "
                               "distributions) of samples the cloud acknowledged; the counts stay"),
):
    """What the device has kept for the uplink: pending samples, bytes, and the ratio to raw."""
    with one_line_errors():
        from device.contracts.config import load_settings
        from device.queue import Queue

        with Queue(load_settings().queue_path) as q:
            if prune:
                console.print(f"pruned the payloads of {q.prune_acknowledged()} acknowledged samples")
            st = q.stats()
        console.print(f"chats answered {st.chats_seen}; kept by UTS {st.total} "
                      f"(pending {st.pending}, sent {st.sent}, acknowledged {st.acknowledged})")
        console.print(f"pending bytes {st.pending_bytes:,}; all kept samples: shipped {st.shipped_bytes:,} B "
                      f"vs {st.raw_bytes:,} B a no-selection uplink would send for those samples ({st.ratio:.2%}); "
                      f"vs {st.seen_raw_bytes:,} B for every chat: {st.ratio_all:.3%}", soft_wrap=True)
        console.print("[dim](no-selection = the original image file + the full fp32 distribution of every answer "
                      "token + all visual tokens; see device/uts.py)[/]", highlight=False, soft_wrap=True)


@app.command()
def versions(
    switch: Optional[str] = typer.Option(None, "--switch", metavar="VERSION",
                                         help="make VERSION current (back or forward; bytes verified first)"),
    quant: Optional[str] = quant_option(),
):
    """The device model's versions (patches applied); * marks the current one.  "patch" is the
    size of the patch file the round downloaded (the round report's figure)."""
    with one_line_errors():
        from device.contracts.config import load_settings
        from device.history import patch_file_sizes, switch_version
        from device.models import open_device_model

        s = load_settings()
        dm = open_device_model(s, quant=quant)
        if dm.store is None:
            raise ValueError("this model was given as files; it has no versions")
        cur = dm.store.current().id
        if switch is not None:
            v = switch_version(dm.store, switch, cur)
            console.print(f"switched: current version is now {v.id} (was {cur})")
            return
        vs = dm.store.list()
        sizes = patch_file_sizes(s, vs)
        for v in vs:
            mark = "*" if v.id == cur else " "
            size = "base" if not v.parent else f"{sizes.get(v.id, v.patch_bytes):>8,} B"
            console.print(f"{mark} {v.id:5} parent={v.parent or '-':5} round={v.round_id or '-':12} "
                          f"patch={size:>10}  {v.created}  {v.note}", highlight=False, soft_wrap=True)


@app.command()
def rollback(quant: Optional[str] = quant_option()):
    """Make the current version's parent current again (`cdcca versions --switch V` for any)."""
    with one_line_errors():
        from device.contracts.config import load_settings
        from device.history import switch_version
        from device.models import open_device_model

        dm = open_device_model(load_settings(), quant=quant)
        if dm.store is None:
            raise ValueError("this model was given as files; it has no versions")
        cur = dm.store.current()
        if cur.parent is None:
            raise ValueError(f"{cur.id} is the base version; nothing to roll back to")
        v = switch_version(dm.store, cur.parent, cur.id)
        console.print(f"rolled back: current version is now {v.id} (was {cur.id})")
