"""A text-only user model end to end on loopback: ``models add`` -> chat (UTS queue) -> ``sync``
(upload, cloud round on the text-only family seam, DWC patch) -> patched version -> rollback."""
from __future__ import annotations

import hashlib

import pytest
from typer.testing import CliRunner

from device.contracts.config import load_settings
from device.contracts.dataset import llava_record, write_llava
from device.contracts.wire import RoundOptions
from device.models import open_device_model
from device.queue import Queue
from device.session import ChatSession
from device.sync import SyncOptions, run_sync
from tiny_hf import tiny_llama

QUESTIONS = ["what colour is the circle?", "hello world how are you today?", "is the circle red?",
             "you are a helpful assistant?", "how are you?", "what is red?"]


def sha(p) -> str:
    return hashlib.sha256(open(p, "rb").read()).hexdigest()


@pytest.mark.timeout(900)
def test_text_only_user_model_add_chat_sync_patch_rollback(tmp_path, monkeypatch):
    import torch

    from cdcca_cli.main import app
    from cloud.converter import convert
    from cloud.loopback import LoopbackCloud
    from cloud.round_job import make_runner
    from device.uplink import CloudClient

    torch.set_num_threads(1)
    monkeypatch.setenv("CDCCA_HOME", str(tmp_path / "home"))
    settings = load_settings()
    gguf = convert(tiny_llama(tmp_path / "hf"), tmp_path / "tiny-chat.gguf", "f32")
    teacher = tiny_llama(tmp_path / "teacher", seed=1)  # same tokenizer, other weights
    r = CliRunner().invoke(app, ["models", "add", str(gguf)])
    assert r.exit_code == 0 and "text-only" in r.output, r.output
    dm = open_device_model(settings)
    assert dm.store.name == "tiny-chat" and dm.mmproj is None
    base = sha(dm.model)
    with Queue(settings.queue_path) as q:
        sess = ChatSession.open(dm, 1, 256, q, max_tokens=6)
        for i in range(12):
            sess.ask(QUESTIONS[i % len(QUESTIONS)] + " " * (i // len(QUESTIONS)))
        sess.close()
        assert q.stats().pending > 0
    eval_json = tmp_path / "eval.json"
    write_llava(eval_json, [llava_record(f"e{i}", None, q, "red", domain="user") for i, q in enumerate(QUESTIONS)])
    opts = SyncOptions(RoundOptions(seed=0, steps=20, learning_rate=5e-3, downlink_budget_bytes=1 << 20),
                       evaluate=False)
    with LoopbackCloud(settings, runner=make_runner(settings, teacher=teacher, eval_set=eval_json)) as cloud:
        client = CloudClient(cloud.url, cloud.add_device("laptop"), retries=2, backoff=0.1)
        rep = run_sync(settings, client, opts)
    assert rep.version_before == "v0" and rep.version_after == "v1" and rep.downlink_bytes > 0
    after = open_device_model(settings)
    assert after.store.name == "tiny-chat" and after.version == "v1" and sha(after.model) != base
    r = CliRunner().invoke(app, ["rollback"])
    assert r.exit_code == 0, r.output
    back = open_device_model(settings)
    assert back.version == "v0" and sha(back.model) == base
