"""The cloud scores its own models exactly as device.evaluate scores the device."""
from __future__ import annotations

from pathlib import Path

from cloud.twin_eval import evaluate, score
from device.contracts.dataset import QA


def _qa(ans, domain, task="colour"):
    return QA("x", Path("i.png"), "q?", ans, {"domain": domain, "task": task})


def test_score_matches_device_shape_and_metrics():
    qas = [_qa("red", "noise"), _qa("two", "noise"), _qa("a red circle", "source", "caption")]
    res = score(["Red", "three", "a red square"], qas)
    assert res["domains"]["noise"] == {"vqa": 0.5, "caption_f1": res["domains"]["noise"]["caption_f1"], "n": 2}
    assert res["vqa"] == 0.5 and 0 < res["domains"]["source"]["caption_f1"] < 1
    assert evaluate(lambda im, q: "red", [None] * 2, qas[:2])["vqa"] == 0.5
