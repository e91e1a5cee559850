"""cloud.store: tokens, idempotent sample storage, content-addressed blobs, round rows."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from sqlalchemy import select

from cloud import store as store_mod
from cloud.store import Store, write_atomic
from device.contracts.config import load_settings
from device.contracts.wire import RoundOptions, RoundRequest, TokenStats, UplinkSample


def make_sample(i: int, prompt: str | None = None) -> UplinkSample:
    return UplinkSample(
        sample_id=f"{i:016x}", base_model="m0", prompt=prompt or f"what is in picture {i}?",
        answer="a cat", answer_token_ids=[5, 6],
        tokens=TokenStats(positions=[0, 1], token_ids=[5, 6], entropy=[1.5, 2.0]),
        score=0.7, raw_bytes=1000)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(load_settings(home=tmp_path))
    yield s
    s.close()


def test_default_database_lives_under_cloud_dir(tmp_path: Path, store: Store) -> None:
    assert (tmp_path / "cloud" / "cloud.sqlite").is_file()


def test_db_url_overrides_location(tmp_path: Path) -> None:
    db = tmp_path / "elsewhere.db"
    s = Store(load_settings(home=tmp_path / "home", db_url=f"sqlite:///{db}"))
    s.add_device("lap")
    s.close()
    assert db.is_file()
    assert not (tmp_path / "home" / "cloud" / "cloud.sqlite").exists()


def test_tokens_are_stored_only_as_hashes(store: Store) -> None:
    token = store.add_device("laptop-1")
    with store.engine.connect() as conn:
        stored = conn.execute(select(store_mod.devices.c.token_sha256)).scalar_one()
    assert stored == hashlib.sha256(token.encode()).hexdigest()
    assert token not in stored
    assert store.device_for_token(token) == "laptop-1"
    assert store.device_for_token(token + "x") is None
    assert store.device_for_token("") is None


def test_device_names_are_unique_and_validated(store: Store) -> None:
    store.add_device("lap")
    with pytest.raises(ValueError, match="already exists"):
        store.add_device("lap")
    with pytest.raises(ValueError, match="invalid device name"):
        store.add_device("../etc")
    assert [d.name for d in store.list_devices()] == ["lap"]
    assert store.list_devices()[0].created_at.tzinfo is not None


def test_samples_are_idempotent_per_device(store: Store) -> None:
    store.add_device("a")
    store.add_device("b")
    batch = [make_sample(1), make_sample(2), make_sample(1)]  # a repeat inside one batch too
    assert store.add_samples("a", batch) == (["0000000000000001", "0000000000000002"],
                                             ["0000000000000001"])
    assert store.add_samples("a", [make_sample(2), make_sample(3)]) == (
        ["0000000000000003"], ["0000000000000002"])
    assert store.add_samples("b", [make_sample(1)]) == (["0000000000000001"], [])  # other device
    assert store.sample_counts("a").total == 3
    assert store.sample_counts("b").total == 1


def test_blobs_are_content_addressed_and_shared(tmp_path: Path, store: Store) -> None:
    store.add_device("a")
    store.add_device("b")
    sample = make_sample(7)
    store.add_samples("a", [sample])
    store.add_samples("b", [sample])
    payload = sample.model_dump_json().encode()
    sha = hashlib.sha256(payload).hexdigest()
    blob = tmp_path / "cloud" / "blobs" / sha[:2] / sha
    assert blob.read_bytes() == payload
    files = [p for p in (tmp_path / "cloud" / "blobs").rglob("*") if p.is_file()]
    assert files == [blob]  # one blob for two rows, no temp files left behind


def test_corrupt_blob_is_detected(store: Store) -> None:
    store.add_device("a")
    store.add_samples("a", [make_sample(1)])
    blob = next(p for p in store.blobs.root.rglob("*") if p.is_file())
    blob.write_bytes(b"{}")
    with pytest.raises(OSError, match="corrupt"):
        store.unused_samples("a")


def test_write_atomic_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "d" / "f.bin"
    write_atomic(target, b"one")
    write_atomic(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["f.bin"]


def test_unused_samples_oldest_first_with_limit(store: Store) -> None:
    store.add_device("a")
    store.add_samples("a", [make_sample(i) for i in (3, 1, 2)])
    assert [s.sample_id[-1] for s in store.unused_samples("a")] == ["3", "1", "2"]
    assert [s.sample_id[-1] for s in store.unused_samples("a", limit=2)] == ["3", "1"]
    assert store.unused_samples("a")[0] == make_sample(3)


def test_round_rows_transitions_and_completion(store: Store) -> None:
    store.add_device("a")
    store.add_device("b")
    store.add_samples("a", [make_sample(1), make_sample(2)])
    status = store.create_round("a", RoundRequest(base_model="m0", options=RoundOptions(steps=3)))
    assert status.state == "queued" and status.created_at.tzinfo is not None
    rid = status.round_id
    assert store.get_round(rid, "b") is None  # another device's round reads as missing
    assert store.round_request(rid)[1].options.steps == 3

    assert store.transition(rid, {"queued"}, "running")
    assert not store.transition(rid, {"queued"}, "cancelled")  # CAS: no longer queued
    with pytest.raises(ValueError):
        store.update_round(rid, state="done")
    store.update_round(rid, stage="distil", progress=0.5)
    assert store.complete_round(rid, "a", ["0000000000000001"], patch_sha256="ab", patch_bytes=2,
                                patch_path="/x", metrics={"loss": 0.1})
    assert not store.complete_round(rid, "a", ["0000000000000002"])  # already done
    done = store.get_round(rid, "a")
    assert (done.state, done.stage, done.metrics) == ("done", "distil", {"loss": 0.1})
    assert store.sample_counts("a").model_dump() == {"total": 2, "unused": 1}
    assert [r.round_id for r in store.list_rounds("a")] == [rid]
    assert store.list_rounds("b") == []


def test_jsonable_coerces_odd_metric_values() -> None:
    class Scalar:
        def __float__(self) -> float:
            return 0.25

    assert store_mod.jsonable({"a": Scalar(), "b": Path("x"), "c": [1]}) == {
        "a": 0.25, "b": "x", "c": [1]}
