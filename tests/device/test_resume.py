"""device.resume: the round-in-flight record, the one-sync lock, adopting and restarting rounds."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import pytest

from device.contracts.wire import ROUND_INTERRUPTED, RoundRequest
from device.resume import (
    INFLIGHT_FILE, InFlight, RoundFailed, SyncBusy, follow, load_inflight, save_inflight, sync_lock,
)
from device.uplink import CloudClient
from fakecloud import round_status

BASE = "ab" * 16
REQ = RoundRequest(base_model=BASE)


def client_for(handler) -> CloudClient:
    return CloudClient("http://cloud", "t", retries=0, transport=httpx.MockTransport(handler))


def test_record_round_trip_and_garbage_is_ignored(tmp_path: Path) -> None:
    rec = InFlight("0123456789abcdef", BASE, 1.0)
    save_inflight(tmp_path, rec)
    assert load_inflight(tmp_path) == rec
    assert (tmp_path / INFLIGHT_FILE).stat().st_mode & 0o777 == 0o600
    for bad in ("{", json.dumps({"round_id": "../../x", "base_model": BASE, "started": 1}), "[]"):
        (tmp_path / INFLIGHT_FILE).write_text(bad)
        assert load_inflight(tmp_path) is None


def test_one_sync_at_a_time(tmp_path: Path) -> None:
    with sync_lock(tmp_path):
        errors = []

        def second() -> None:
            try:
                with sync_lock(tmp_path):
                    pass
            except SyncBusy as e:
                errors.append(str(e))

        t = threading.Thread(target=second)
        t.start()
        t.join(5)
        assert errors and "another sync" in errors[0]
    with sync_lock(tmp_path):  # released afterwards
        pass


def test_lost_post_answer_adopts_the_round_the_cloud_made(tmp_path: Path) -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(f"{request.method} {request.url.path}")
        if request.method == "POST":
            raise httpx.RemoteProtocolError("server closed the connection without answering")
        if request.url.path == "/v1/rounds":
            made = ["r" for c in calls if c == "POST /v1/rounds"]
            return httpx.Response(200, json=[round_status("00000000000000aa", "running", BASE)] if made else [])
        return httpx.Response(200, json=round_status("00000000000000aa", "done", BASE))

    with client_for(handler) as client:
        st, resumed = follow(client, tmp_path, REQ, None, lambda s: None, timeout=5)
    assert st.round_id == "00000000000000aa" and st.state == "done" and not resumed
    assert calls.count("POST /v1/rounds") == 1  # adopted, not submitted twice
    assert load_inflight(tmp_path).round_id == "00000000000000aa"


def test_interrupted_or_unwatched_rounds_are_replaced_then_give_up(tmp_path: Path) -> None:
    made: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            made.append(f"{len(made) + 1:016x}")
            return httpx.Response(202, json=round_status(made[-1], "queued", BASE))
        if request.url.path == "/v1/rounds":
            return httpx.Response(200, json=[])
        rid = request.url.path.split("/")[3]
        if rid == "00000000000000ee":  # the saved round ended while no sync watched it
            return httpx.Response(200, json=round_status(rid, "cancelled", BASE))
        return httpx.Response(200, json=round_status(rid, "failed", BASE, message=f"{ROUND_INTERRUPTED}: restart"))

    saved = InFlight("00000000000000ee", BASE, 1.0)
    with client_for(handler) as client:
        with pytest.raises(RoundFailed, match="lost 3 rounds in a row") as err:
            follow(client, tmp_path, REQ, saved, lambda s: None, timeout=5)
    assert "\n" not in str(err.value) and len(made) == 2 and load_inflight(tmp_path) is None


def test_a_round_that_failed_on_its_own_is_reported_not_retried(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(202, json=round_status("00000000000000bb", "queued", BASE))
        if request.url.path == "/v1/rounds":
            return httpx.Response(200, json=[])
        return httpx.Response(200, json=round_status("00000000000000bb", "failed", BASE, message="no usable samples"))

    with client_for(handler) as client:
        with pytest.raises(RoundFailed, match="round 00000000000000bb failed: no usable samples"):
            follow(client, tmp_path, REQ, None, lambda s: None, timeout=5)
    assert load_inflight(tmp_path) is None
