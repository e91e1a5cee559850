"""`cdcca chat` and `cdcca queue` through the real entry point (subprocesses), including the REPL
under a pseudo-terminal and the one-line errors that must leave the queue untouched."""
from __future__ import annotations

import os
import pty
import select
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from cloud.zoo import scenes
from device.contracts.config import load_settings

CDCCA = [sys.executable, "-m", "cdcca_cli"]


def run(*args, env=None, timeout=120):
    return subprocess.run(CDCCA + list(args), capture_output=True, text=True, timeout=timeout, env=env or os.environ.copy())


@pytest.fixture()
def image(tmp_path) -> Path:
    s = scenes.generate("noise", 1, 5)[0]
    p = tmp_path / "x.png"
    Image.fromarray(s.image).save(p)
    return p


def _queued(home: Path) -> int:
    db = load_settings(home=home).queue_path
    if not db.exists():
        return 0
    with sqlite3.connect(db) as c:
        return c.execute("SELECT count(*) FROM samples").fetchone()[0]


def test_one_shot_answers_with_uncertainty(image):
    r = run("chat", "--image", str(image), "--show-uncertainty", "what colour is the circle?")
    assert r.returncode == 0, r.stderr
    assert "token entropy (nats):" in r.stdout and "UTS:" in r.stdout
    r = run("chat", "--image", str(image), "--quant", "q8_0", "how many shapes are there?")
    assert r.returncode == 0 and r.stdout.strip() in ("one", "two", "three"), r.stdout


@pytest.mark.parametrize("case", ["corrupt", "missing", "oversized", "model", "truncated", "mmproj", "no_image",
                                  "path_as_question"])
def test_bad_input_is_one_line_and_queues_nothing(tmp_path, image, case, request):
    home = Path(os.environ["CDCCA_HOME"])
    args = ["--image", str(image)]
    question = "what colour is the circle?"
    if case == "no_image":  # bug 4: a vision model answered from the words alone and queued it
        args = []
    elif case == "path_as_question":
        args, question = [], str(image)
    if case == "corrupt":
        (tmp_path / "bad.png").write_bytes(b"not an image at all")
        args = ["--image", str(tmp_path / "bad.png")]
    elif case == "missing":
        args = ["--image", str(tmp_path / "nope.png")]
    elif case == "oversized":
        big = tmp_path / "big.png"
        with open(big, "wb") as f:
            f.truncate(40 << 20)
        args = ["--image", str(big)]
    elif case == "model":
        args += ["--model", str(tmp_path / "nope.gguf")]
    elif case == "truncated":
        from device.contracts.config import DEFAULT_MODEL_DIR

        t = tmp_path / "t.gguf"
        t.write_bytes((DEFAULT_MODEL_DIR / "student-q4_0.gguf").read_bytes()[:5000])
        args += ["--model", str(t)]
    elif case == "mmproj":  # a real converter-written mmproj of another (narrower) Idefics3 model
        from device.contracts.config import DEFAULT_MODEL_DIR

        other = request.getfixturevalue("convert_hf")(request.getfixturevalue("tiny_idefics3"), mmproj=True)
        args += ["--model", str(DEFAULT_MODEL_DIR / "student-q4_0.gguf"), "--mmproj", str(other)]
    r = run("chat", *args, question)
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert _queued(home) == 0


def test_repl_under_a_pseudo_terminal(image):
    pid, fd = pty.fork()
    if pid == 0:  # child: the real CLI on a terminal
        os.execv(sys.executable, CDCCA + ["chat", "--image", str(image)])
    out = b""

    def read_until(token: bytes, timeout=60.0, start=0):
        nonlocal out
        end = time.time() + timeout
        while token not in out[start:] and time.time() < end:
            r, _, _ = select.select([fd], [], [], 0.5)
            if r:
                try:
                    out += os.read(fd, 4096)
                except OSError:
                    break
        return token in out[start:]

    def ask(line: bytes) -> bytes:
        mark = len(out)
        os.write(fd, line + b"\n")
        assert read_until(b"\r\n> ", 30, start=mark + len(line)), out[mark:]
        return out[mark:]

    try:
        assert read_until(b"> ")
        colour = ask(b"what colour is the circle?")
        assert any(c in colour for c in (b"red", b"green", b"blue", b"yellow", b"purple", b"orange")), colour
        assert b"image: " in ask(f"/image {image}".encode())
        assert b"unknown command /colour" in ask(b"/colour of the circle?")  # bug 10: not sent to the model
        assert b"/image needs a path" in ask(b"/image")
        assert b"/quit" in ask(b"/help")
        assert any(w in ask(b"how many shapes are there?") for w in (b"one", b"two", b"three"))
        os.write(fd, b"/quit\n")
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0
    finally:
        os.close(fd)
    assert b"cdcca chat" in out


def test_queue_reports_ratios(image):
    for q in ("what colour is the circle?", "how many shapes are there?", "describe the image."):
        assert run("chat", "--image", str(image), q).returncode == 0
    r = run("queue")
    assert r.returncode == 0 and "chats answered 3" in r.stdout and "for every chat" in r.stdout
