"""The cloud's HTTP API (FastAPI): devices upload uncertain samples, start rounds, fetch patches.

Every route but ``GET /v1/health`` needs ``Authorization: Bearer <token>``; a device only ever
sees its own samples and rounds (another device's round id answers 404, not 403, so ids cannot
be probed).  Request bodies are size-checked before any parsing, so an oversized upload costs
the server at most ``max_upload_bytes`` of reading.
"""
from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from device.contracts.config import Settings
from device.contracts.wire import (
    DeviceInfo, Health, RoundRequest, RoundStatus, SampleCounts, UploadRequest, UploadResponse,
)

from .rounds import RoundConflict, RoundManager, RoundRunner
from .store import Store

log = logging.getLogger(__name__)
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def _version() -> str:
    try:
        return importlib.metadata.version("cdcca")
    except importlib.metadata.PackageNotFoundError:  # running from a bare checkout
        return "0+unknown"


class BodyLimit:
    """Pure-ASGI guard: rejects a body over ``max_bytes`` by Content-Length at once, and counts
    streamed (chunked) bytes otherwise.  The accepted body is buffered and replayed to the app,
    which is fine because the limit is small and FastAPI would buffer it anyway."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            return await self.app(scope, receive, send)
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            return await self._reject(scope, send, declared)
        body = await self._read(receive)
        if body is None:
            return await self._reject(scope, send, None)
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive: Receive) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # client went away; let the app see an empty body
                return b"".join(chunks)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _reject(self, scope: Scope, send: Send, declared: int | None) -> None:
        got = f"{declared} bytes" if declared is not None else "more than that"
        detail = (f"request body too large: the cloud accepts at most {self.max_bytes} bytes per "
                  f"request, got {got}; send fewer samples per batch")
        response = JSONResponse({"detail": detail}, status_code=413, headers={"Connection": "close"})
        await response(scope, _no_receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for disconnect, as ASGI apps expect

    return replay


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def _validation_handler(_request: Request, exc: RequestValidationError) -> JSONResponse:
    """One readable line naming each bad field (``body.samples.0.sample_id: ...``), plus the
    structured list; inputs are not echoed back because they can be megabytes of base64."""
    errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
              for e in exc.errors()]
    parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors[:5]]
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    detail = "invalid request: " + "; ".join(parts) + more
    return JSONResponse({"detail": detail, "errors": errors}, status_code=422)


def _auth_dependency(store: Store):
    def current_device(authorization: Annotated[str | None, Header()] = None) -> str:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HTTPException(401, "missing bearer token: send 'Authorization: Bearer <token>' "
                                     "(get one with `cdcca cloud add-device NAME`)",
                                headers={"WWW-Authenticate": "Bearer"})
        device = store.device_for_token(token.strip())
        if device is None:
            raise HTTPException(403, "unknown or revoked device token")
        return device

    return current_device


def create_app(settings: Settings, round_runner: RoundRunner | None = None) -> FastAPI:
    """Build the API around one Store and one RoundManager (both on ``app.state``)."""
    store = Store(settings)
    manager = RoundManager(store, round_runner)
    recovered = manager.recover()
    if recovered:
        log.warning("marked %d interrupted round(s) as failed", recovered)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        manager.shutdown(wait=False)

    app = FastAPI(title="cdcca cloud", version=_version(), lifespan=lifespan,
                  description="Cloud side of cloud-device collaborative continual adaptation.")
    app.state.store = store
    app.state.rounds = manager
    app.state.settings = settings
    app.add_middleware(BodyLimit, max_bytes=settings.max_upload_bytes)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    _add_routes(app, store, manager, settings, Depends(_auth_dependency(store)))
    return app


def _add_routes(app: FastAPI, store: Store, manager: RoundManager, settings: Settings,
                auth) -> None:
    # ``device: str = auth`` rather than an Annotated alias: with postponed annotations FastAPI
    # resolves hints in module globals, where a local alias would not be found.

    @app.get("/v1/health", response_model=Health, tags=["meta"])
    def health() -> Health:
        return Health(ok=True, version=_version(), max_upload_bytes=settings.max_upload_bytes)

    @app.get("/v1/me", response_model=DeviceInfo, tags=["meta"])
    def me(device: str = auth) -> DeviceInfo:
        row = store.get_device(device)
        return DeviceInfo(name=device, created_at=row.created_at, samples=store.sample_counts(device))

    @app.post("/v1/samples", response_model=UploadResponse, tags=["samples"])
    def upload(body: UploadRequest, device: str = auth) -> UploadResponse:
        accepted, duplicates = store.add_samples(device, body.samples)
        return UploadResponse(accepted=accepted, duplicates=duplicates)

    @app.get("/v1/samples/count", response_model=SampleCounts, tags=["samples"])
    def count(device: str = auth) -> SampleCounts:
        return store.sample_counts(device)

    @app.post("/v1/rounds", response_model=RoundStatus, status_code=202, tags=["rounds"])
    def start_round(body: RoundRequest, device: str = auth) -> RoundStatus:
        if manager.runner is None:
            raise HTTPException(501, "this cloud server has no round runner configured")
        if store.sample_counts(device).unused == 0:
            raise HTTPException(409, "no unused samples to learn from; upload some first")
        return manager.submit(device, body)

    @app.get("/v1/rounds", response_model=list[RoundStatus], tags=["rounds"])
    def list_rounds(device: str = auth) -> list[RoundStatus]:
        return store.list_rounds(device)

    @app.get("/v1/rounds/{round_id}", response_model=RoundStatus, tags=["rounds"])
    def round_status(round_id: str, device: str = auth) -> RoundStatus:
        return _own_round(store, round_id, device)

    @app.post("/v1/rounds/{round_id}/cancel", response_model=RoundStatus, tags=["rounds"])
    def cancel_round(round_id: str, device: str = auth) -> RoundStatus:
        try:
            status = manager.cancel(device, round_id)
        except RoundConflict as exc:
            raise HTTPException(409, str(exc)) from None
        if status is None:
            raise _no_round(round_id)
        return status

    @app.get("/v1/rounds/{round_id}/patch", response_class=FileResponse, tags=["rounds"],
             responses={200: {"content": {"application/octet-stream": {}}}})
    def patch(round_id: str, device: str = auth) -> FileResponse:
        status = _own_round(store, round_id, device)
        if status.state != "done":
            raise HTTPException(409, f"round {round_id} is {status.state}, not done: no patch yet")
        found = store.round_patch(round_id, device)
        if found is None or not found.path.is_file():
            raise HTTPException(410, f"the patch of round {round_id} is no longer on the server")
        return FileResponse(found.path, media_type="application/octet-stream",
                            filename=f"cdcca-{round_id}.gguf",
                            headers={"X-Patch-SHA256": found.sha256})


def _own_round(store: Store, round_id: str, device: str) -> RoundStatus:
    status = store.get_round(round_id, device)
    if status is None:
        raise _no_round(round_id)
    return status


def _no_round(round_id: str) -> HTTPException:
    return HTTPException(404, f"no round {round_id!r} for this device")


def serve(settings: Settings, host: str | None = None, port: int | None = None,
          round_runner: RoundRunner | None = None, log_level: str = "info") -> None:
    """Run the API with uvicorn; host/port default to those of ``settings.cloud_url``, so the
    device and the server agree on the address without extra configuration."""
    import uvicorn

    url = urlsplit(settings.cloud_url)
    app = create_app(settings, round_runner)
    uvicorn.run(app, host=host or url.hostname or "127.0.0.1", port=port or url.port or 8765,
                log_level=log_level)

