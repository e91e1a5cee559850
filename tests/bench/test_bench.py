"""`cdcca bench` on the tiny profile (1 seed, a few chats, 4 AKD steps, 2 devices x 6 samples,
1 continual round): every section present, every table row filled with numbers (or a documented
n/a), and results.json holding exactly the rows the Markdown shows.  Accuracy gains are NOT
asserted: the tiny budget cannot produce them."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import compare
from bench.table import Table, mean_std, na, num

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("## 1. Accuracy", "## 2. Ablations", "## 3. Transmission", "## 4. Device performance",
            "## 5. Fleet", "## 6. Continual rounds", "## Where CDCCA", "## Timing")
PLOTS = ("accuracy_per_domain.png", "dwc_budget_sweep.png", "mask_sweep.png", "continual_rounds.png",
         "fleet_latency.png")
METHOD_ROWS = 7


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, CDCCA_HOME=str(tmp_path_factory.mktemp("home")), TOKENIZERS_PARALLELISM="false")
    r = subprocess.run([sys.executable, "-m", "cdcca_cli", "bench", "--profile", "tiny", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
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
                 "wall time"):
        assert fact in md, fact
    assert set(js["sections"]) == {"accuracy", "ablations", "transmission", "device", "fleet", "continual"}
    assert js["meta"]["wall_s"] > 0 and js["meta"]["machine"]["cores"] >= 1


def test_markdown_tables_equal_json_tables_and_hold_numbers(tiny):
    _, md, js = tiny
    md_tables = _md_tables(md)
    js_tables = [t for s in js["sections"].values() for t in s["tables"]]
    assert len(js_tables) >= 9
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


def test_table_rows_are_complete(tiny):
    _, _, js = tiny
    tables = {t["key"]: t for s in js["sections"].values() for t in s["tables"]}
    acc = tables["accuracy"]
    assert len(acc["rows"]) == METHOD_ROWS
    for row in acc["rows"]:  # every accuracy cell is a number; only uplink/downlink may be n/a (no adaptation)
        for col, cell in row["cells"].items():
            if "VQA" in col or "F1" in col:
                assert "value" in cell, (row["label"], col)
    assert [r["label"] for r in tables["mask_sweep"]["rows"]][0].startswith("0.00")
    assert len(tables["mask_sweep"]["rows"]) == 4
    assert len(tables["akd_terms"]["rows"]) == 4
    labels = [r["label"] for r in tables["dwc_budget"]["rows"]]
    assert sum(lab.startswith("DWC ") for lab in labels) == 6
    assert any(lab.startswith("LoRA adapter") for lab in labels)
    assert len(tables["transmission"]["rows"]) == 6
    assert len(tables["decode"]["rows"]) == 4
    assert len(tables["continual"]["rows"]) == 3  # start, 1 round, teacher


def test_correctness_properties_measured_by_the_bench(tiny):
    _, _, js = tiny
    fleet = js["sections"]["fleet"]["data"]
    for run in ("steady", "restart"):
        assert fleet[run]["exactly_once"] and fleet[run]["stored_rows"] == fleet[run]["expected"]
    lora = js["sections"]["ablations"]["tables"][2]["notes"][-1]
    assert "llama.cpp loads it" in lora
    tx = js["sections"]["transmission"]["data"]
    assert tx["uplink"][2][1] < tx["uplink"][0][1]  # UTS payload bytes < raw bytes
    assert tx["downlink"][2][1] < tx["downlink"][0][1]  # DWC patch < full GGUF


def test_table_and_sentences_helpers():
    t = Table("k", "T", ["row", "a", "b"])
    t.add("x", [mean_std([0.5, 0.7]), na("no uplink")])
    t.add("y", [num(3, "{:.0f}"), mean_std([0.25])])
    md = t.markdown()
    assert "| x | 0.600 ± 0.141 | n/a (no uplink) |" in md and "| y | 3 | 0.250 |" in md
    assert t.to_json()["rows"][0]["cells"] == {"a": {"value": 0.6, "std": pytest.approx(0.1414, abs=1e-4)},
                                              "b": {"na": "no uplink"}}
    with pytest.raises(ValueError):
        t.add("z", [num(1)])
    s, win = compare([0.6, 0.62], [0.7, 0.7], "m", "CDCCA", "B")
    assert not win and "does NOT beat" in s
    s, win = compare([0.8], [0.7], "m", "CDCCA", "B")
    assert win and "one seed" in s
    s, win = compare([0.700], [0.702], "m", "CDCCA", "B")
    assert not win and "tie" in s
