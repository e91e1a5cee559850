"""Issue 14, "data of a round flows forward once", on the device: how many times one `cdcca sync`
loads the model into llama.cpp, counted through the real code path (run_sync against a real HTTP
cloud serving a genuine signed patch, device.runtime.Runtime's loader wrapped).

A sync used to load the new version three times for one set of bytes -- the smoke test, a
load-and-close to time the "reload", the after-evaluation -- and the old version once more to
measure "before".  Now the smoke test's load is the reload and the evaluation runs on it (one
load of the new version), and "before" is read back when the previous sync measured those bytes
(device/eval_cache.py): a first sync loads twice, the next once.  The figures are the same as
on a fresh load: every generation starts from cleared memory."""
from __future__ import annotations

import collections
import json
from pathlib import Path

from device import runtime as rt_mod
from device.contracts.config import load_settings
from device.evaluate import evaluate, load_eval_set
from device.models import open_device_model
from device.runtime import Runtime, RuntimeConfig
from device.sync import DEFAULT_EVAL, SyncOptions, run_sync
from device.uplink import CloudClient
from fakecloud import FakeCloud, real_patch

PER_DOMAIN = 2


def _sync(cloud: FakeCloud, settings, tmp_path: Path, name: str, reload=None):
    """One sync of the device's current version; the cloud serves a genuine patch for it."""
    model = open_device_model(settings)
    cloud.base_model = model.id
    cloud.script.update({"patch": real_patch(model.model, tmp_path / f"{name}.gguf", round_id=name * 16),
                         "rid": name * 16})
    with CloudClient(cloud.url, "t", retries=0) as client:
        return run_sync(settings, client, SyncOptions(eval_per_domain=PER_DOMAIN), reload=reload)


def test_a_sync_loads_the_new_version_once(tmp_path, monkeypatch, request):
    monkeypatch.delenv("CDCCA_CLOUD_KEY", raising=False)
    settings = load_settings()
    loads: collections.Counter = collections.Counter()
    load = rt_mod.Runtime._load

    def counting_load(self):
        loads[(Path(self.cfg.model_path).parent.name, Path(self.cfg.model_path).name)] += 1
        return load(self)

    monkeypatch.setattr(rt_mod.Runtime, "_load", counting_load)
    cloud = FakeCloud().__enter__()  # one cloud, one signing key (the device pins it on first use)
    request.addfinalizer(lambda: cloud.__exit__(None, None, None))
    first = _sync(cloud, settings, tmp_path, "a")
    assert (first.version_before, first.version_after) == ("v0", "v1")
    assert sum(loads.values()) == 2, loads  # before (nothing cached yet) + the new version, once
    assert first.reload_seconds > 0 and first.accuracy_before and first.accuracy_after

    # the figures measured on the smoke test's load are those of a fresh load of the same bytes
    loads.clear()
    new = open_device_model(settings)
    with Runtime(RuntimeConfig(new.model, new.mmproj, n_threads=settings.threads)) as rt:
        fresh = evaluate(rt, load_eval_set(DEFAULT_EVAL, PER_DOMAIN))
    fresh.pop("answers")
    assert json.dumps(fresh, sort_keys=True) == json.dumps(first.accuracy_after, sort_keys=True)  # NaN-safe

    loads.clear()
    reloaded = []
    second = _sync(cloud, settings, tmp_path, "b", reload=lambda m: reloaded.append(m.version) or 0.25)
    assert (second.version_before, second.version_after) == ("v1", "v2")
    assert json.dumps(second.accuracy_before) == json.dumps(first.accuracy_after)  # read back, not re-measured
    assert sum(loads.values()) == 1, loads  # only the new version; the live session reloaded itself
    assert reloaded == ["v2"] and second.reload_seconds == 0.25
