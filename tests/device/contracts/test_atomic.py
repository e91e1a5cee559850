"""device/contracts/atomic.py: real files in tmp_path -- content, modes, no temp left behind, and a
writer that fails (raises, or is killed) leaves the old file intact."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from device.contracts import atomic
from device.contracts.atomic import atomic_open, atomic_path, temp_target, write_bytes_atomic, write_text_atomic

REPO = Path(__file__).resolve().parents[3]


def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_writes_and_replaces_whole_content_leaving_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    write_bytes_atomic(target, b"one")
    assert target.read_bytes() == b"one"
    write_bytes_atomic(target, b"two, longer")
    assert target.read_bytes() == b"two, longer"
    write_text_atomic(target, "caf\u00e9\n")
    assert target.read_bytes() == "caf\u00e9\n".encode("utf-8")
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_streamed_writes_text_and_binary(tmp_path: Path) -> None:
    with atomic_open(tmp_path / "a.bin") as f:
        for i in range(3):
            f.write(bytes([i]) * 4)
    with atomic_open(tmp_path / "b.txt", text=True) as f:
        f.write("x\n")
        f.write("y\n")
    assert (tmp_path / "a.bin").read_bytes() == b"\0" * 4 + b"\1" * 4 + b"\2" * 4
    assert (tmp_path / "b.txt").read_text() == "x\ny\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.txt"]


def test_mode_is_set_on_the_temp_from_its_creation(tmp_path: Path) -> None:
    target = tmp_path / "token"
    target.write_bytes(b"old")
    os.chmod(target, 0o644)
    with atomic_open(target, mode=0o600) as f:
        (tmp,) = [p for p in tmp_path.iterdir() if p != target]
        assert _mode(tmp) == 0o600 and temp_target(tmp.name) == "token"
        assert target.read_bytes() == b"old"  # not replaced until the block ends
        f.write(b"secret")
    assert target.read_bytes() == b"secret" and _mode(target) == 0o600


def test_default_mode_is_what_open_would_give(tmp_path: Path) -> None:
    write_bytes_atomic(tmp_path / "f", b"x")
    assert _mode(tmp_path / "f") == 0o666 & ~_umask()


class Boom(RuntimeError):
    pass


def test_a_writer_that_raises_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "versions.json"
    target.write_text("old")
    with pytest.raises(Boom):
        with atomic_open(target, text=True) as f:
            f.write("half of the new")
            f.flush()
            raise Boom
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["versions.json"]
    with pytest.raises(TypeError):
        write_bytes_atomic(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_text() == "old" and len(list(tmp_path.iterdir())) == 1


def test_a_failed_rename_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "blocked"
    (target / "inside").mkdir(parents=True)  # a non-empty folder cannot be replaced by a file
    with pytest.raises(OSError):
        write_bytes_atomic(target, b"new")
    assert (target / "inside").is_dir()
    assert [p.name for p in tmp_path.iterdir()] == ["blocked"]


def test_atomic_path_for_writers_that_open_the_path_themselves(tmp_path: Path) -> None:
    target = tmp_path / "patch.gguf"
    target.write_bytes(b"old patch")
    with atomic_path(target, mode=0o640) as tmp:
        assert tmp.parent == tmp_path and tmp.is_file() and _mode(tmp) == 0o640 & ~_umask()
        tmp.write_bytes(b"new patch")  # opens with "wb" itself: the mode stays
    assert target.read_bytes() == b"new patch" and _mode(target) == 0o640 & ~_umask()

    def bad_writer(p: Path) -> None:
        p.write_bytes(b"torn")
        raise Boom

    with pytest.raises(Boom):
        with atomic_path(target) as tmp:
            bad_writer(tmp)
    assert target.read_bytes() == b"new patch"
    assert [p.name for p in tmp_path.iterdir()] == ["patch.gguf"]


def test_fsync_order_file_then_rename_then_folder(tmp_path: Path, monkeypatch) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file")
        real_fsync(fd)

    def replace(a, b):
        events.append("replace")
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_bytes_atomic(tmp_path / "a", b"x")
    assert events == ["fsync-file", "replace", "fsync-dir"]
    events.clear()
    write_bytes_atomic(tmp_path / "b", b"x", sync_dir=False)
    assert events == ["fsync-file", "replace"]
    events.clear()
    with atomic_path(tmp_path / "c") as tmp:
        tmp.write_bytes(b"x")
    assert events == ["fsync-file", "replace", "fsync-dir"]


def test_fsync_dir_tolerates_what_cannot_be_opened(tmp_path: Path) -> None:
    atomic.fsync_dir(tmp_path)
    atomic.fsync_dir(tmp_path / "missing")  # no error: a platform without dir fds skips it


KILLED_WRITER = """
import os, signal, sys
from device.contracts.atomic import atomic_open
with atomic_open(sys.argv[1]) as f:
    f.write(b"half of the new bytes")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_writer_leaves_the_old_file_and_a_recognisable_temp(tmp_path: Path) -> None:
    target = tmp_path / "CURRENT"
    target.write_text("v1\n")
    child = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target)], cwd=REPO,
                           env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, timeout=60)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert target.read_text() == "v1\n"
    (left,) = [p for p in tmp_path.iterdir() if p != target]
    assert temp_target(left.name) == "CURRENT"


@pytest.mark.parametrize("name, target", [
    (".CURRENT.1a2b3c4d.tmp", "CURRENT"), (".v3.delta.00ff00ff.tmp", "v3.delta"),
    (".feature_stats.npz.abc.tmp", "feature_stats.npz"),
    ("CURRENT", None), ("CURRENT.tmp-123", None), (".lock", None), (".x.tmp", None), ("a.b.tmp", None),
])
def test_temp_target(name: str, target: str | None) -> None:
    assert temp_target(name) == target
