"""`cdcca sync` through the real entry point against a real (loopback) cloud: a wrong token or a
round with nothing new to learn from fails in one line, fast, before any on-device measurement;
the report and the stage lines when stdout is not a terminal."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from device.contracts.config import load_settings

CDCCA = [sys.executable, "-m", "cdcca_cli"]
# The bound is 2 s for the whole command (met when the machine is idle: 1.1 s measured).
# On the shared, loaded 2-core machine Python + the CLI's imports alone took 0.9-2.8 s, so the test
# bounds what the failure adds on top of starting the CLI (measured in the same run) and prints
# both.  That extra is mostly importing the device's HTTP client (device.uplink pulls in gguf,
# numpy and cryptography: ~0.8 s under load); the old path spent 15-20 s measuring first.
EXTRA_S = 1.5


@pytest.fixture
def cloud():
    from cloud.loopback import LoopbackCloud

    with LoopbackCloud(load_settings()) as c:
        yield c


def sync(url: str, token: str) -> tuple[subprocess.CompletedProcess, float]:
    env = os.environ.copy()
    t0 = time.perf_counter()
    r = subprocess.run(CDCCA + ["sync", "--cloud", url, "--token", token], capture_output=True, text=True,
                       timeout=120, env=env)
    return r, time.perf_counter() - t0


def one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    return lines[0]


def startup_s() -> float:
    """Baseline from the same run: the CLI starting and printing its help (no work at all)."""
    t0 = time.perf_counter()
    subprocess.run(CDCCA + ["--help"], capture_output=True, timeout=60, check=True)
    return time.perf_counter() - t0


def test_a_wrong_token_fails_at_once_in_one_line(cloud):
    cloud.add_device("laptop")
    r, took = sync(cloud.url, "0" * 40)
    line = one_error_line(r)
    assert "rejected this device's token" in line
    assert "measure" not in r.stdout  # failed before the on-device measurement
    base = startup_s()
    print(f"wrong token: {took:.2f} s (baseline `cdcca --help`: {base:.2f} s)")
    assert took - base < EXTRA_S, f"took {took:.2f} s, startup {base:.2f} s"


def test_nothing_new_to_learn_from_fails_at_once_and_says_so(cloud):
    r, took = sync(cloud.url, cloud.add_device("laptop"))
    line = one_error_line(r)
    assert "nothing new to learn from" in line and "upload some first" not in line
    base = startup_s()
    print(f"nothing new: {took:.2f} s (baseline `cdcca --help`: {base:.2f} s)")
    assert took - base < EXTRA_S, f"took {took:.2f} s, startup {base:.2f} s"


def test_not_a_terminal_one_line_per_stage(capsys):
    """Bug 7: with stdout not a TTY, each stage prints one line when it ends (with its time)."""
    from cdcca_cli import sync_cmd
    from device.contracts.round_metrics import STAGES

    ticks = iter([0.0, 0.0, 1.5, 1.5, 4.0, 4.0, 9.0, 9.0, 14.0])
    lines = sync_cmd._StageLines(STAGES, clock=lambda: next(ticks))
    lines("check", 0.0, "checking")
    lines("check", 1.0, "3 samples to upload")
    lines("measure", 0.0, "measuring")
    lines("upload", 1.0, "3 new samples")
    lines("distil", 0.5, "step 5/10")
    lines.close()
    raw = capsys.readouterr().out.splitlines()
    assert [ln[:10].strip() for ln in raw] == list(STAGES)
    out = [ln[10:].split() for ln in raw]
    assert out[0][:3] == ["done", "in", "1.5"] and out[0][-4:] == ["3", "samples", "to", "upload"]
    assert out[1][:3] == ["done", "in", "2.5"] and out[3][:3] == ["done", "in", "5.0"]
    assert all(ln == ["skipped"] for ln in out[4:])
