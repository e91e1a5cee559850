"""`cdcca bench --model-dir <HF build>` on the family seam, tiny profile, on the HF default builder's
tiny preset built here (as tests/e2e does; no shipped weights needed): the report has the drift and
all-target tables with every row device-measured, Wilson bounds around each drifted mean, and the
win sentences agree with the paired intervals in the table.  Accuracy gains are NOT asserted: the
tiny preset's models and 4 AKD steps cannot produce them."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from bench.profiles import PROFILES
from bench.seam import METHODS, seeds_of
from bench.seam_jobs import PAIRS, drifted_pair, equal_bytes_index, is_hf_build, stream_samples

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hf_default(tmp_path_factory):
    from cloud.zoo.hf_build import build

    return build("tiny", tmp_path_factory.mktemp("hf-default") / "default-hf", progress=False)


@pytest.fixture(scope="module")
def tiny(hf_default, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-seam")
    env = dict(os.environ, CDCCA_HOME=str(tmp_path_factory.mktemp("home")), TOKENIZERS_PARALLELISM="false")
    r = subprocess.run([sys.executable, "-m", "cdcca_cli", "bench", "--profile", "tiny", "--out", str(out),
                        "--model-dir", str(hf_default)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return (out / "report.md").read_text(), json.loads((out / "results.json").read_text())


def test_streams_seeds_and_equal_bytes():
    assert seeds_of(PROFILES["quick"]) == [1, 2, 3] and seeds_of(PROFILES["full"]) == [1, 2, 3, 4, 5]
    assert 0 not in seeds_of(PROFILES["tiny"].with_seeds(4))  # the development seed is never reported
    assert [drifted_pair(s) for s in range(1, 7)] == list(PAIRS) and len(set(PAIRS)) == 6
    drift = Counter(s.domain for s in stream_samples("drift", 1, 100))
    assert drift == {"source": 70, drifted_pair(1)[0]: 15, drifted_pair(1)[1]: 15}
    assert set(Counter(s.domain for s in stream_samples("all-target", 2, 40))) == set(drifted_pair(2))
    a, b = stream_samples("drift", 3, 20), stream_samples("drift", 3, 20)
    assert [s.question for s in a] == [s.question for s in b]  # seeded
    sizes = [100, 300, 50, 700, 20, 400]
    idx = equal_bytes_index(sizes, 600, seed=1)
    assert idx == equal_bytes_index(sizes, 600, seed=1) and sum(sizes[i] for i in idx) <= 600 and idx


def test_hf_build_is_detected(hf_default, tmp_path):
    assert is_hf_build(hf_default) and not is_hf_build(tmp_path)


def test_tiny_seam_report(tiny):
    md, js = tiny
    assert "## 1. Accuracy after one round on the family seam (device-measured)" in md
    assert set(js["sections"]) == {"accuracy", "continual"}
    cont = {t["key"]: t for t in js["sections"]["continual"]["tables"]}["seam_continual"]
    assert [r["label"] for r in cont["rows"]] == ["start (device as shipped)", "after round 1 (noise)"]
    sec = js["sections"]["accuracy"]
    tables = {t["key"]: t for t in sec["tables"]}
    drift, allt, wins = tables["seam_drift"], tables["seam_all_target"], tables["seam_wins"]
    assert [r["label"] for r in drift["rows"]] == [lab for _, lab, k in METHODS if "drift" in k]
    assert [r["label"] for r in allt["rows"]] == [lab for _, lab, k in METHODS if "all-target" in k]
    for t in (drift, allt):
        assert t["title"] in md
        for row in t["rows"]:
            c = row["cells"]
            for col, cell in c.items():
                if "VQA" in col or "CI" in col:
                    assert 0.0 <= cell["value"] <= 1.0, (row["label"], col)
            assert c["drifted 95% CI low"]["value"] <= c["drifted mean VQA"]["value"] <= c["drifted 95% CI high"]["value"]
        assert any("llama.cpp" in n for n in t["notes"]) and any("fewer than the design's 300" in n for n in t["notes"])
    for row in wins["rows"]:
        d, lo, hi = (row["cells"][k]["value"] for k in ("difference", "95% CI low", "95% CI high"))
        assert lo <= d <= hi and all(math.isfinite(x) for x in (d, lo, hi))
        said = [f for f in sec["findings"] if f.startswith(row["label"] + ":")]
        if said:  # the sentence calls it a win exactly when the interval excludes 0
            assert ("a win" in said[0] and "NOT a win" not in said[0]) == (lo > 0), said[0]
    assert any("% of the device GGUF pair" in f for f in sec["findings"])
    assert "**Seeds:** reported seeds 1 " in md and "development seed" in md
