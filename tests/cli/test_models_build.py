"""`cdcca models build --preset tiny` through the real entry point (what CI keeps building): the HF
Idefics3 pair is trained, converted by llama.cpp's official converter and reported; `models info`
reads the manifest back; a wrong preset is one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CDCCA = [sys.executable, "-m", "cdcca_cli"]


@pytest.mark.timeout(600)
def test_build_tiny_then_info(tmp_path):
    env = os.environ | {"CDCCA_ZOO_CACHE": str(tmp_path / "cache"), "COLUMNS": "160"}
    out = tmp_path / "tiny"
    r = subprocess.run(CDCCA + ["models", "build", "--preset", "tiny", "--out", str(out)], capture_output=True,
                       text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["preset"] == "tiny" and m["family"] == "idefics3"
    assert all((out / f).is_file() for f in ("student-q4_0.gguf", "mmproj-f32.gguf", "teacher/config.json",
                                             "data/eval.json", "data/replay.json"))
    assert m["config_hash"] in r.stdout and "teacher VQA" in r.stdout
    info = subprocess.run(CDCCA + ["models", "info", str(out)], capture_output=True, text=True, timeout=120, env=env)
    assert info.returncode == 0 and m["config_hash"] in info.stdout and "source" in info.stdout


def test_unknown_preset_is_one_line(tmp_path):
    r = subprocess.run(CDCCA + ["models", "build", "--preset", "huge", "--out", str(tmp_path / "x")],
                       capture_output=True, text=True, timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1 and len(lines) == 1 and "huge" in lines[0] and "tiny" in lines[0], r.stderr
    assert not (tmp_path / "x").exists()
