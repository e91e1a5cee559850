"""cloud.store: tokens, idempotent sample storage, content-addressed blobs, round rows, the round
queue.  Every test that takes ``store`` runs twice: on SQLite and on a real PostgreSQL server
(tests/cloud/conftest.py)."""
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
def store(tmp_path: Path, db_url: str | None) -> Store:
    s = Store(load_settings(home=tmp_path, db_url=db_url))
    yield s
    s.close()


def test_default_database_lives_under_cloud_dir(tmp_path: Path) -> None:
    Store(load_settings(home=tmp_path)).close()
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


def test_corrupt_blob_is_skipped_and_reported_not_fatal(store: Store) -> None:
    """Issue 11, item 2: a sample that cannot be read back is skipped (and marked, so no later
    round tries it again) instead of failing every round of its device."""
    store.add_device("a")
    store.add_samples("a", [make_sample(1), make_sample(2)])
    blob = store.blobs.path_for(store.blobs.put(make_sample(1).model_dump_json().encode()))
    blob.write_bytes(b"{}")
    with pytest.raises(OSError, match="corrupt"):
        store.blobs.get(blob.name)
    good, skipped = store.load_usable("a", None, lambda s: None)
    assert [s.sample_id for s in good] == ["0000000000000002"]
    assert list(skipped) == ["0000000000000001"] and "corrupt" in skipped["0000000000000001"]
    assert store.sample_counts("a").model_dump() == {"total": 2, "unused": 1}
    assert store.load_usable("a", None, lambda s: None)[1] == {}  # not retried
    listed = {i.sample_id: i.skipped for i in store.list_samples("a")}
    assert "corrupt" in listed["0000000000000001"] and listed["0000000000000002"] is None


def test_list_and_delete_own_samples(store: Store) -> None:
    store.add_device("a")
    store.add_device("b")
    store.add_samples("a", [make_sample(i) for i in (3, 1, 2)])
    store.add_samples("b", [make_sample(1)])
    assert [i.sample_id[-1] for i in store.list_samples("a")] == ["3", "1", "2"]
    assert [i.sample_id[-1] for i in store.list_samples("a", after="0000000000000003", limit=1)] == ["1"]
    sha = store.blobs.put(make_sample(2).model_dump_json().encode())
    assert store.delete_sample("a", "0000000000000002") and not store.blobs.exists(sha)
    assert not store.delete_sample("a", "0000000000000002")
    assert store.delete_sample("a", "0000000000000001")
    # b's identical payload is b's: its row and its (shared) blob stay
    assert [i.sample_id for i in store.list_samples("b")] == ["0000000000000001"]
    assert store.unused_samples("b") == [make_sample(1)]


def test_revoke_and_rotate_tokens(store: Store) -> None:
    old = store.add_device("lap")
    new = store.rotate_token("lap")
    assert store.device_for_token(old) is None and store.device_for_token(new) == "lap"
    store.revoke("lap")
    assert store.device_for_token(new) is None and store.get_device("lap").revoked
    store.add_device("other")  # a second revoked-or-live row coexists with the NULL hash
    store.revoke("other")
    again = store.rotate_token("lap")
    assert store.device_for_token(again) == "lap"
    with pytest.raises(ValueError, match="no device"):
        store.revoke("ghost")


def test_one_active_round_per_device_is_enforced_by_the_database(store: Store) -> None:
    from cloud.store import ActiveRound

    store.add_device("a")
    store.add_device("b")
    rid = store.create_round("a", RoundRequest(base_model="m0")).round_id
    with pytest.raises(ActiveRound) as exc:
        store.create_round("a", RoundRequest(base_model="m0"))
    assert exc.value.round_id == rid
    store.create_round("b", RoundRequest(base_model="m0"))  # other devices are unaffected
    assert store.transition(rid, {"queued"}, "cancelled")
    store.create_round("a", RoundRequest(base_model="m0"))  # a finished round frees the slot


def test_claims_are_atomic_oldest_first_and_leases_expire(store: Store) -> None:
    import threading
    import time

    names = [f"d{i}" for i in range(6)]
    for n in names:
        store.add_device(n)
        store.create_round(n, RoundRequest(base_model="m0"))
    claimed: list[str] = []
    lock = threading.Lock()

    def claim(worker: str) -> None:
        while (rid := store.claim_round(worker, lease_s=60)) is not None:
            with lock:
                claimed.append(rid)

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(store.rounds_in({"running"})) and len(set(claimed)) == 6
    # by age: a single worker takes them in creation order
    order = [store.round_request(r)[0] for r in sorted(claimed, key=lambda r: store.get_round(r).created_at)]
    assert order == names
    first = store.active_round("d0")
    assert store.heartbeat(first, "not-the-owner", 60) is None
    owner = next(w for w in ("w0", "w1", "w2") if store.heartbeat(first, w, 0.05) is not None)
    time.sleep(0.1)
    assert store.expire_leases(max_attempts=2) == ([first], [])
    status = store.get_round(first)
    assert status.state == "queued" and "stopped heartbeating" in status.message
    assert not store.update_round(first, owner=owner, progress=0.9)  # the old owner is locked out
    assert store.claim_round("w9", lease_s=0.05) == first  # it kept its place in line
    time.sleep(0.1)
    assert store.expire_leases(max_attempts=2) == ([], [first])
    failed = store.get_round(first)
    assert failed.state == "failed" and "attempt 2 of 2" in failed.message


def test_cloud_files_are_private(tmp_path: Path) -> None:
    """Issue 11, item 9: the database and blobs hold users' images and prompts."""
    s = Store(load_settings(home=tmp_path))
    s.add_device("a")
    s.add_samples("a", [make_sample(1)])
    s.close()
    cloud = tmp_path / "cloud"
    assert (cloud / "cloud.sqlite").stat().st_mode & 0o777 == 0o600
    for p in cloud.rglob("*"):
        mode = p.stat().st_mode & 0o777
        assert mode == (0o700 if p.is_dir() else 0o600), (p, oct(mode))


def test_blobs_by_fsspec_url(tmp_path: Path) -> None:
    """Issue 13, item 4: the same store with blobs behind a URL (file:// here; s3:// etc. alike)."""
    url = f"file://{tmp_path / 'shared-blobs'}"
    s = Store(load_settings(home=tmp_path / "home", blob_url=url))
    s.add_device("a")
    s.add_samples("a", [make_sample(1)])
    assert s.unused_samples("a") == [make_sample(1)]
    files = [p for p in (tmp_path / "shared-blobs").rglob("*") if p.is_file()]
    assert len(files) == 1 and files[0].name == s.blobs.shas().pop()
    assert not any((tmp_path / "home" / "cloud" / "blobs").rglob("*"))
    assert s.delete_sample("a", "0000000000000001") and s.blobs.shas() == set()
    s.close()


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
    assert store.complete_round(rid, "a", ["0000000000000001"], patch_sha256="ab" * 32,
                                patch_bytes=2, patch_path="/x", metrics={"loss": 0.1})
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
