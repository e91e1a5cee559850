"""cloud.gc: keep the last N rounds' models and patches per device, sweep the rest and orphans."""
from __future__ import annotations

import os
from pathlib import Path

from cloud.gc import collect
from cloud.registry import ModelRegistry
from cloud.store import Store, utcnow
from device.contracts.config import load_settings
from device.contracts.wire import RoundRequest


def _model(registry: ModelRegistry, tmp: Path, seed: int) -> str:
    files = {}
    for role in ("model", "mmproj"):
        files[role] = tmp / f"{role}-{seed}.gguf"
        files[role].write_bytes(f"{role} {seed}".encode() * 100)
    mid = registry.put(files)
    os.utime(registry.root / mid, (0, 0))  # old enough to be collectable
    return mid


def _done_round(store: Store, device: str, base: str, new: str, patch: bytes) -> str:
    rid = store.create_round(device, RoundRequest(base_model=base)).round_id
    assert store.claim_round("w", 60) == rid
    sha = store.blobs.put(patch)
    os.utime(store.blobs.path_for(sha), (0, 0))
    assert store.complete_round(rid, device, [], metrics={"new_model": new}, patch_sha256=sha,
                                patch_bytes=len(patch), patch_path=store.blobs.key(sha),
                                finished_at=utcnow())
    return rid


def test_keeps_last_n_rounds_per_device_and_drops_the_rest(tmp_path: Path) -> None:
    settings = load_settings(home=tmp_path, keep_round_models=2, staging_max_age_s=60)
    store = Store(settings)
    registry = ModelRegistry(settings.cloud_dir / "models")
    store.add_device("a")
    store.add_device("b")
    chain = [_model(registry, tmp_path, i) for i in range(5)]  # a: v0 -> v1 -> v2 -> v3 -> v4
    rounds = [_done_round(store, "a", chain[i], chain[i + 1], f"patch {i}".encode()) for i in range(4)]
    other = _model(registry, tmp_path, 99)
    _done_round(store, "b", other, other, b"b's patch")
    orphan = store.blobs.put(b"nobody's")
    os.utime(store.blobs.path_for(orphan), (0, 0))
    torn = store.blobs.path_for(orphan).parent / f".{orphan}.abc.tmp"  # a write that died
    torn.write_bytes(b"half")
    os.utime(torn, (0, 0))

    dry = collect(settings, store, registry, dry_run=True)
    assert sorted(dry.models) == sorted(chain[:2]) and registry.get(chain[0]) is not None
    report = collect(settings, store, registry)
    # a's last two rounds used v2 -> v3 and v3 -> v4: v0 and v1 go; b is untouched
    assert sorted(report.models) == sorted(chain[:2])
    assert [m for m in chain if registry.get(m)] == chain[2:] and registry.get(other)
    assert report.patches == 2 and report.blobs == 4  # two old patches, the orphan, the torn write
    assert not torn.exists()
    assert store.round_patch(rounds[0], "a") is None and store.round_patch(rounds[3], "a")
    assert store.blobs.exists(store.round_patch(rounds[3], "a").sha256)
    again = collect(settings, store, registry)
    assert (again.models, again.patches, again.blobs) == ([], 0, 0)
    store.close()
