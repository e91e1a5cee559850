"""`cdcca versions` / `cdcca rollback` through the real entry point: the history, and one-line
refusals that change nothing (the round trip through real patches is in tests/tui and tests/e2e)."""
from __future__ import annotations

import subprocess
import sys

CDCCA = [sys.executable, "-m", "cdcca_cli"]


def run(*args):
    return subprocess.run(CDCCA + list(args), capture_output=True, text=True, timeout=120)


def one_error_line(r) -> str:
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    return lines[0]


def test_history_and_refusals_at_the_base():
    r = run("versions")
    assert r.returncode == 0 and "* v0" in r.stdout and "patch=      base" in r.stdout, r.stdout
    assert "no version 'v9'" in one_error_line(run("versions", "--switch", "v9"))
    assert "already the current version" in one_error_line(run("versions", "--switch", "v0"))
    assert "nothing to roll back to" in one_error_line(run("rollback"))
    assert "* v0" in run("versions").stdout  # nothing changed
