"""End to end on loopback with the embedded default (HF Idefics3 on the device as llama.cpp Q4_0):
a drifting chat stream (70 % source, 30 % the round's drifted domains: cloud.zoo.streams) -> UTS
queue -> upload -> cloud round on the family seam (HF teacher labels, AKD) -> DWC patch -> atomic
apply -> device-measured accuracy on the build's held-out set (300 VQA questions per domain),
paired per question before/after; then rollback restores the bytes.

What is asserted: every round's drifted-domain gain has a paired interval above 0, no domain falls by
more than DROP_PTS, the device agrees with the twin, rollback restores bytes.  Issue 12's bar of
GAIN_PTS per round is a strict xfail until the product reaches it."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cloud.families import family_for
from cloud.fidelity import fidelity
from cloud.loopback import LoopbackCloud
from cloud.zoo.streams import ROUND_DRIFTS as DRIFT, drift_stream
from device.contracts.config import load_settings
from device.contracts.dataset import read_llava
from device.contracts.image import load_image
from device.contracts.model_id import file_sha256
from device.contracts.round_metrics import paired_gain
from device.contracts.wire import RoundOptions
from device.models import open_device_model
from device.queue import Queue
from device.session import ChatSession
from device.sync import DEFAULT_EVAL, SyncOptions, run_sync
from device.uplink import CloudClient

CHATS = 400  # per round: 280 source + 120 drifted
GAIN_PTS = 0.05  # every round: the drifted domains' mean rises by >= 5 points, interval above 0
DROP_PTS = 0.02  # ... and no domain falls by more than 2 points


def _chat(settings, tmp_path, domains, seed: int) -> int:
    dm = open_device_model(settings)
    kept = 0
    with Queue(settings.queue_path) as q:
        sess = ChatSession.open(dm, 2, 512, q)
        for i, s in enumerate(drift_stream(CHATS, domains, seed)):
            p = tmp_path / f"{seed}-{i}.png"  # the user's photo on disk, as the CLI and TUI take it
            Image.fromarray(s.image).save(p)
            kept += sess.ask(s.question, image=p).queued
        sess.close()
    return kept


def _vqa(acc: dict) -> dict[str, float]:
    return {d: v["vqa"] for d, v in acc["domains"].items()}


@pytest.fixture(scope="module")
def rounds(tmp_path_factory):
    """Two sync rounds with the product's defaults; per round the report and the paired gain."""
    tmp_path = tmp_path_factory.mktemp("rounds")
    with pytest.MonkeyPatch.context() as mp:  # module scope: the autouse per-test home comes later
        mp.setenv("CDCCA_HOME", str(tmp_path / "home"))
        yield _run_rounds(tmp_path)


def _run_rounds(tmp_path):
    settings = load_settings()
    opts = SyncOptions(RoundOptions(seed=0), eval_per_domain=None)  # the product's defaults, full eval set
    out = []
    with LoopbackCloud(settings) as cloud:
        client = CloudClient(cloud.url, cloud.add_device("laptop"), retries=2, backoff=0.1)
        for rnd, domains in enumerate(DRIFT):
            kept = _chat(settings, tmp_path, domains, 100 * (rnd + 1))
            rep = run_sync(settings, client, opts)
            gain = paired_gain(rep.accuracy_before, rep.accuracy_after, domains)
            before, after = _vqa(rep.accuracy_before), _vqa(rep.accuracy_after)
            print(f"round {rnd + 1} {domains}: kept {kept}/{CHATS}, patch {rep.downlink_bytes} B; drifted gain "
                  f"{100 * gain[0]:+.1f} pts [{100 * gain[1]:+.1f}, {100 * gain[2]:+.1f}]; before {before} after {after}")
            out.append((domains, kept, rep, gain, before, after))
    return settings, out


pytestmark = pytest.mark.xdist_group("e2e-rounds")  # one worker runs the rounds once (make test: --dist loadgroup)


@pytest.mark.timeout(1500)
def test_rounds_gain_on_the_drifted_domains_without_forgetting(rounds):
    settings, out = rounds
    for rnd, (domains, kept, rep, (gain, lo, hi), before, after) in enumerate(out):
        assert kept > 20, kept
        assert 0 < rep.downlink_bytes <= RoundOptions().downlink_budget_bytes
        assert rep.uplink_bytes < rep.uplink_raw_bytes and rep.version_after == f"v{rnd + 1}"
        assert lo > 0, f"round {rnd + 1}: no significant gain on {domains}: {100 * gain:+.1f} pts [{100 * lo:+.1f}, {100 * hi:+.1f}]"
        fell = {d: round(before[d] - after[d], 3) for d in before if after[d] < before[d] - DROP_PTS}
        assert not fell, f"round {rnd + 1}: domains fell by more than {DROP_PTS}: {fell}"

    # the device's llama.cpp answers agree with the cloud twin rebuilt from the patched files
    dm = open_device_model(settings)
    twin = family_for(dm.model, dm.mmproj).load_twin(dm.model, dm.mmproj)
    qas = read_llava(DEFAULT_EVAL)[::60][:24]
    fid = fidelity(twin, dm.files(), [(load_image(q.image, 32), q.question) for q in qas])
    assert fid["greedy_agreement"] >= 0.9 and np.isfinite(fid["max_logit_gap"]), fid

    # rollback restores the previous version's bytes exactly
    expected = {r: rec.sha256 for r, rec in dm.store.version("v1").files.items()}
    dm.store.rollback()
    back = open_device_model(settings)
    assert back.version == "v1"
    assert {r: file_sha256(p) for r, p in back.files().items()} == expected


@pytest.mark.xfail(strict=True, reason="issue 12 (open): the product's rounds gain +3.3..4.0 pts on the drifted "
                                      "domains, not yet the >= 5 the issue asks; strict, so reaching it fails this "
                                      "marker and forces the update")
def test_issue12_bar_every_round_gains_five_points(rounds):
    _, out = rounds
    for rnd, (domains, _, _, (gain, lo, hi), _, _) in enumerate(out):
        assert gain >= GAIN_PTS and lo > 0, f"round {rnd + 1}: {100 * gain:+.1f} pts [{100 * lo:+.1f}, {100 * hi:+.1f}]"
