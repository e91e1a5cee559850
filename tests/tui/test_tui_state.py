"""TuiState and the pure drawing helpers, without a UI."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
from rich.console import Console

from device.queue import QueueStats
from device.session import Turn
from device.sync import SyncReport
from device.uncertainty import TokenUncertainty
from device.uplink import CloudUnavailable, UploadResult
from device.uts import UTSDecision
from device.versions import Version
from tui.state import TuiState, human_bytes, percent, round_row
from tui.widgets.image_view import UPPER_HALF, HalfBlocks, fit_pixels
from tui_fakes import accuracy

REPO = Path(__file__).resolve().parents[2]


def make_turn(pieces, ents, kept=True, tokens_extra=1) -> Turn:
    toks = [TokenUncertainty(h, 0.5, 0.1, i) for i, h in enumerate(list(ents) + [9.9] * tokens_extra)]
    d = UTSDecision(kept, "why", None, 0.5, 0.5, 0.1, 10_000, 1_234 if kept else 0)
    return Turn("q?", "".join(pieces), list(pieces), toks, d, kept, None)


def test_a_turn_streams_then_takes_the_session_result():
    s = TuiState()
    s.start_turn("what colour?", "/x/a.png")
    assert s.chat_busy
    s.add_token(" red", 0.3)
    assert s.turns[-1].answer == " red" and not s.turns[-1].done
    t = s.finish_turn(make_turn([" red", " circle"], [0.3, 1.1]))
    # the stop token's entropy (beyond the pieces) is not shown
    assert t.entropies == [0.3, 1.1] and t.answer == " red circle"
    assert t.done and t.kept and t.shipped_bytes == 1_234 and t.raw_bytes == 10_000
    assert math.isclose(t.mean_entropy, 0.7) and not s.chat_busy


def test_a_failed_turn_keeps_one_line_and_frees_the_chat():
    s = TuiState()
    s.start_turn("q", "missing.png")
    t = s.fail_turn(ValueError("missing.png: no such file\nsecond line"))
    assert t.error == "missing.png: no such file" and t.done and not s.chat_busy
    assert s.recent_entropies() == []


def test_uplink_numbers_and_a_cloud_that_is_down():
    s = TuiState()
    s.set_queue(QueueStats(3, 0, 5, 4_500, 12_000, 400_000))
    assert (s.uplink.pending, s.uplink.pending_bytes) == (3, 4_500)
    assert math.isclose(s.uplink.ratio, 0.03)
    s.upload_done(UploadResult(accepted=["a", "b"], duplicates=["c"]))
    assert s.uplink.last_upload == "2 sent, 1 already there" and s.uplink.last_ok
    s.upload_failed(CloudUnavailable("cloud at http://x is unreachable after 3 tries: ConnectError"))
    assert s.uplink.last_upload == "failed: cloud unreachable" and s.uplink.last_ok is False
    s.cloud_down(CloudUnavailable("cloud at http://x is unreachable"))
    assert s.cloud.online is False
    s.cloud_up("0.1.0")
    assert s.cloud.online and "0.1.0" in s.cloud.message


def test_stages_advance_and_unknown_cloud_stages_count_as_distillation():
    s = TuiState()
    s.round_started()
    assert s.round.running and all(x.status == "pending" for x in s.round.stages)
    s.on_stage("upload", 0.0, "uploading")
    s.on_stage("upload", 1.0, "3 new samples")
    assert s.round.stage("upload").status == "done"
    s.on_stage("loading samples", 0.0, "")  # the cloud's own stage names pass through run_sync
    assert s.round.stage("distil").status == "running" and s.round.message == "loading samples"
    s.on_stage("distil", 0.4, "step 20/50")
    s.on_stage("download", 0.0, "downloading the patch")  # skipped stages are marked done
    assert [x.status for x in s.round.stages] == ["done"] * 6 + ["running", "pending", "pending"]
    assert s.cancel_requested() and s.round.cancelling
    s.round_cancelled()
    assert s.round.stage("download").status == "cancelled" and not s.round.running
    assert s.round.outcome == "cancelled" and not s.cancel_requested()


def test_a_failed_round_shows_the_error():
    s = TuiState()
    s.round_started()
    s.on_stage("distil", 0.2, "")
    s.round_failed(RuntimeError("round r1 failed: no uplinked sample carries an image"))
    assert s.round.outcome == "failed" and s.round.stage("distil").status == "failed"
    assert s.round.error.startswith("round r1 failed")


def report(i: int) -> SyncReport:
    return SyncReport(round_id=f"round-{i}", uploaded=4, uplink_bytes=6_000, uplink_raw_bytes=160_000,
                      downlink_bytes=50_000, full_gguf_bytes=1_000_000, full_fp16_delta_bytes=500_000,
                      tensors_patched=9, version_before=f"v{i - 1}", version_after=f"v{i}",
                      apply_seconds=0.01, accuracy_before=accuracy(0.1 * i), accuracy_after=accuracy(0.1 * i + 0.1))


def test_rounds_become_rows_and_accuracy_series():
    s = TuiState()
    for i in (1, 2):
        s.round_started()
        row = s.round_done(report(i))
    assert all(x.status == "done" for x in s.round.stages) and s.round.outcome == "done"
    assert math.isclose(row.downlink_ratio, 0.05) and math.isclose(row.uplink_ratio, 6_000 / 160_000)
    assert row.version_after == "v2" and row.tensors_patched == 9
    series = s.accuracy_series()
    assert set(series) == {"source", "texture", "noise", "combo", "rotate"}
    xs, ys = series["noise"]
    assert xs == [0, 1, 2] and np.allclose(ys, [0.1, 0.2, 0.3])


def test_nan_accuracies_and_missing_evaluations_are_skipped():
    acc = {"vqa": float("nan"), "domains": {"a": {"vqa": float("nan")}, "b": {"vqa": 0.5}}}
    r = SyncReport(round_id="r", accuracy_before=acc, accuracy_after=None)
    row = round_row(r)
    assert row.vqa_before is None and row.domains_before == {"b": 0.5} and row.vqa_after is None


def test_versions_and_whether_rollback_is_possible():
    s = TuiState(model_name="default-q4_0", model_ready=True)
    v0 = Version("v0", None, "", "2024-01-01T00:00:00", {})
    v1 = Version("v1", "v0", "r1", "2024-01-02T00:00:00", {}, patch_bytes=5)
    s.set_versions([v0], "v0")
    assert not s.can_rollback and s.model_label == "default-q4_0 v0"
    s.set_versions([v0, v1], "v1")
    assert s.can_rollback and [v.current for v in s.versions] == [False, True]
    assert s.model_label == "default-q4_0 v1"


def test_entropy_histogram_bins_recent_tokens():
    s = TuiState()
    for ents in ([0.1, 0.6, 5.0], [2.9]):
        s.start_turn("q", None)
        s.finish_turn(make_turn(["x"] * len(ents), ents))
    labels, counts = s.entropy_histogram(bins=6, hi=3.0)
    assert labels == ["0.0", "0.5", "1.0", "1.5", "2.0", "2.5+"]
    assert counts == [1, 1, 0, 0, 0, 2]  # 5.0 nats lands in the last bin


def test_formatting():
    assert human_bytes(512) == "512 B" and human_bytes(61_440) == "61.4 kB" and human_bytes(None) == "-"
    assert human_bytes(4_200_000) == "4.2 MB"
    assert percent(0.0371) == "3.71%" and percent(float("nan")) == "-" and percent(None) == "-"


def test_half_blocks_show_two_pixels_per_cell():
    rgb = np.zeros((4, 2, 3), np.uint8)
    rgb[0] = (255, 0, 0)  # top row red, second row green, rest black
    rgb[1] = (0, 255, 0)
    console = Console(width=10, color_system="truecolor", record=True, file=open("/dev/null", "w"))
    segs = [s for s in console.render(HalfBlocks(rgb)) if s.text == UPPER_HALF]
    assert len(segs) == 4  # 2 columns x 2 cell rows
    assert segs[0].style.color.triplet == (255, 0, 0) and segs[0].style.bgcolor.triplet == (0, 255, 0)
    assert segs[2].style.color.triplet == (0, 0, 0)


def test_images_fit_the_cells_they_get():
    rgb = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    assert fit_pixels(rgb, 16, 8).shape == (16, 16, 3)  # 16 cols x 8 rows = 16 x 16 pixels
    assert fit_pixels(rgb, 80, 40).shape == (64, 64, 3)  # small images grow by whole factors only
    assert fit_pixels(rgb, 10, 20).shape == (10, 10, 3)
    assert fit_pixels(np.zeros((10, 40, 3), np.uint8), 20, 20).shape == (5, 20, 3)  # aspect kept


def test_the_tui_never_imports_torch_transformers_or_the_cloud():
    code = ("import sys, tui.app, tui.backend, cdcca_cli.tui_cmd\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'peft', 'cloud'))\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_one_upload_at_a_time():
    s = TuiState()
    assert s.upload_started() and s.uplink.busy and not s.upload_started()
    s.upload_done(UploadResult())
    assert not s.uplink.busy and s.upload_started()


def test_the_help_screen_lists_every_key():
    from tui.app import CdccaApp
    from tui.screens import KEYS

    listed = {k.lower() for keys, _ in KEYS for k in keys.replace("/", " ").split()}
    for b in CdccaApp.BINDINGS:
        assert b.key in listed, b.key


def test_no_action_is_on_a_key_that_types_text():
    """Bug 1: every action that changes something is on a function key or ctrl+key; bare
    printable keys only switch the view (and fire only when no input has the focus)."""
    from tui.app import CdccaApp

    view_only = {"tab", "focus_question"}
    for b in CdccaApp.BINDINGS:
        printable = len(b.key) == 1
        assert not printable or b.action.split("(")[0] in view_only, (b.key, b.action)


def test_a_repeat_of_a_queued_sample_is_not_marked_kept():
    """Bug 3: the marker follows what the queue did, not what UTS wanted."""
    s = TuiState()
    s.start_turn("q?", "a.png")
    turn = make_turn(["red"], [1.2], kept=True)
    turn.queued, turn.duplicate = False, True  # UTS kept it; INSERT OR IGNORE found it already queued
    t = s.finish_turn(turn)
    assert t.kept is False and "already queued" in t.reason


def test_a_rejected_token_is_not_online():
    """Bug 8: /health answers anyone; the token was tried on an authenticated endpoint."""
    s = TuiState()
    s.cloud_up("0.1.0", token_ok=False)
    assert s.cloud.message == "token rejected" and s.cloud.token_ok is False
    s.cloud_up("0.1.0", token_ok=True)
    assert s.cloud.message == "online (v0.1.0)"


def test_an_external_version_change_is_noticed_and_the_dialog_names_real_versions():
    """Bug 2: a dialog names the versions it will act on, from the versions read from disk."""
    s = TuiState(model_name="m", model_ready=True)
    vs = [Version("v0", None, "", "t", {}), Version("v1", "v0", "r1", "t", {}), Version("v2", "v1", "r2", "t", {})]
    s.set_versions(vs, "v1")
    assert s.version_changed("v2") and not s.version_changed("v1") and not s.version_changed(None)
    s.set_versions(vs, "v2")
    assert s.switch_question() == ("v2", "v1", "Roll back the device model from v2 to v1?")
    assert s.switch_question("v0")[2] == "Roll back the device model from v2 to v0?"
    s.set_versions(vs, "v0")
    assert s.switch_question("v2")[2] == "Switch the device model from v0 to v2?"
    assert s.switch_question() is None and s.switch_question("v9") is None


def test_a_round_that_lowers_accuracy_warns_and_names_the_rollback():
    s = TuiState()
    s.round_started()
    rep = report(2)
    rep.accuracy_before, rep.accuracy_after = accuracy(0.3), accuracy(0.1)
    s.round_done(rep)
    assert s.round.warning and "F9" in s.round.warning and "v1" in s.round.warning
    s.round_started()
    s.round_done(report(3))
    assert s.round.warning is None


def test_each_stage_has_elapsed_time_and_an_eta():
    s = TuiState()
    s.round_started()
    s.on_stage("distil", 0.0, "step 0/100", now=10.0)
    s.on_stage("distil", 0.25, "step 25/100", now=14.0)
    st = s.round.stage("distil")
    assert st.elapsed == 4.0 and math.isclose(st.eta(), 12.0)
    s.on_stage("distil", 1.0, "", now=26.0)
    assert st.eta() is None and st.status == "done"


def test_one_patch_size_in_the_round_row_and_the_version_history():
    """Bug 5: the history shows the patch file's bytes, the figure the round reported."""
    s = TuiState()
    row = s.round_done(report(1))
    vs = [Version("v0", None, "", "t", {}), Version("v1", "v0", "round-1", "t", {}, patch_bytes=38_736)]
    s.set_versions(vs, "v1", {"v1": row.downlink_bytes})
    assert s.versions[1].patch_bytes == row.downlink_bytes == 50_000


def test_the_uplink_panel_follows_the_rounds_upload():
    """Bug 6: 'last: none yet' forever after rounds uploaded the queue."""
    s = TuiState()
    s.round_started()
    s.on_stage("upload", 1.0, "3 new samples, 0 already there")
    assert s.uplink.last_upload == "in round: 3 new samples, 0 already there" and s.uplink.last_ok
    s.round_done(report(1))
    assert s.uplink.last_upload == "4 sent in round round-1"
