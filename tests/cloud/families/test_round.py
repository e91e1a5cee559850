"""(d) A full loopback `cdcca sync` round on a tiny Idefics3 converted by the official converter:
device chats -> UTS queue -> upload -> cloud round on the family seam (HF twin from the device's
GGUF, HF teacher checkpoint, LoRA AKD, DWC patch re-quantized to Q8_0) -> signed patch -> atomic
apply -> the device's answers change the way the cloud's twin predicted."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tiny_families as tiny
import torch
from PIL import Image

from cloud.families import family_for
from cloud.fidelity import fidelity
from cloud.loopback import LoopbackCloud
from cloud.round_job import make_runner
from device.contracts.config import load_settings
from device.contracts.dataset import llava_record, write_llava
from device.contracts.image import load_image
from device.contracts.wire import RoundOptions
from device.models import open_device_model, store_for
from device.queue import Queue
from device.session import ChatSession
from device.sync import SyncOptions, run_sync
from device.uplink import CloudClient

QUESTIONS = ["what colour is the circle?", "how many shapes are there?"]
AGREEMENT = 0.8  # patched device vs patched twin, greedy answers on the eval images (measured: 1.0)


def _images(tmp_path, n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = tmp_path / f"img-{seed}-{i}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(p)
        out.append(p)
    return out


@pytest.mark.timeout(900)
def test_loopback_sync_round_changes_device_answers_as_the_twin_predicted(tmp_path, monkeypatch, idefics3_pair):
    torch.set_num_threads(1)
    monkeypatch.setenv("CDCCA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CDCCA_AKD_FEATURE", "0")  # the cloud's settings reach the round's AKD
    settings = load_settings()
    model, mmproj = idefics3_pair["q8_0"]
    store_for(settings, "q8_0").install_base(model, mmproj)
    teacher = tiny.idefics3(tmp_path / "teacher", seed=1)  # same tokenizer, different weights
    chat_imgs = _images(tmp_path, 8, 0)
    eval_imgs = chat_imgs[:6]  # the user's own images: the round should change what they get
    eval_json = tmp_path / "eval.json"
    write_llava(eval_json, [llava_record(f"e{i}", p.name, QUESTIONS[i % 2], "red", domain="user")
                            for i, p in enumerate(eval_imgs)])
    # the store hands any model the embedded default's feature stats (device/models.py); they do
    # not fit this model's visual tokens, so UTS runs on entropy alone here
    dm = dataclasses.replace(open_device_model(settings, quant="q8_0"), stats=None)
    with Queue(settings.queue_path) as q:
        sess = ChatSession.open(dm, 1, 512, q, max_tokens=8)
        before = [sess.ask(QUESTIONS[i % 2], image=p).answer for i, p in enumerate(chat_imgs)]
        sess.close()
    opts = SyncOptions(RoundOptions(seed=0, steps=60, learning_rate=5e-3, downlink_budget_bytes=1 << 20),
                       eval_path=eval_json, eval_per_domain=None)
    runner = make_runner(settings, teacher=teacher, eval_set=eval_json)
    with LoopbackCloud(settings, runner=runner) as cloud:
        client = CloudClient(cloud.url, cloud.add_device("laptop"), retries=2, backoff=0.1)
        rep = run_sync(settings, client, opts, quant="q8_0")
    assert rep.version_after == "v1" and rep.downlink_bytes > 0
    m = rep.cloud.model_extra
    assert rep.cloud.akd["kd_mode"] == "logit"  # the teacher tokenizes like the device
    assert "kd" in rep.cloud.akd and "feat" not in rep.cloud.akd  # akd_feature off, akd_kd on
    assert m["fidelity"]["patched"]["greedy_agreement"] >= AGREEMENT

    # on the device's own new files: llama.cpp's answers vs the twin the cloud rebuilds from them
    new = open_device_model(settings, quant="q8_0")
    twin = family_for(new.model, new.mmproj).load_twin(new.model, new.mmproj)
    probes = [(load_image(p, 32), QUESTIONS[i % 2]) for i, p in enumerate(eval_imgs)]
    fid = fidelity(twin, {"model": new.model, "mmproj": new.mmproj}, probes, max_tokens=8)
    changed = np.mean([a != b for a, b in zip(before, fid["device_answers"])])
    print(f"idefics3 q8_0 loopback round: {changed:.0%} of device answers changed; device-vs-twin greedy "
          f"agreement {fid['greedy_agreement']:.2f}, max logit gap {fid['max_logit_gap']:.3f}; "
          f"patch {rep.downlink_bytes} B; cloud round {rep.round_seconds:.1f} s")
    assert changed >= 0.5
    assert fid["greedy_agreement"] >= AGREEMENT
