"""Helpers for the TUI tests: generated images, waiting on the app, typing like a user."""
from __future__ import annotations

import time
from pathlib import Path

from PIL import Image

from cloud.zoo.scenes import generate


def save_images(folder: Path, domain: str, n: int, seed: int) -> list[tuple[Path, str]]:
    """``n`` generated scenes of ``domain`` as PNG files, with a question about each."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, s in enumerate(generate(domain, n, seed)):
        p = folder / f"{domain}-{seed}-{i}.png"
        Image.fromarray(s.image).save(p)
        out.append((p, s.question))
    return out


async def wait_for(pilot, cond, timeout: float = 30.0, what: str = "") -> None:
    """Let the app run until ``cond()`` holds (workers report through posted messages)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what or cond}")
        await pilot.pause(0.02)
    await pilot.pause()


async def ask(pilot, question: str, image: Path | str | None = None, timeout: float = 30.0,
              typing: bool = False) -> None:
    """Fill the inputs (image path, question; ``typing``: key by key, like a user), press Enter
    in the question field and wait for the answer."""
    app = pilot.app
    await wait_for(pilot, lambda: app.state.model_ready or app.state.model_error, timeout, "the model")
    app.query_one("#image-path").value = str(image or "")
    field = app.query_one("#question")
    field.value = ""
    field.focus()
    if typing:
        await pilot.press(*question)
    else:
        field.value = question
    await pilot.press("enter")
    await wait_for(pilot, lambda: app.state.turns and app.state.turns[-1].done, timeout, "the answer")


def no_blink(pilot) -> None:
    """Input cursors blink on a timer: freeze them for screenshots."""
    from textual.widgets import Input

    for w in pilot.app.query(Input):
        w.cursor_blink = False


def screen_segments(app) -> list:
    """The current screen as Rich segments (what the terminal would show)."""
    import io

    from rich.console import Console

    w, h = app.size
    console = Console(width=w, height=h, file=io.StringIO(), force_terminal=True, color_system="truecolor",
                      record=True, legacy_windows=False, safe_box=False)
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return [s for s in console._record_buffer if not s.control]


def screen_text(app) -> str:
    return "".join(s.text for s in screen_segments(app))
