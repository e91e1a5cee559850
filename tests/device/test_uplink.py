"""device.uplink: retries and errors, uploads, rounds, patch download, resumable queue sync."""
from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from cloud.rounds import RoundContext
from cloud.server import create_app
from device.contracts.config import load_settings
from device.contracts.wire import RoundOptions, RoundRequest, TokenStats, UplinkSample
from device.queue_sync import sync_queue
from device.uplink import CloudClient, CloudError, CloudUnavailable, RoundTimeout

REPO = Path(__file__).resolve().parents[2]
PATCH = bytes(range(256)) * 40


def make_sample(i: int) -> UplinkSample:
    return UplinkSample(
        sample_id=f"{i:016x}", base_model="m0", prompt=f"describe image {i}", answer="a boat",
        tokens=TokenStats(positions=[0, 2], token_ids=[3, 4], entropy=[1.0, 3.0]), score=0.8,
        raw_bytes=2048)


def patch_runner(ctx: RoundContext) -> dict[str, Any]:
    """Test scaffolding: three progress stages, then a fixed patch."""
    for stage in ("distil", "merge", "compress"):
        ctx.progress(stage, 0.5)
        time.sleep(0.02)
    ctx.patch_path.write_bytes(PATCH)
    return {"samples": len(ctx.samples)}


def slow_runner(ctx: RoundContext) -> dict[str, Any]:
    while True:
        ctx.progress("distil", 0.1)
        time.sleep(0.01)


@dataclass
class Row:
    sample_id: str
    payload: bytes


class FakeQueue:
    """The device.queue interface sync_queue codes against: pending -> sent -> acknowledged."""

    def __init__(self, samples: list[UplinkSample]) -> None:
        self.rows = {s.sample_id: [s.model_dump_json().encode(), "pending"] for s in samples}

    def reset_sent_to_pending(self) -> None:
        for row in self.rows.values():
            if row[1] == "sent":
                row[1] = "pending"

    def pending(self, limit: int) -> list[Row]:
        return [Row(i, r[0]) for i, r in self.rows.items() if r[1] == "pending"][:limit]

    def mark_sent(self, ids: list[str]) -> None:
        self._mark(ids, "sent")

    def mark_acknowledged(self, ids: list[str]) -> None:
        self._mark(ids, "acknowledged")

    def _mark(self, ids: list[str], state: str) -> None:
        for i in ids:
            self.rows[i][1] = state

    def states(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _payload, state in self.rows.values():
            out[state] = out.get(state, 0) + 1
        return out


class ParsedQueue(FakeQueue):
    """Same, but ``pending`` returns parsed UplinkSample objects (as device.queue.Queue does)."""

    def pending(self, limit: int) -> list[UplinkSample]:  # type: ignore[override]
        return [UplinkSample.model_validate_json(r.payload) for r in super().pending(limit)]


@pytest.fixture
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CDCCA_HOME", str(tmp_path))
    holder = {"runner": patch_runner}
    app = create_app(load_settings(home=tmp_path), round_runner=lambda ctx: holder["runner"](ctx))
    app.state.runner_holder = holder
    yield app
    app.state.rounds.shutdown(wait=True)
    app.state.store.close()


@pytest.fixture
def token(app) -> str:
    return app.state.store.add_device("laptop")


@pytest.fixture
def live_url(app) -> Iterator[str]:
    """A real uvicorn server on a loopback port chosen by the OS (no race for the port)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(10)
    sock.close()


def proxy_transport(app, fail: Callable[[httpx.Request, int], Exception | None]) -> httpx.MockTransport:
    """Forwards to the in-process app; ``fail(request, n)`` may raise before (the cloud is down)
    or after forwarding (the cloud processed it but the answer was lost)."""
    tc = TestClient(app)
    count = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        count["n"] += 1
        before = fail(request, count["n"])
        if isinstance(before, httpx.ConnectError):
            raise before
        r = tc.request(request.method, request.url.path, headers=dict(request.headers),
                       content=request.content)
        if before is not None:
            raise before
        return httpx.Response(r.status_code, headers=r.headers, content=r.content)

    return httpx.MockTransport(handler)


def fast_client(url: str, token: str | None, **kw: Any) -> CloudClient:
    return CloudClient(url, token, timeout=5, retries=kw.pop("retries", 3), backoff=0.001,
                       max_backoff=0.01, **kw)


def test_uplink_never_imports_torch_or_cloud() -> None:
    code = ("import sys, device.uplink; bad = sorted(m for m in sys.modules if m.split('.')[0] "
            "in {'torch', 'transformers', 'cloud'}); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_live_server_full_round_trip(live_url: str, token: str, tmp_path: Path) -> None:
    with fast_client(live_url, token) as client:
        assert client.health().ok
        result = client.upload([make_sample(i) for i in range(5)], batch_size=2, progress=False)
        assert len(result.accepted) == 5 and result.duplicates == []
        again = client.upload([make_sample(4)], progress=False)
        assert again.accepted == [] and again.acknowledged == [f"{4:016x}"]
        assert client.sample_counts().total == 5

        status = client.start_round(RoundRequest(base_model="m0", options=RoundOptions(seed=1)))
        seen: list[str] = []
        final = client.wait_round(status.round_id, on_progress=lambda s: seen.append(s.stage),
                                  poll=0.005, timeout=10)
        assert final.state == "done" and final.metrics == {"samples": 5}
        # polling may skip fast stages; what it saw must be in order and end at "done"
        order = ["queued", "loading samples", "distil", "merge", "compress", "done"]
        assert seen[-1] == "done" and seen == sorted(seen, key=order.index)
        got = client.download_patch(status.round_id, tmp_path / "dl" / "patch.gguf")
        assert got.path.read_bytes() == PATCH
        assert got.sha256 == hashlib.sha256(PATCH).hexdigest() == final.patch_sha256
        assert [p.name for p in got.path.parent.iterdir()] == ["patch.gguf"]
        assert [r.round_id for r in client.list_rounds()] == [status.round_id]


def test_rejections_are_clear_and_not_retried(app, token: str) -> None:
    calls = {"n": 0}

    def count(request: httpx.Request, n: int) -> None:
        calls["n"] = n

    with fast_client("http://cloud", "wrong", transport=proxy_transport(app, count)) as client:
        with pytest.raises(CloudError, match=r"cloud rejected the token \(403\): unknown") as err:
            client.me()
        assert err.value.status == 403 and calls["n"] == 1
    with fast_client("http://cloud", None, transport=proxy_transport(app, count)) as client:
        with pytest.raises(CloudError, match=r"\(401\): missing bearer token"):
            client.sample_counts()
    with fast_client("http://cloud", token, transport=proxy_transport(app, count)) as client:
        with pytest.raises(CloudError, match=r"\(404\): no round"):
            client.round_status("0123456789abcdef")
        with pytest.raises(CloudError, match=r"\(409\): no unused samples"):
            client.start_round(RoundRequest(base_model="m0"))


def test_transient_failures_are_retried(app, token: str) -> None:
    def flaky(request: httpx.Request, n: int) -> None:
        if n <= 2:
            raise httpx.ConnectError("connection refused")

    with fast_client("http://cloud", token, transport=proxy_transport(app, flaky)) as client:
        assert client.me().name == "laptop"

    answers = iter([httpx.Response(503, json={"detail": "busy"}),
                    httpx.Response(429, headers={"Retry-After": "0"}),
                    httpx.Response(200, json={"total": 1, "unused": 1})])
    transport = httpx.MockTransport(lambda request: next(answers))
    with fast_client("http://cloud", token, transport=transport) as client:
        assert client.sample_counts().total == 1


def test_start_round_is_not_retried_after_it_may_have_run(token: str) -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(500, json={"detail": "boom"})

    with fast_client("http://cloud", token, transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(CloudError, match=r"\(500\): boom"):
            client.start_round(RoundRequest(base_model="m0"))
        assert len(calls) == 1
        with pytest.raises(CloudUnavailable, match="after 4 tries: HTTP 500: boom"):
            client.round_status("abababab")  # a read is retried, then gives up
        assert len(calls) == 5


def test_down_cloud_raises_unavailable_after_retries() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens here now
    url = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    with fast_client(url, "t", retries=2) as client:
        with pytest.raises(CloudUnavailable, match=rf"cloud at {url} is unreachable after 3 tries"):
            client.health()
    assert time.monotonic() - start < 5


def test_wait_round_timeout_and_cancel(app, live_url: str, token: str) -> None:
    app.state.runner_holder["runner"] = slow_runner
    with fast_client(live_url, token) as client:
        client.upload([make_sample(1)], progress=False)
        rid = client.start_round(RoundRequest(base_model="m0")).round_id
        with pytest.raises(RoundTimeout, match=f"round {rid} still"):
            client.wait_round(rid, poll=0.01, timeout=0.2)
        client.cancel_round(rid)
        assert client.wait_round(rid, poll=0.01, timeout=5).state == "cancelled"
        with pytest.raises(CloudError, match=r"\(409\)"):
            client.download_patch(rid, Path("unused.gguf"))


def test_corrupt_patch_is_rejected_and_not_installed(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=PATCH, headers={"X-Patch-SHA256": "0" * 64})

    dest = tmp_path / "patch.gguf"
    with fast_client("http://cloud", "t", transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(CloudError, match="corrupt"):
            client.download_patch("00000000000000a1", dest)
    assert list(tmp_path.iterdir()) == []  # no dest, no temp file


def test_upload_batches_fit_the_advertised_byte_limit() -> None:
    sizes: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/health":
            return httpx.Response(200, json={"ok": True, "version": "t", "max_upload_bytes": 1200})
        sizes.append(len(request.content))
        ids = [s["sample_id"] for s in httpx.Response(200, content=request.content).json()["samples"]]
        return httpx.Response(200, json={"accepted": ids, "duplicates": []})

    with fast_client("http://cloud", "t", transport=httpx.MockTransport(handler)) as client:
        result = client.upload([make_sample(i) for i in range(6)], batch_size=32, progress=False)
    assert len(result.accepted) == 6 and len(sizes) > 1 and max(sizes) <= 1200


@pytest.mark.parametrize("queue_cls", [FakeQueue, ParsedQueue])
def test_sync_resumes_after_cloud_dies_midway(app, token: str, queue_cls: type[FakeQueue]) -> None:
    queue = queue_cls([make_sample(i) for i in range(10)])

    def dies_after_two_uploads(request: httpx.Request, n: int) -> Exception | None:
        # request 1 is /v1/health, 2-3 are uploads; from then on nothing answers
        return httpx.ConnectError("connection refused") if n > 3 else None

    with fast_client("http://cloud", token, retries=1,
                     transport=proxy_transport(app, dies_after_two_uploads)) as client:
        with pytest.raises(CloudUnavailable):
            sync_queue(queue, client, batch_size=3)
    assert queue.states() == {"acknowledged": 6, "sent": 3, "pending": 1}
    assert app.state.store.sample_counts("laptop").total == 6

    with fast_client("http://cloud", token, transport=proxy_transport(app, lambda r, n: None)) as client:
        result = sync_queue(queue, client, batch_size=3)
    assert len(result.accepted) == 4 and result.duplicates == []  # only the rest was sent
    assert queue.states() == {"acknowledged": 10}
    assert app.state.store.sample_counts("laptop").total == 10
    with fast_client("http://cloud", token, transport=proxy_transport(app, lambda r, n: None)) as client:
        assert sync_queue(queue, client).acknowledged == []  # nothing left to send


def test_lost_response_is_retried_and_deduplicated(app, token: str) -> None:
    queue = FakeQueue([make_sample(i) for i in range(4)])

    def lose_first_upload_answer(request: httpx.Request, n: int) -> Exception | None:
        return httpx.ReadError("connection reset") if n == 2 else None  # stored, answer lost

    with fast_client("http://cloud", token,
                     transport=proxy_transport(app, lose_first_upload_answer)) as client:
        result = sync_queue(queue, client, batch_size=4)
    assert result.accepted == [] and len(result.duplicates) == 4
    assert queue.states() == {"acknowledged": 4}
    assert app.state.store.sample_counts("laptop").total == 4


# --- device model upload ---------------------------------------------------------------------

def model_files(tmp_path: Path) -> tuple[str, dict[str, Path]]:
    """Small fake model files: the cloud hashes bytes, it does not parse GGUF on upload."""
    from device.contracts.model_id import model_id

    files = {"model": tmp_path / "model.gguf", "mmproj": tmp_path / "mmproj.gguf"}
    files["model"].write_bytes(bytes(range(256)) * 9000)  # ~2.3 MB: several 1 MiB chunks
    files["mmproj"].write_bytes(b"mmproj" * 500)
    return model_id(files), files


class CountingTransport(httpx.HTTPTransport):
    """Real sockets, with a log of the requests sent."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[str, str]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append((request.method, request.url.path))
        return super().handle_request(request)


def test_ensure_model_uploads_once_then_is_a_no_op(app, live_url: str, token: str,
                                                   tmp_path: Path) -> None:
    mid, files = model_files(tmp_path)
    transport = CountingTransport()
    with fast_client(live_url, token, transport=transport) as client:
        assert client.has_model(mid) is False
        assert client.ensure_model(mid, files, progress=False) is True
        assert client.has_model(mid) is True
        puts = [p for m, p in transport.sent if m == "PUT"]
        assert puts == [f"/v1/models/{mid}/model", f"/v1/models/{mid}/mmproj"]
        assert client.ensure_model(mid, files, progress=False) is False
        assert [p for m, p in transport.sent if m == "PUT"] == puts  # nothing re-sent
    got = app.state.registry.get(mid)
    assert got is not None and all(got[r].read_bytes() == files[r].read_bytes() for r in files)
    # another device shares the content-addressed copy
    other = app.state.store.add_device("phone")
    with fast_client(live_url, other) as client:
        assert client.ensure_model(mid, files, progress=False) is False


def test_model_upload_refusals_raise_cloud_error(app, live_url: str, token: str,
                                                 tmp_path: Path) -> None:
    mid, files = model_files(tmp_path)
    files["mmproj"].write_bytes(b"changed after hashing")
    with fast_client(live_url, token) as client:
        with pytest.raises(CloudError, match=r"\(422\): hash mismatch") as err:
            client.upload_model(mid, files, progress=False)
        assert err.value.status == 422 and client.has_model(mid) is False
        with pytest.raises(ValueError, match="no model file"):
            client.upload_model(mid, {"mmproj": files["mmproj"]}, progress=False)
        # the model file alone of a model whose id names an mmproj too: the cloud waits for it
        with pytest.raises(CloudError, match="did not register"):
            client.upload_model(mid, {"model": files["model"]}, progress=False)
    with fast_client(live_url, None) as client:
        with pytest.raises(CloudError, match=r"\(401\)"):
            client.ensure_model(mid, files, progress=False)


def test_model_upload_retries_resend_the_whole_file(tmp_path: Path) -> None:
    mid, files = model_files(tmp_path)
    bodies: list[tuple[str, bytes]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = request.read()
        bodies.append((request.url.path, body))
        assert request.headers["content-length"] == str(len(body))
        if len(bodies) == 1:
            raise httpx.ReadError("connection reset mid-upload")
        if len(bodies) == 2:
            return httpx.Response(503, json={"detail": "busy"})
        role = request.url.path.rsplit("/", 1)[1]
        return httpx.Response(200, json={"model_id": mid, "role": role,
                                         "complete": role == "mmproj"})

    with fast_client("http://cloud", "t", transport=httpx.MockTransport(handler)) as client:
        client.upload_model(mid, files, progress=False)
    model, mmproj = files["model"].read_bytes(), files["mmproj"].read_bytes()
    assert bodies == [(f"/v1/models/{mid}/model", model)] * 3 + [(f"/v1/models/{mid}/mmproj", mmproj)]

    def refuses(request: httpx.Request) -> httpx.Response:
        bodies.append((request.url.path, b""))
        return httpx.Response(413, json={"detail": "request body too large"})

    bodies.clear()
    with fast_client("http://cloud", "t", transport=httpx.MockTransport(refuses)) as client:
        with pytest.raises(CloudError, match=r"\(413\)"):
            client.upload_model(mid, files, progress=False)
    assert len(bodies) == 1  # a refusal is not retried


def test_plain_http_beyond_loopback_is_warned_about_in_one_line():
    from device.uplink import plain_http_warning

    for quiet in ("http://127.0.0.1:8765", "http://localhost:1", "http://[::1]:8765", "https://cloud.example:443"):
        assert plain_http_warning(quiet) is None, quiet
    w = plain_http_warning("http://10.1.2.3:8765")
    assert w.startswith("warning: ") and "https://" in w and "\n" not in w
    assert CloudClient("http://cloud.example:8765", None).transport_warning == plain_http_warning("http://cloud.example:8765")
