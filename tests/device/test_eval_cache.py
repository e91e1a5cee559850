"""A sync's "before" is read back when the same model bytes were measured on the same eval set
(device.eval_cache); anything else is measured again, and a broken cache file is only a miss."""
from __future__ import annotations

import json

from device import eval_cache
from device.contracts.config import load_settings
from device.models import open_device_model
from device.sync import DEFAULT_EVAL, SyncOptions, _eval


def test_same_bytes_same_set_is_read_back_other_bytes_are_measured(tmp_path):
    settings = load_settings()
    opts = SyncOptions(eval_per_domain=2)
    q4 = open_device_model(settings, quant="q4_0")
    first, reused = _eval(q4, opts, 1, settings.device_dir)
    assert not reused and first["domains"]["source"]["vqa_n"] == 2
    again, reused = _eval(q4, opts, 1, settings.device_dir)
    assert reused and again == json.loads(json.dumps(first))
    q8 = open_device_model(settings, quant="q8_0")  # other bytes: measured, not read back
    assert not _eval(q8, opts, 1, settings.device_dir)[1]
    assert not _eval(q4, SyncOptions(eval_per_domain=3), 1, settings.device_dir)[1]  # other subset


def test_other_eval_file_or_broken_cache_is_a_miss(tmp_path):
    key = eval_cache.cache_key("m" * 16, DEFAULT_EVAL, 2)
    eval_cache.save(tmp_path, key, {"vqa": 0.5}, "v3")
    assert eval_cache.load(tmp_path, key) == {"vqa": 0.5}
    other = tmp_path / "other.json"
    other.write_text(DEFAULT_EVAL.read_text() + " ")
    assert eval_cache.cache_key("m" * 16, other, 2) != key
    (tmp_path / eval_cache.CACHE_DIR / f"{key}.json").write_text("{not json")
    assert eval_cache.load(tmp_path, key) is None
    (tmp_path / eval_cache.CACHE_DIR / f"{key}.json").write_text(json.dumps({"key": "x", "accuracy": {}}))
    assert eval_cache.load(tmp_path, key) is None
