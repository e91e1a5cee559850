"""User models under version control (``cdcca models add``) and per-model OOD statistics."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.quants import dequantize
from typer.testing import CliRunner

from cloud import ggml_quant
from device.contracts.config import DEFAULT_MODEL_DIR, load_settings
from device.contracts.feature_stats import FEATURE_STATS_FILE, FeatureStats
from cloud.patch_build import make_patch_from_arrays
from device.model_stats import MIN_IMAGES
from device.models import active_name, add_user_model, open_device_model, set_active
from device.queue import Queue
from device.session import ChatSession
from tiny_hf import tiny_llama

runner = CliRunner()


def sha(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def text_gguf(tmp_path_factory) -> Path:
    from cloud.converter import convert

    root = tmp_path_factory.mktemp("user-model")
    return convert(tiny_llama(root / "hf"), root / "my-chat-model.gguf")


def _patch(base: Path, out: Path) -> Path:
    r = GGUFReader(base, "r")
    t = next(t for t in r.tensors if t.name == "blk.0.ffn_down.weight")
    ne0, rows = int(t.shape[0]), int(t.shape[1])
    w = dequantize(t.data, t.tensor_type).reshape(rows, ne0).copy()
    w[:4] += 0.1
    return make_patch_from_arrays(base, {t.name: (w, [(0, 4)])}, out, round_id="r1",
                                  quantizer=ggml_quant.quantize).path


def test_text_only_user_model_add_chat_patch_rollback(text_gguf, tmp_path):
    s = load_settings()
    store = add_user_model(s, text_gguf)
    assert store.name == "my-chat-model" and active_name(s) == "my-chat-model"
    dm = open_device_model(s)  # no --quant: the active user model
    assert dm.store.name == "my-chat-model" and dm.version == "v0" and dm.mmproj is None and dm.stats is None
    with Queue(s.queue_path) as q:
        chat = ChatSession.open(dm, threads=1, n_ctx=256, queue=q, max_tokens=4)
        turn = chat.ask("what colour is the circle?")  # text-only: no image needed
        assert turn.generation.prompt_kind == "template" and turn.decision is not None
        chat.close()
    base_sha = sha(dm.model)
    res = dm.store.apply_patch(_patch(dm.model, tmp_path / "p.gguf"))
    after = open_device_model(s)
    assert after.version == "v1" and after.id != dm.id and sha(after.model) != base_sha
    assert dm.store.rollback().id == "v0" and sha(open_device_model(s).model) == base_sha
    assert res.bytes_copied == 0
    with pytest.raises(ValueError, match="exists already"):
        add_user_model(s, text_gguf)
    set_active(s, None)
    assert open_device_model(s).store.name.startswith("default-")  # back to the embedded default


def test_models_add_cli_and_bad_files_are_one_line(text_gguf, tmp_path):
    from cdcca_cli.main import app

    r = runner.invoke(app, ["models", "add", str(text_gguf), "--name", "mine"])
    assert r.exit_code == 0, r.output
    assert "added mine (text-only" in r.output and "current device model" in r.output
    r = runner.invoke(app, ["versions"])
    assert r.exit_code == 0 and "v0" in r.output, r.output
    listed = runner.invoke(app, ["models", "list"]).output
    assert "* mine" in listed
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all" * 10)
    r = runner.invoke(app, ["models", "add", str(bad)])
    assert r.exit_code == 1 and "error:" in r.output and "bad magic" in r.output
    r = runner.invoke(app, ["models", "add", str(text_gguf), "--name", "Bad Name!"])
    assert r.exit_code == 1 and "invalid model name" in r.output
    assert runner.invoke(app, ["models", "use", "default"]).exit_code == 0 and active_name(load_settings()) is None


def test_stats_belong_to_their_model_and_are_learned_from_first_chats(tmp_path):
    """A user vision model never gets the toy's stats; a stale file beside it is ignored; its own
    statistics are estimated from its first chats and then used."""
    s = load_settings()
    src = tmp_path / "vis"
    src.mkdir()
    for f in ("student-q4_0.gguf", "mmproj-f32.gguf"):
        (src / f).write_bytes((DEFAULT_MODEL_DIR / f).read_bytes())
    FeatureStats(np.zeros(64), np.ones(64)).save(src / FEATURE_STATS_FILE)  # another model's (64-d)
    store = add_user_model(s, src / "student-q4_0.gguf", src / "mmproj-f32.gguf", name="vis")
    dm = open_device_model(s)
    assert dm.stats is None and dm.estimator is not None and dm.estimator.dim == 96
    rng = np.random.default_rng(0)
    for i in range(MIN_IMAGES):
        assert dm.stats is None
        dm.observe(rng.standard_normal((16, 96)).astype(np.float32) + 3.0)
    assert dm.stats is not None and dm.stats.dim == 96 and abs(float(dm.stats.mean.mean()) - 3.0) < 0.1
    again = open_device_model(s)  # persisted with the model (its store), not with the toy
    assert again.stats is not None and np.array_equal(again.stats.mean, dm.stats.mean)
    assert (store.dir / FEATURE_STATS_FILE).is_file()
    # the default store keeps the embedded default's own shipped stats
    set_active(s, None)
    assert open_device_model(s).stats is not None


def test_partial_estimate_survives_a_restart(tmp_path):
    from device.model_stats import StatsEstimator

    est = StatsEstimator(tmp_path / FEATURE_STATS_FILE, 8, min_images=3)
    est.observe(np.ones((4, 8)))
    est.observe(np.ones((4, 8)) * 3)
    again = StatsEstimator(tmp_path / FEATURE_STATS_FILE, 8, min_images=3)
    assert again.n_images == 2 and again.observe(np.zeros((2, 8), np.float32) + 2) is not None
    assert again.observe(np.ones((1, 9))) is None  # other widths are ignored, never a crash
