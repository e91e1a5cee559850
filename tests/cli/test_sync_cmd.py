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
# "Fails at once" is checked by what the failing run did not do, not by a wall-clock bound (timing
# targets live in benchmarks; a loaded CI machine makes wall time flaky): it never imported the
# on-device measurement path (llama.cpp, the runtime, the round driver). The time it took is
# printed beside `cdcca --help` from the same run (1.1 s measured on a quiet machine; the old path
# spent 15-20 s measuring before it failed).
MEASUREMENT_PATH = ("llama_cpp", "device.runtime", "device.sync", "device.evaluate")


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


def imported_by(url: str, token: str) -> set[str]:
    """The modules a failing `cdcca sync` imports (``-X importtime`` lists each on stderr)."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "cdcca_cli", "sync", "--cloud", url,
                        "--token", token], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr[-2000:]
    return {ln.rsplit("|", 1)[-1].strip() for ln in r.stderr.splitlines() if ln.startswith("import time:")}


def assert_no_measurement(url: str, token: str) -> None:
    mods = imported_by(url, token)
    assert "device.preflight" in mods  # the check itself ran
    assert not [m for m in mods if m.split(".")[0] == "llama_cpp" or m in MEASUREMENT_PATH], sorted(mods)


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
    assert_no_measurement(cloud.url, "0" * 40)


def test_nothing_new_to_learn_from_fails_at_once_and_says_so(cloud):
    token = cloud.add_device("laptop")
    r, took = sync(cloud.url, token)
    line = one_error_line(r)
    assert "nothing new to learn from" in line and "upload some first" not in line
    base = startup_s()
    print(f"nothing new: {took:.2f} s (baseline `cdcca --help`: {base:.2f} s)")
    assert_no_measurement(cloud.url, token)


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
