"""bench.round_size on the tiny profile: two round sizes through the real chat -> UTS -> AKD -> DWC
-> device-evaluation path.  Structure only (4 AKD steps teach nothing measurable)."""
from __future__ import annotations

from bench.common import DEFAULT_BUDGET
from bench.round_size import main


def test_each_round_size_gets_an_every_row_and_a_budget_patch_measured_on_the_device(capsys):
    rows = main(["--profile", "tiny", "--seed", "0", "20", "40"])
    assert [(r["chats"], r["patch"]) for r in rows] == [(20, "every row"), (20, "DWC budget"),
                                                        (40, "every row"), (40, "DWC budget")]
    for r in rows:
        assert 0.0 <= r["drifted"] <= 1.0 and 0.0 <= r["source"] <= 1.0
        assert r["bytes"] > 0 and (r["patch"] == "every row" or r["bytes"] <= DEFAULT_BUDGET)
    assert "| chats | UTS kept |" in capsys.readouterr().out
