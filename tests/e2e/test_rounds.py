"""End to end on loopback with the embedded models (issues: cloud AKD and DWC downlink):
chats -> UTS queue -> upload -> cloud round (AKD) -> DWC patch -> atomic apply -> better device.
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cloud.loopback import LoopbackCloud
from cloud.zoo import scenes
from cloud.zoo.data import Codec
from cloud.zoo.evaluate import generate
from cloud.zoo.gguf_load import load_gguf_pair
from device.contracts.config import load_settings
from device.contracts.model_id import file_sha256
from device.contracts.wire import RoundOptions
from device.evaluate import evaluate, load_eval_set
from device.models import open_device_model
from device.queue import Queue
from device.runtime import Runtime, RuntimeConfig
from device.session import ChatSession
from device.sync import DEFAULT_EVAL, SyncOptions, run_sync
from device.uplink import CloudClient

TARGETS = ("texture", "noise", "combo", "rotate")
SOURCE_MARGIN = 0.03  # the round may cost at most 3 points of source accuracy (measured: 0)


def _chat(settings, tmp_path, domains, seed: int, n_per_domain: int) -> int:
    dm = open_device_model(settings)
    with Queue(settings.device_dir / "queue.sqlite") as q:
        sess = ChatSession.open(dm, 2, 512, q)
        kept = 0
        for d in domains + ("source",):
            for i, s in enumerate(scenes.generate(d, n_per_domain, seed)):
                p = tmp_path / f"{seed}-{d}-{i}.png"
                Image.fromarray(s.image).save(p)
                kept += sess.ask(s.question, image=p).queued
        sess.close()
    return kept


def _mean(acc: dict, domains) -> float:
    return float(np.mean([acc["domains"][d]["vqa"] for d in domains]))


DRIFT = (("noise", "texture"), ("combo", "rotate"))  # the user's images shift between rounds


@pytest.mark.timeout(900)
def test_two_sync_rounds_improve_the_device_and_rollback_restores_bytes(tmp_path):
    settings = load_settings()
    opts = SyncOptions(RoundOptions(seed=0), eval_per_domain=None)  # the product's defaults
    with LoopbackCloud(settings) as cloud:
        client = CloudClient(cloud.url, cloud.add_device("laptop"), retries=2, backoff=0.1)
        reports = []
        for rnd, domains in enumerate(DRIFT):
            kept = _chat(settings, tmp_path, domains, 100 * (rnd + 1), 150)
            assert kept > 50
            rep = run_sync(settings, client, opts)
            reports.append(rep)
            before, after = rep.accuracy_before, rep.accuracy_after
            print(f"round {rnd + 1} {domains}: before {before['domains']} after {after['domains']}")
            assert _mean(after, domains) > _mean(before, domains), (rnd, before, after)
            assert _mean(after, TARGETS) >= _mean(before, TARGETS) - 0.02, (rnd, before, after)
            assert after["domains"]["source"]["vqa"] >= before["domains"]["source"]["vqa"] - SOURCE_MARGIN
            assert 0 < rep.downlink_bytes <= 48 * 1024 + 8192
            assert rep.uplink_bytes < rep.uplink_raw_bytes
            assert rep.version_after == f"v{rnd + 1}"

        # the device's llama.cpp answers equal the cloud's torch evaluation of the same patched weights
        dm = open_device_model(settings)
        twin, tok = load_gguf_pair(dm.model, dm.mmproj)
        qas = load_eval_set(DEFAULT_EVAL, 20)
        from device.contracts.image import load_image

        imgs = np.stack([load_image(q.image, 32) for q in qas])
        cloud_answers = generate(twin, Codec(tok), imgs, [q.question for q in qas])
        with Runtime(RuntimeConfig(dm.model, dm.mmproj)) as rt:
            device_answers = evaluate(rt, qas)["answers"]
        agree = np.mean([a == b for a, b in zip(device_answers, cloud_answers)])
        assert agree >= 0.95, agree

        # rollback restores the previous version's bytes exactly
        expected = {r: rec.sha256 for r, rec in dm.store.version("v1").files.items()}  # v1's recorded bytes
        dm.store.rollback()
        back = open_device_model(settings)
        assert back.version == "v1"
        assert {r: file_sha256(p) for r, p in back.files().items()} == expected
