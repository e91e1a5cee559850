"""After an apply the device smoke-tests the new version and rolls back by itself (issue 11,
item 8): a hash-valid, correctly signed patch full of NaN must not stay live."""
from __future__ import annotations

from pathlib import Path

import pytest

from device.contracts.config import load_settings
from device.models import open_device_model
from device.resume import load_inflight
from device.smoke import probe
from device.sync import PatchRefused, SyncOptions, run_sync
from device.uplink import CloudClient
from fakecloud import FakeCloud, real_patch


def test_nan_patch_is_rolled_back_and_chat_still_works(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("CDCCA_CLOUD_KEY", raising=False)
    settings = load_settings()
    model = open_device_model(settings)
    assert probe(model).ok
    patch = real_patch(model.model, tmp_path / "nan.gguf", nan=True)
    with FakeCloud() as cloud:
        cloud.script.update({"patch": patch})
        with CloudClient(cloud.url, "t", retries=0) as client:
            with pytest.raises(PatchRefused, match=r"failed the smoke test \(non-finite logits") as err:
                run_sync(settings, client, SyncOptions(evaluate=False))
        assert any(r.endswith("/release") for r in cloud.requests)  # its samples are freed
    assert "\n" not in str(err.value) and "rolled back to v0" in str(err.value)
    now = open_device_model(settings)
    assert now.version == "v0" and now.id == model.id
    assert [v.id for v in now.store.list()] == ["v0", "v1"]  # the bad version is kept, not live
    assert load_inflight(settings.device_dir) is None
    answer = probe(now)
    assert answer.ok and answer.answer  # chat works on the old version
