"""device/contracts/round_metrics.py: stage rows, the round's typed metrics, accuracy drops."""
from __future__ import annotations

import math

from device.contracts.round_metrics import (STAGES, Accuracy, RoundMetrics, accuracy_drop, as_accuracy,
                                            face_progress, face_stage)


def test_every_cloud_stage_has_a_row_and_the_row_fraction_agrees_with_the_message():
    assert face_stage("evaluate") == "cloud eval" != face_stage("compress")  # was "compress 88 %" while evaluating
    assert face_stage("something new") == "distil" and all(face_stage(s) in STAGES for s in ("load", "label"))
    assert face_progress("evaluate", 0.88) == ("cloud eval", 0.0)
    row, frac = face_progress("distil", 0.40)
    assert row == "distil" and math.isclose(frac, 0.40 / 0.75)
    assert face_progress("done", 1.0) == ("cloud eval", 1.0)
    assert face_progress("compress", 2.0) == ("compress", 1.0)


def test_round_metrics_parse_what_the_round_job_sends():
    m = RoundMetrics.model_validate({"samples": 12, "new_model": "ab" * 8, "seconds": 3.5, "future_field": 1,
                                     "dwc": {"patch_bytes": 44_896, "tensors_patched": 7, "rows_patched": 90,
                                             "full_fp16_delta_bytes": 2_000_000, "full_gguf_bytes": 700_000},
                                     "accuracy": {"before": {"vqa": 0.5, "domains": {"noise": {"vqa": 0.4}}}}})
    assert m.dwc.patch_file_bytes == 44_896  # the older name is read as the one patch figure
    assert m.samples == 12 and m.accuracy.before.vqa_by_domain() == {"noise": 0.4}
    assert RoundMetrics.model_validate({}).dwc.patch_file_bytes == 0


def test_accuracy_drop_and_nan():
    a = as_accuracy({"vqa": float("nan"), "domains": {"a": {"vqa": float("nan")}, "b": {"vqa": 0.5}}})
    assert a.overall is None and a.vqa_by_domain() == {"b": 0.5} and as_accuracy(None) is None
    hi, lo = Accuracy(vqa=0.6), Accuracy(vqa=0.5)
    assert math.isclose(accuracy_drop(hi, lo), 0.1) and accuracy_drop(lo, hi) is None
    assert accuracy_drop(hi, lo, tolerance=0.2) is None and accuracy_drop(a, lo) is None
