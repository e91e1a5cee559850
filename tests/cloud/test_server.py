"""cloud.server: auth, isolation, body limits, validation, idempotent upload, round lifecycle."""
from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cloud.rounds import RoundContext
from cloud.server import create_app
from cloud.store import Store
from device.contracts.config import load_settings
from device.contracts.wire import RoundRequest, TokenStats, UplinkSample
from fake_models import model_files

PATCH = b"GGUF-test-patch" * 10


def make_sample(i: int) -> UplinkSample:
    return UplinkSample(
        sample_id=f"{i:016x}", base_model="m0", prompt=f"what is in picture {i}?", answer="a dog",
        tokens=TokenStats(positions=[0], token_ids=[7], entropy=[2.5]), score=0.9, raw_bytes=500)


def upload_body(*ids: int) -> dict[str, Any]:
    return {"samples": [make_sample(i).model_dump(mode="json") for i in ids]}


class GatedRunner:
    """Test scaffolding: reports progress, then waits for the test to open the gate."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started = threading.Event()
        self.fail_with: Exception | None = None
        self.write_patch = True
        self.seen: list[RoundContext] = []

    def __call__(self, ctx: RoundContext) -> dict[str, Any]:
        self.seen.append(ctx)
        ctx.progress("distil", 0.5, "halfway")
        self.started.set()
        while not self.gate.wait(0.01):
            ctx.progress("distil", 0.5, "halfway")  # a cancellation point, as real runners have
        if self.fail_with is not None:
            raise self.fail_with
        if self.write_patch:
            ctx.patch_path.write_bytes(PATCH)
        ctx.progress("compress", 1.0)
        return {"n": len(ctx.samples), "steps": ctx.options.steps}


@pytest.fixture
def runner() -> GatedRunner:
    return GatedRunner()


@pytest.fixture
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, runner: GatedRunner):
    monkeypatch.setenv("CDCCA_HOME", str(tmp_path))
    app = create_app(load_settings(home=tmp_path, max_upload_bytes=64 * 1024), round_runner=runner)
    yield app
    runner.gate.set()
    app.state.rounds.shutdown(wait=True)
    app.state.store.close()


@pytest.fixture
def client(app) -> TestClient:
    return TestClient(app)


@pytest.fixture
def auth(app) -> Callable[[str], dict[str, str]]:
    def make(name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {app.state.store.add_device(name)}"}
    return make


def wait_for(fetch: Callable[[], dict], done: Callable[[dict], bool], timeout: float = 5) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if done(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.01)


def test_health_is_public_and_openapi_is_served(client: TestClient) -> None:
    body = client.get("/v1/health").json()
    assert body["ok"] is True and body["max_upload_bytes"] == 64 * 1024 and body["version"]
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/samples", "/v1/rounds/{round_id}/patch"} <= set(paths)


@pytest.mark.parametrize("header", [None, "Basic abc", "Bearer ", "token-without-scheme"])
def test_missing_token_is_401(client: TestClient, header: str | None) -> None:
    headers = {"Authorization": header} if header is not None else {}
    r = client.post("/v1/samples", json=upload_body(1), headers=headers)
    assert r.status_code == 401
    assert "bearer token" in r.json()["detail"]
    assert r.headers["www-authenticate"] == "Bearer"


def test_wrong_token_is_403(client: TestClient, auth) -> None:
    auth("lap")
    r = client.get("/v1/samples/count", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 403
    assert r.json()["detail"] == "unknown or revoked device token"


def test_me_reports_device_and_counts(client: TestClient, auth) -> None:
    h = auth("lap")
    client.post("/v1/samples", json=upload_body(1, 2), headers=h)
    body = client.get("/v1/me", headers=h).json()
    assert body["name"] == "lap" and body["samples"] == {"total": 2, "unused": 2}


def test_duplicate_upload_acknowledged_once_stored_once(client: TestClient, auth, tmp_path) -> None:
    h = auth("lap")
    first = client.post("/v1/samples", json=upload_body(1, 2), headers=h).json()
    again = client.post("/v1/samples", json=upload_body(2, 3), headers=h).json()
    assert first == {"accepted": ["0000000000000001", "0000000000000002"], "duplicates": []}
    assert again == {"accepted": ["0000000000000003"], "duplicates": ["0000000000000002"]}
    assert client.get("/v1/samples/count", headers=h).json() == {"total": 3, "unused": 3}
    assert len([p for p in (tmp_path / "cloud" / "blobs").rglob("*") if p.is_file()]) == 3


def test_oversized_body_is_413_by_content_length(client: TestClient, auth) -> None:
    h = auth("lap")
    r = client.post("/v1/samples", content=b"x" * (65 * 1024), headers=h)
    assert r.status_code == 413
    assert "at most 65536 bytes" in r.json()["detail"]


def test_oversized_streamed_body_is_413(client: TestClient, auth) -> None:
    h = auth("lap")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the server must count
        for _ in range(20):
            yield b"x" * 8192

    r = client.post("/v1/samples", content=chunks(), headers=h)
    assert r.status_code == 413
    assert "request body too large" in r.json()["detail"]
    assert client.get("/v1/samples/count", headers=h).json()["total"] == 0


def test_malformed_sample_is_422_naming_the_field(client: TestClient, auth) -> None:
    h = auth("lap")
    body = upload_body(1)
    body["samples"][0]["sample_id"] = "NOT-HEX"
    r = client.post("/v1/samples", json=body, headers=h)
    assert r.status_code == 422
    assert "body.samples.0.sample_id" in r.json()["detail"]
    assert "NOT-HEX" not in r.text  # inputs are not echoed back


def test_too_many_samples_and_bad_json_are_422(client: TestClient, auth) -> None:
    h = auth("lap")
    r = client.post("/v1/samples", json={"samples": []}, headers=h)
    assert r.status_code == 422 and "body.samples" in r.json()["detail"]
    r = client.post("/v1/samples", content=b"{not json", headers={**h, "Content-Type": "application/json"})
    assert r.status_code == 422


def start_round(client: TestClient, h: dict[str, str], **options: Any) -> dict:
    r = client.post("/v1/rounds", json={"base_model": "m0", "options": options}, headers=h)
    assert r.status_code == 202, r.text
    return r.json()


def status_of(client: TestClient, h: dict[str, str], rid: str) -> Callable[[], dict]:
    return lambda: client.get(f"/v1/rounds/{rid}", headers=h).json()


def test_round_lifecycle_progress_and_patch(client: TestClient, auth, runner: GatedRunner) -> None:
    h = auth("lap")
    client.post("/v1/samples", json=upload_body(1, 2, 3), headers=h)
    queued = start_round(client, h, steps=7)
    assert queued["state"] == "queued"
    rid = queued["round_id"]
    assert client.get(f"/v1/rounds/{rid}/patch", headers=h).status_code == 409

    mid = wait_for(status_of(client, h, rid), lambda s: s["stage"] == "distil")
    assert (mid["state"], mid["progress"], mid["message"], mid["n_samples"]) == (
        "running", 0.5, "halfway", 3)
    runner.gate.set()
    done = wait_for(status_of(client, h, rid), lambda s: s["state"] == "done")
    assert done["state"] == "done" and done["progress"] == 1.0
    assert done["metrics"] == {"n": 3, "steps": 7}
    assert done["patch_bytes"] == len(PATCH)
    assert done["patch_sha256"] == hashlib.sha256(PATCH).hexdigest()
    assert done["finished_at"] is not None

    r = client.get(f"/v1/rounds/{rid}/patch", headers=h)
    assert r.status_code == 200 and r.content == PATCH
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["x-patch-sha256"] == done["patch_sha256"]
    assert client.get("/v1/samples/count", headers=h).json() == {"total": 3, "unused": 0}
    assert client.post("/v1/rounds", json={"base_model": "m0"}, headers=h).status_code == 409
    assert [s["round_id"] for s in client.get("/v1/rounds", headers=h).json()] == [rid]


def test_round_sees_only_unused_samples_capped(client: TestClient, auth, runner: GatedRunner) -> None:
    h = auth("lap")
    client.post("/v1/samples", json=upload_body(1, 2, 3), headers=h)
    runner.gate.set()
    rid = start_round(client, h, max_samples=2)["round_id"]
    wait_for(status_of(client, h, rid), lambda s: s["state"] == "done")
    client.post("/v1/samples", json=upload_body(4), headers=h)
    rid2 = start_round(client, h)["round_id"]
    wait_for(status_of(client, h, rid2), lambda s: s["state"] == "done")
    assert [[s.sample_id[-1] for s in ctx.samples] for ctx in runner.seen] == [["1", "2"], ["3", "4"]]


def test_runner_failure_becomes_one_line_message(client: TestClient, auth, runner) -> None:
    h = auth("lap")
    client.post("/v1/samples", json=upload_body(1), headers=h)
    runner.fail_with = ValueError("teacher exploded\nlong traceback-ish detail")
    runner.gate.set()
    rid = start_round(client, h)["round_id"]
    failed = wait_for(status_of(client, h, rid), lambda s: s["state"] == "failed")
    assert failed["message"] == "ValueError: teacher exploded"
    assert failed["finished_at"] is not None
    assert client.get("/v1/samples/count", headers=h).json()["unused"] == 1  # not consumed
    assert client.get(f"/v1/rounds/{rid}/patch", headers=h).status_code == 409


def test_runner_without_patch_fails(client: TestClient, auth, runner) -> None:
    h = auth("lap")
    client.post("/v1/samples", json=upload_body(1), headers=h)
    runner.write_patch = False
    runner.gate.set()
    rid = start_round(client, h)["round_id"]
    failed = wait_for(status_of(client, h, rid), lambda s: s["state"] == "failed")
    assert "wrote no patch" in failed["message"]


def test_cancel_running_and_queued_rounds(client: TestClient, auth, runner) -> None:
    h, other = auth("lap"), auth("phone")
    client.post("/v1/samples", json=upload_body(1), headers=h)
    client.post("/v1/samples", json=upload_body(2), headers=other)
    running = start_round(client, h)["round_id"]
    assert runner.started.wait(5)
    queued = start_round(client, other)["round_id"]  # waits behind the first: one worker

    r = client.post(f"/v1/rounds/{queued}/cancel", headers=other).json()
    assert r["state"] == "cancelled"
    client.post(f"/v1/rounds/{running}/cancel", headers=h)
    end = wait_for(status_of(client, h, running), lambda s: s["state"] != "running")
    assert end["state"] == "cancelled" and end["message"] == "cancelled by the device"
    assert len(runner.seen) == 1  # the cancelled queued round never ran
    assert client.get("/v1/samples/count", headers=h).json()["unused"] == 1
    assert client.post(f"/v1/rounds/{running}/cancel", headers=h).status_code == 409


def test_one_active_round_per_device_is_409_naming_it(client: TestClient, auth, runner) -> None:
    h = auth("lap")
    client.post("/v1/samples", json=upload_body(1, 2), headers=h)
    first = start_round(client, h)["round_id"]
    for _ in range(5):  # queued or running: every further request is refused, none is queued
        r = client.post("/v1/rounds", json={"base_model": "m0"}, headers=h)
        assert r.status_code == 409 and first in r.json()["detail"]
    assert [s["round_id"] for s in client.get("/v1/rounds", headers=h).json()] == [first]
    runner.gate.set()
    wait_for(status_of(client, h, first), lambda s: s["state"] == "done")


def test_round_caps_and_rate_limit(tmp_path: Path, runner: GatedRunner) -> None:
    settings = load_settings(home=tmp_path, max_round_steps=500, max_round_samples=8,
                             rounds_per_hour=2)
    app = create_app(settings, round_runner=runner)
    c = TestClient(app)
    h = {"Authorization": f"Bearer {app.state.store.add_device('lap')}"}
    c.post("/v1/samples", json=upload_body(*range(20)), headers=h)
    r = c.post("/v1/rounds", json={"base_model": "m0", "options": {"steps": 1_000_000}}, headers=h)
    assert r.status_code == 422 and "options.steps" in r.json()["detail"] and "500" in r.json()["detail"]
    runner.gate.set()
    rid = start_round(c, h, max_samples=None)["round_id"]
    wait_for(status_of(c, h, rid), lambda s: s["state"] == "done")
    assert len(runner.seen[-1].samples) == 8  # "all" means the cloud's cap
    rid = start_round(c, h, max_samples=9)["round_id"]  # an "up to": clamped to the cap
    wait_for(status_of(c, h, rid), lambda s: s["state"] == "done")
    assert len(runner.seen[-1].samples) == 8
    wait_for(status_of(c, h, rid), lambda s: s["state"] == "done")
    r = c.post("/v1/rounds", json={"base_model": "m0"}, headers=h)
    assert r.status_code == 429 and r.headers["retry-after"] and "rounds_per_hour" in r.json()["detail"]
    app.state.rounds.shutdown()
    app.state.store.close()


def test_devices_are_isolated(client: TestClient, auth, runner) -> None:
    a, b = auth("alice"), auth("bob")
    client.post("/v1/samples", json=upload_body(1), headers=a)
    runner.gate.set()
    rid = start_round(client, a)["round_id"]
    wait_for(status_of(client, a, rid), lambda s: s["state"] == "done")
    for method, path in [("GET", f"/v1/rounds/{rid}"), ("POST", f"/v1/rounds/{rid}/cancel"),
                         ("GET", f"/v1/rounds/{rid}/patch")]:
        r = client.request(method, path, headers=b)
        assert r.status_code == 404, path
        assert "no round" in r.json()["detail"]
    assert client.get("/v1/samples/count", headers=b).json() == {"total": 0, "unused": 0}
    assert client.get("/v1/rounds", headers=b).json() == []
    # the same sample id from another device is that device's own sample
    assert client.post("/v1/samples", json=upload_body(1), headers=b).json()["accepted"]


def test_no_runner_is_501(tmp_path: Path) -> None:
    app = create_app(load_settings(home=tmp_path))
    c = TestClient(app)
    h = {"Authorization": f"Bearer {app.state.store.add_device('lap')}"}
    assert c.post("/v1/rounds", json={"base_model": "m0"}, headers=h).status_code == 501
    app.state.rounds.shutdown()


def test_round_interrupted_by_a_restart_is_requeued_and_runs(tmp_path: Path) -> None:
    """The round's worker died with the server: once its lease runs out the round goes back in
    line (it keeps its place) and the next worker runs it; nothing is lost."""
    settings = load_settings(home=tmp_path, round_lease_s=0.3)
    store = Store(settings)
    store.add_device("lap")
    store.add_samples("lap", [make_sample(1)])
    rid = store.create_round("lap", RoundRequest(base_model="m0")).round_id
    assert store.claim_round("dead-worker", lease_s=0.3) == rid
    store.close()
    time.sleep(0.4)
    runner = GatedRunner()
    runner.gate.set()
    app = create_app(settings, round_runner=runner)
    try:
        status = wait_for(lambda: app.state.store.get_round(rid).model_dump(),
                          lambda s: s["state"] == "done")
        assert status["n_samples"] == 1 and len(runner.seen) == 1
        assert app.state.store.sample_counts("lap").unused == 0
    finally:
        app.state.rounds.shutdown()
        app.state.store.close()


# --- device models: content-addressed, shared, streamed uploads ---------------------------------

def put_file(client: TestClient, mid: str, role: str, data: bytes, h: dict[str, str]):
    return client.put(f"/v1/models/{mid}/{role}", content=data,
                      headers={**h, "Content-Type": "application/octet-stream"})


def leftovers(tmp_path: Path) -> list[str]:
    """Temp or staging files the model upload left behind (there should be none)."""
    cloud = tmp_path / "cloud"
    return sorted(p.name for d in (cloud / "incoming", cloud / "models") for p in d.iterdir()
                  if p.name.startswith("."))


def test_model_upload_both_roles_registers_it(app, client: TestClient, auth, tmp_path) -> None:
    h = auth("lap")
    mid, files = model_files(tmp_path)
    assert client.get(f"/v1/models/{mid}", headers=h).status_code == 404
    r = put_file(client, mid, "model", files["model"].read_bytes(), h)
    assert r.status_code == 200 and r.json() == {"model_id": mid, "role": "model", "complete": False}
    assert client.get(f"/v1/models/{mid}", headers=h).status_code == 404  # half a model is none

    def chunks():  # a streamed (chunked) body works like a sized one
        data = files["mmproj"].read_bytes()
        yield from (data[i:i + 1000] for i in range(0, len(data), 1000))

    r = client.put(f"/v1/models/{mid}/mmproj", content=chunks(), headers=h)
    assert r.status_code == 200 and r.json()["complete"] is True
    got = app.state.registry.get(mid)
    assert got is not None and all(got[k].read_bytes() == files[k].read_bytes() for k in files)
    assert app.state.registry.root == tmp_path / "cloud" / "models"
    assert client.get(f"/v1/models/{mid}", headers=h).json() == {"model_id": mid, "present": True}
    # uploading a file of a model already held is a harmless no-op
    assert put_file(client, mid, "model", b"ignored", h).json()["complete"] is True
    assert leftovers(tmp_path) == []


def test_model_hash_mismatch_is_422_and_registers_nothing(app, client: TestClient, auth,
                                                          tmp_path) -> None:
    h = auth("lap")
    mid, files = model_files(tmp_path)
    assert put_file(client, mid, "model", files["model"].read_bytes(), h).json()["complete"] is False
    r = put_file(client, mid, "mmproj", b"not the mmproj", h)
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert "\n" not in detail and detail.startswith("hash mismatch: uploaded files hash to")
    assert f"not {mid}" in detail and "upload them again" in detail
    assert app.state.registry.get(mid) is None
    assert client.get(f"/v1/models/{mid}", headers=h).status_code == 404
    assert leftovers(tmp_path) == []
    # both files must be sent again; then it registers
    for role in ("model", "mmproj"):
        r = put_file(client, mid, role, files[role].read_bytes(), h)
    assert r.json()["complete"] is True and app.state.registry.get(mid) is not None


def test_models_are_shared_between_devices(client: TestClient, auth, tmp_path) -> None:
    """Content-addressed: another device's token sees (and need not re-send) the same model."""
    a, b = auth("lap"), auth("phone")
    mid, files = model_files(tmp_path)
    put_file(client, mid, "model", files["model"].read_bytes(), a)
    r = put_file(client, mid, "mmproj", files["mmproj"].read_bytes(), b)
    assert r.json()["complete"] is False  # b's staging is b's own: a's half is not b's
    r = put_file(client, mid, "mmproj", files["mmproj"].read_bytes(), a)
    assert r.json()["complete"] is True
    assert put_file(client, mid, "model", b"skipped", b).json()["complete"] is True
    for h in (a, b):
        assert client.get(f"/v1/models/{mid}", headers=h).json()["present"] is True
    # knowing the id opens nothing else: b sees none of a's samples or rounds
    client.post("/v1/samples", json=upload_body(1), headers=a)
    assert client.get("/v1/samples/count", headers=b).json()["total"] == 0
    assert client.get("/v1/rounds", headers=b).json() == []


def test_model_routes_need_a_token(client: TestClient, auth, tmp_path) -> None:
    auth("lap")
    mid, files = model_files(tmp_path)
    r = put_file(client, mid, "model", files["model"].read_bytes(), {})
    assert r.status_code == 401 and "bearer token" in r.json()["detail"]
    assert client.get(f"/v1/models/{mid}").status_code == 401
    r = put_file(client, mid, "model", b"x", {"Authorization": "Bearer nope"})
    assert r.status_code == 403
    assert leftovers(tmp_path) == [] and not any((tmp_path / "cloud" / "models").iterdir())


def test_bad_model_role_or_id_is_422(client: TestClient, auth, tmp_path) -> None:
    h = auth("lap")
    mid, _files = model_files(tmp_path)
    r = put_file(client, mid, "weights", b"x", h)
    assert r.status_code == 422 and r.json()["detail"] == (
        "unknown model file role 'weights': use one of model, mmproj")
    for bad in ("a.b", "ABC", "zz" * 16, "a" * 65):
        assert put_file(client, bad, "model", b"x", h).status_code == 422
        assert client.get(f"/v1/models/{bad}", headers=h).status_code == 422
    assert put_file(client, mid, "model", b"", h).status_code == 422  # empty body
    assert leftovers(tmp_path) == []


def test_model_uploads_have_their_own_size_limit(tmp_path: Path) -> None:
    app = create_app(load_settings(home=tmp_path, max_upload_bytes=1000, max_model_bytes=50_000))
    c = TestClient(app)
    h = {"Authorization": f"Bearer {app.state.store.add_device('lap')}"}
    mid = "ab" * 16
    assert put_file(c, mid, "mmproj", b"x" * 20_000, h).status_code == 200  # > sample limit
    r = put_file(c, mid, "model", b"x" * 60_000, h)  # by Content-Length, before reading
    assert r.status_code == 413 and "at most 50000 bytes" in r.json()["detail"]
    assert "max_model_bytes" in r.json()["detail"]
    r = c.put(f"/v1/models/{mid}/model", content=(b"x" * 8192 for _ in range(10)), headers=h)
    assert r.status_code == 413 and "got more than that" in r.json()["detail"]  # counted
    assert c.post("/v1/samples", content=b"x" * 2000, headers=h).status_code == 413
    assert not any(p.name.endswith(".part") for p in (tmp_path / "cloud" / "incoming").iterdir())
    app.state.rounds.shutdown()
    app.state.store.close()


def test_another_device_cannot_disturb_an_upload_in_progress(app, client: TestClient, auth,
                                                            tmp_path) -> None:
    """Issue 11, item 6: a wrong file from b under the same id used to discard a's staging."""
    a, b = auth("lap"), auth("mallory")
    mid, files = model_files(tmp_path)
    assert put_file(client, mid, "model", files["model"].read_bytes(), a).json()["complete"] is False
    assert put_file(client, mid, "model", b"junk", b).status_code == 200
    assert put_file(client, mid, "mmproj", b"more junk", b).status_code == 422  # b's own mismatch
    r = put_file(client, mid, "mmproj", files["mmproj"].read_bytes(), a)
    assert r.status_code == 200 and r.json()["complete"] is True
    assert app.state.registry.get(mid) is not None and leftovers(tmp_path) == []


def test_staging_is_capped_per_device_and_swept_when_stale(app, client: TestClient, auth,
                                                          tmp_path) -> None:
    a, b = auth("lap"), auth("phone")
    registry = app.state.registry
    for i in range(5):  # invented ids: each parks one file
        put_file(client, f"{i:02d}" * 16, "model", b"x" * 100, a)
    put_file(client, "ff" * 16, "model", b"y" * 100, b)
    assert len(registry.stagings("lap")) == registry.per_device == 2
    assert len(registry.stagings("phone")) == 1  # a's churn never evicts b's staging
    assert registry.sweep(max_age_s=3600) == 0
    assert registry.sweep(max_age_s=0) == 3 and registry.stagings() == []


# --- issue 11, item 2: poison pills -------------------------------------------------------------

def png_bytes(seed: int = 0) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    rgb = np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def raw_upload(client: TestClient, h: dict[str, str], text: str):
    return client.post("/v1/samples", content=text.encode(),
                       headers={**h, "Content-Type": "application/json"})


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"])
@pytest.mark.parametrize("field,loc", [("score", "score"), ("ood_score", "ood_score"),
                                       ("entropy", "tokens.entropy.0")])
def test_non_finite_numbers_are_422_naming_the_field(client: TestClient, auth, app, literal,
                                                     field, loc) -> None:
    """Python's json turns 1e400 into inf and accepts NaN; none of it may reach the store."""
    import re

    h = auth("lap")
    body = make_sample(1).model_dump_json()
    if field == "entropy":
        body = body.replace('"entropy":[2.5]', f'"entropy":[{literal}]')
    else:
        body = re.sub(f'"{field}":[^,}}]+', f'"{field}":{literal}', body)
    assert literal in body
    r = raw_upload(client, h, '{"samples":[' + body + "]}")
    assert r.status_code == 422
    assert r.json()["detail"] == f"invalid request: body.samples.0.{loc}: Input should be a finite number"
    assert app.state.store.sample_counts("lap").total == 0  # nothing stored


@pytest.mark.parametrize("image,fmt,why", [
    (b"definitely not an image", "png", "not a decodable image"),
    (png_bytes()[:40], "png", "not a decodable image"),  # truncated
    (png_bytes(), "jpeg", "image_format says jpeg"),
])
def test_undecodable_image_is_422_naming_the_field(client: TestClient, auth, app, image, fmt,
                                                   why) -> None:
    h = auth("lap")
    good = make_sample(1).model_copy(update={"image": png_bytes(), "image_format": "png"})
    bad = make_sample(2).model_copy(update={"image": image, "image_format": fmt})
    body = {"samples": [good.model_dump(mode="json"), bad.model_dump(mode="json")]}
    r = client.post("/v1/samples", json=body, headers=h)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert "body.samples.1.image" in detail and why in detail and "0000000000000002" in detail
    assert "\n" not in detail
    assert app.state.store.sample_counts("lap").total == 0  # the batch is refused whole
    assert client.post("/v1/samples", json={"samples": [body["samples"][0]]}, headers=h).status_code == 200


def test_round_skips_and_reports_samples_it_cannot_use(client: TestClient, auth, app,
                                                       runner: GatedRunner) -> None:
    """A poisoned sample that is already stored (from before the door checks, or a blob that
    rotted) no longer wedges the device: the round skips it, says so, and later rounds work."""
    h = auth("lap")
    store = app.state.store
    poisoned = make_sample(9).model_copy(update={"image": b"\x89PNG garbage", "image_format": "png"})
    store.add_samples("lap", [poisoned])  # behind the door's back
    client.post("/v1/samples", json=upload_body(1, 2), headers=h)
    runner.gate.set()
    rid = start_round(client, h)["round_id"]
    done = wait_for(status_of(client, h, rid), lambda s: s["state"] in ("done", "failed"))
    assert done["state"] == "done" and done["n_samples"] == 2
    assert done["metrics"]["skipped_samples"] == {"count": 1, "reasons": {"image": 1}}
    assert [s.sample_id for s in runner.seen[0].samples] == ["0000000000000001", "0000000000000002"]
    listed = client.get("/v1/samples", headers=h).json()["samples"]
    assert [(s["sample_id"][-1], s["round_id"] is not None, bool(s["skipped"])) for s in listed] == [
        ("9", False, True), ("1", True, False), ("2", True, False)]
    # only poison left: the round is refused up front instead of failing
    assert client.get("/v1/samples/count", headers=h).json() == {"total": 3, "unused": 0}
    assert client.post("/v1/rounds", json={"base_model": "m0"}, headers=h).status_code == 409


def test_device_lists_and_deletes_its_own_samples(client: TestClient, auth) -> None:
    a, b = auth("lap"), auth("phone")
    client.post("/v1/samples", json=upload_body(1, 2, 3), headers=a)
    client.post("/v1/samples", json=upload_body(1), headers=b)
    page = client.get("/v1/samples?limit=2", headers=a).json()
    assert [s["sample_id"][-1] for s in page["samples"]] == ["1", "2"]
    rest = client.get(f"/v1/samples?after={page['next_after']}", headers=a).json()
    assert [s["sample_id"][-1] for s in rest["samples"]] == ["3"] and rest["next_after"] is None
    r = client.delete("/v1/samples/0000000000000002", headers=a)
    assert r.status_code == 200 and r.json() == {"sample_id": "0000000000000002", "deleted": True}
    assert client.delete("/v1/samples/0000000000000002", headers=a).status_code == 404
    assert client.delete("/v1/samples/not-hex", headers=a).status_code == 422
    assert client.delete("/v1/samples/0000000000000003", headers=b).status_code == 404  # not b's
    assert client.get("/v1/samples/count", headers=a).json()["total"] == 2
    assert client.get("/v1/samples/count", headers=b).json()["total"] == 1
    assert client.get("/v1/samples").status_code == 401


def test_device_client_lists_and_deletes_samples(client: TestClient, auth, app) -> None:
    """The device's own CloudClient (device/uplink.py) speaks the list/delete routes."""
    from device.uplink import CloudClient, CloudError

    import socket

    import uvicorn

    token = auth("lap")["Authorization"].split()[1]
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        _client_round_trip(CloudClient(f"http://127.0.0.1:{sock.getsockname()[1]}", token,
                                       retry_budget_s=1), CloudError)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def _client_round_trip(dev, CloudError) -> None:
    dev.upload([make_sample(i) for i in (1, 2, 3)], progress=False)
    page = dev.list_samples(limit=2)
    assert [s.sample_id[-1] for s in page.samples] == ["1", "2"] and page.next_after
    assert [s.sample_id[-1] for s in dev.list_samples(after=page.next_after).samples] == ["3"]
    assert dev.delete_sample("0000000000000002") is True
    assert dev.delete_sample("0000000000000002") is False
    with pytest.raises(CloudError, match="invalid sample id"):
        dev.delete_sample("../../etc")
    assert dev.sample_counts().total == 2


def test_wall_time_cap_stops_a_round_that_runs_too_long(tmp_path: Path, runner: GatedRunner) -> None:
    app = create_app(load_settings(home=tmp_path, max_round_seconds=0.5, round_lease_s=0.6),
                     round_runner=runner)  # the gate never opens: the runner would run forever
    c = TestClient(app)
    h = {"Authorization": f"Bearer {app.state.store.add_device('lap')}"}
    c.post("/v1/samples", json=upload_body(1), headers=h)
    rid = start_round(c, h)["round_id"]
    end = wait_for(status_of(c, h, rid), lambda s: s["state"] not in ("queued", "running"))
    assert end["state"] == "failed" and "wall-time cap of 0.5 s (max_round_seconds)" in end["message"]
    assert c.get("/v1/samples/count", headers=h).json()["unused"] == 1
    runner.gate.set()
    app.state.rounds.shutdown()
    app.state.store.close()
