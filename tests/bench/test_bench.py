"""`cdcca bench` on the tiny profile, on the shipped default (assets/default, the HF Idefics3 build):
1 reported seed, 50-chat drift and all-target streams on the device, 4 AKD steps on the family seam,
12 held-out VQA per domain measured by llama.cpp, 2 devices x 6 samples in the fleet, 1 continual
round.  Checked: every section, table row and plot is there; Markdown and results.json hold the
same numbers; what the bench measures about correctness (exactly-once uploads, UTS bytes < raw,
patch < budget < full model, the torch twin of the device GGUF decodes what llama.cpp decodes);
the win sentences agree with their paired intervals.  Accuracy gains are NOT asserted: the tiny
budget cannot produce them (tests/e2e does, on the full held-out set)."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from bench.common import DEFAULT_BUDGET
from bench.profiles import PROFILES
from bench.seam import METHODS, seeds_of
from bench.seam_jobs import PAIRS, drifted_pair, equal_bytes_index, stream_samples
from cloud.zoo.hf_assets import is_build_folder
from bench.table import Table, mean_std, na, num
from device.contracts.config import DEFAULT_MODEL_DIR

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("## 1. Accuracy after one round on the family seam", "## 2. Transmission", "## 3. Device performance",
            "## 4. Fleet", "## 5. Continual rounds", "## Where CDCCA", "## Timing")
PLOTS = ("accuracy_per_domain.png", "dwc_budget_sweep.png", "mask_sweep.png", "continual_rounds.png",
         "fleet_latency.png")


def _cdcca(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, CDCCA_HOME=str(home), TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "cdcca_cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    r = _cdcca("bench", "--profile", "tiny", "--out", str(out), home=tmp_path_factory.mktemp("home"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return out, (out / "report.md").read_text(), json.loads((out / "results.json").read_text())


def _md_tables(text: str) -> dict[str, tuple[list[str], list[list[str]]]]:
    """{bold title: (header, rows)} for every table in the report that follows a **title** line."""
    out, lines = {}, text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and i >= 2 and lines[i - 1] == "" and lines[i - 2].startswith("**"):
            title = lines[i - 2].strip("*")
            header = [c.strip() for c in line.strip("|").split("|")]
            rows, j = [], i + 2
            while j < len(lines) and lines[j].startswith("|"):
                rows.append([c.strip() for c in lines[j].strip().strip("|").split("|")])
                j += 1
            out[title] = (header, rows)
    return out


_NUM = re.compile(r"^[+-]?[\d,]*\.?\d+%?( ± [+-]?[\d,]*\.?\d+%?)?$")


def test_every_section_plot_and_header_fact_is_there(tiny):
    out, md, js = tiny
    for s in SECTIONS:
        assert s in md, s
    for p in PLOTS:
        assert (out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", p
        assert f"]({p})" in md, p
    for fact in ("**Machine:**", "cores", "**Versions:**", "torch", "llama-cpp-python", "gguf", "**Seeds:**",
                 "wall time", str(DEFAULT_MODEL_DIR)):
        assert fact in md, fact
    assert set(js["sections"]) == {"accuracy", "transmission", "device", "fleet", "continual"}
    assert js["meta"]["wall_s"] > 0 and js["meta"]["machine"]["cores"] >= 1
    assert "**Seeds:** reported seeds 1 " in md and "development seed" in md


def test_markdown_tables_equal_json_tables_and_hold_numbers(tiny):
    _, md, js = tiny
    md_tables = _md_tables(md)
    js_tables = [t for s in js["sections"].values() for t in s["tables"]]
    assert len(js_tables) >= 11
    for t in js_tables:
        assert t["title"] in md_tables, t["title"]
        header, rows = md_tables[t["title"]]
        assert header == t["columns"]
        assert [r[0] for r in rows] == [r["label"] for r in t["rows"]], t["title"]
        assert rows, t["title"]
        for mrow, jrow in zip(rows, t["rows"]):
            assert len(mrow) == len(header)
            for col, text in zip(header[1:], mrow[1:]):
                cell = jrow["cells"][col]
                where = f"{t['title']} / {jrow['label']} / {col}: {text!r}"
                assert not re.search(r"\bnan\b|\binf\b|None|TODO|\?\?", text, re.I), where
                if "na" in cell:
                    assert cell["na"] and text == f"n/a ({cell['na']})", where
                else:
                    assert math.isfinite(cell["value"]) and _NUM.match(text), where


def test_accuracy_tables_are_device_measured_and_wins_follow_the_intervals(tiny):
    _, md, js = tiny
    sec = js["sections"]["accuracy"]
    tables = {t["key"]: t for t in sec["tables"]}
    drift, allt, wins = tables["seam_drift"], tables["seam_all_target"], tables["seam_wins"]
    assert [r["label"] for r in drift["rows"]] == [lab for _, lab, k in METHODS if "drift" in k]
    assert [r["label"] for r in allt["rows"]] == [lab for _, lab, k in METHODS if "all-target" in k]
    for t in (drift, allt):
        for row in t["rows"]:
            c = row["cells"]
            for col, cell in c.items():
                if "VQA" in col or "CI" in col:
                    assert 0.0 <= cell["value"] <= 1.0, (row["label"], col)
            assert c["drifted 95% CI low"]["value"] <= c["drifted mean VQA"]["value"] <= c["drifted 95% CI high"]["value"]
        assert any("llama.cpp" in n for n in t["notes"]) and any("fewer than the design's 300" in n for n in t["notes"])
    assert sec["data"]["eval_per_domain"] == {d: PROFILES["tiny"].eval_n for d in sec["data"]["eval_per_domain"]}
    for row in wins["rows"]:
        d, lo, hi = (row["cells"][k]["value"] for k in ("difference", "95% CI low", "95% CI high"))
        assert lo <= d <= hi and all(math.isfinite(x) for x in (d, lo, hi))
        said = [f for f in sec["findings"] if f.startswith(row["label"] + ":")]
        if said:  # the sentence calls it a win exactly when the interval excludes 0
            assert ("a win" in said[0] and "NOT a win" not in said[0]) == (lo > 0), said[0]
    assert any("% of the device GGUF pair" in f for f in sec["findings"])
    cdcca = next(r for r in drift["rows"] if r["label"].startswith("**CDCCA**"))
    assert 0 < cdcca["cells"]["downlink KiB"]["value"] <= DEFAULT_BUDGET / 1024
    sweep = tables["seam_dwc_budget"]
    assert [r["label"] for r in sweep["rows"]] == ["budget 8 KiB", "budget 48 KiB (CDCCA)", "every changed row (no budget)"]
    kib = [r["cells"]["patch KiB"]["value"] for r in sweep["rows"]]
    assert kib[0] <= 8 and kib[1] <= DEFAULT_BUDGET / 1024 and kib == sorted(kib)  # each patch within its budget
    assert sweep["rows"][-1]["cells"]["minus every row"]["value"] == 0.0
    mask = tables["seam_mask_sweep"]["rows"]
    assert [r["label"] for r in mask] == ["0.00 (product default)", "0.50"]
    swept = sec["data"]["mask_sweep"]["0.50"]
    said = any("UTS masked NO image" in n for n in tables["seam_mask_sweep"]["notes"])
    assert said == (swept["masked_images"] == 0)  # the report says when the mask never reached an image
    if swept["masked_images"]:
        assert mask[1]["cells"]["uplink KiB"]["value"] < mask[0]["cells"]["uplink KiB"]["value"]
    assert mask[0]["cells"]["drifted minus product ratio"]["value"] == 0.0
    cont = {t["key"]: t for t in js["sections"]["continual"]["tables"]}["seam_continual"]
    assert [r["label"] for r in cont["rows"]] == ["start (device as shipped)", "after round 1 (noise)"]


def test_transmission_device_and_fleet_measure_what_they_claim(tiny):
    _, _, js = tiny
    tx = js["sections"]["transmission"]["data"]
    raw, _, uts = tx["uplink"]
    full, delta, patch = tx["downlink"]
    assert uts[1] < raw[1]  # UTS payload bytes < every chat's raw payload
    assert 0 < patch[1] <= DEFAULT_BUDGET < full[1] and patch[1] < delta[1]
    assert full[1] == sum(p.stat().st_size for p in (DEFAULT_MODEL_DIR / "student-q4_0.gguf",
                                                      DEFAULT_MODEL_DIR / "mmproj-f32.gguf"))
    dev = js["sections"]["device"]
    decode = {t["key"]: t for t in dev["tables"]}["decode"]
    assert len(decode["rows"]) == 4 and "family seam" in decode["rows"][3]["label"]
    assert dev["data"]["speed"]["torch"]["family"] == "idefics3"
    assert dev["data"]["f32_torch_agree"] == 1.0  # the twin rebuilt from the f32 GGUF answers as llama.cpp does
    assert dev["data"]["apply"]["patch_bytes"] == patch[1]  # the device installs the very patch that was sent
    fleet = js["sections"]["fleet"]["data"]
    for run in ("steady", "restart"):
        assert fleet[run]["exactly_once"] and fleet[run]["stored_rows"] == fleet[run]["expected"]


def test_a_folder_that_is_not_an_hf_build_is_refused_in_one_line(tmp_path):
    from bench.run import run_bench

    assert is_build_folder(DEFAULT_MODEL_DIR) and not is_build_folder(tmp_path)
    with pytest.raises(ValueError, match="not an HF build folder"):
        run_bench("tiny", tmp_path / "out", model_dir=tmp_path)
    r = _cdcca("bench", "--profile", "tiny", "--out", str(tmp_path / "out"), "--model-dir", str(tmp_path),
               home=tmp_path / "home")
    err = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(err) == 1 and "not an HF build folder" in err[0], r.stderr
    assert not (tmp_path / "out").exists()


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


def test_table_helpers():
    t = Table("k", "T", ["row", "a", "b"])
    t.add("x", [mean_std([0.5, 0.7]), na("no uplink")])
    t.add("y", [num(3, "{:.0f}"), mean_std([0.25])])
    md = t.markdown()
    assert "| x | 0.600 ± 0.141 | n/a (no uplink) |" in md and "| y | 3 | 0.250 |" in md
    assert t.to_json()["rows"][0]["cells"] == {"a": {"value": 0.6, "std": pytest.approx(0.1414, abs=1e-4)},
                                              "b": {"na": "no uplink"}}
    with pytest.raises(ValueError):
        t.add("z", [num(1)])
    with pytest.raises(TypeError):  # a bare string would only fail when the report renders
        t.add("z", [num(1), "-"])


def _real_result() -> dict:
    """What bench.device_real.run_real returns (its keys; the values are illustrative, not claims)."""
    hook = {"n_vocab": 49152, "prompt_kind": "template", "tps_without": 55.0, "tps_with": 53.5, "ratio": 0.973,
            "cpu_tps_without": 55.5, "cpu_tps_with": 53.8, "cpu_ratio": 0.97, "tokens": 544, "us_per_token": 490.0,
            "cpu_us_per_token": 550.0, "sample_answer": "x"}
    vs = {"llama_tps": 14.8, "transformers_tps": 6.1, "speedup": 2.4, "llama_cpu_tps": 49.8,
          "transformers_cpu_tps": 15.9, "cpu_speedup": 3.1, "tokens": {"llama": 164, "transformers": 192}}
    apply = {"apply": 0.05, "refresh": 0.0005, "reload": 0.5, "identify": 0.18, "copy": 0.27, "reload_full": 1.3,
             "wchar": 165486, "patch_bytes": 55104, "payload_bytes": 54144, "journal_bytes": 108795,
             "model_bytes": 253113024, "full_s": 1.6, "ratio_hot": 0.033, "ratio_reload": 0.35,
             "ratio_hot_with_identify": 0.147, "model": "m.gguf"}
    return {"models": {"m": "m.gguf"}, "hook": {"m": hook}, "hook_exact": {"m": hook},
            "vs_transformers": {"m": vs}, "apply": apply}


def test_real_rows_render(monkeypatch, tmp_path):
    """The opt-in real-GGUF rows (registry packages, not installed in CI) render into the report:
    every cell is a Cell, and each goal's verdict follows its number."""
    from types import SimpleNamespace

    from bench import device_perf, device_real
    from bench.common import Section

    monkeypatch.setenv("CDCCA_BENCH_REAL", "1")
    monkeypatch.setattr(device_real, "run_real", lambda work: _real_result())
    sec = Section("device", "Device")
    device_perf.real_rows(sec, SimpleNamespace(profile=SimpleNamespace(name="quick"), work=tmp_path))
    md = "\n".join(t.markdown() for t in sec.tables)
    assert [t.key for t in sec.tables] == ["real_uncertainty", "real_engines", "real_apply"]
    assert "| m (template, float32 (default)) | 49,152 |" in md and "n/a (once)" in md
    assert any("MISSES the >= 5x goal" in f for f in sec.not_beaten)
    assert any("meets the >= 90% goal" in f for f in sec.findings)
