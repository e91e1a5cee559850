"""The cloud's HTTP API (FastAPI): devices upload uncertain samples, start rounds, fetch patches.

Every route but ``GET /v1/health`` needs ``Authorization: Bearer <token>``; a device only ever
sees its own samples and rounds (another device's round id answers 404, not 403, so ids cannot
be probed).  Request bodies are size-checked before any parsing, so an oversized upload costs
the server at most ``max_upload_bytes`` of reading.

Device models (``/v1/models/{model_id}``) are the exception to per-device isolation, on purpose:
they are content-addressed by ``model_id`` (a hash of the GGUF bytes, see
``device.contracts.model_id``) and shared, so a model that ten devices run is stored once, and
any authenticated device may ask whether the cloud holds an id or upload the files for it.
Knowing a model id grants nothing else: there is no route that returns model bytes, and samples,
rounds and patches stay reachable only with their own device's token.  An upload is accepted only
if the two files hash to the id they were uploaded under, so nobody can plant other bytes under
a given id.  Model files are streamed to disk (never held in memory) under ``max_model_bytes``.
"""
from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from device.contracts.config import Settings
from device.contracts.model_id import ROLES
from device.contracts.wire import (
    MODEL_ID_PATTERN, DeviceInfo, Health, ModelPresence, ModelUploadResult, RoundRequest,
    RoundStatus, SampleCounts, UploadRequest, UploadResponse,
)

from .registry import ModelRegistry
from .rounds import RoundConflict, RoundManager, RoundRunner
from .store import Store

log = logging.getLogger(__name__)
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
MODELS_PREFIX = "/v1/models/"  # streamed model-file uploads: their own, larger body limit
_MODEL_ID = re.compile(MODEL_ID_PATTERN)
_WRITE_CHUNK = 1 << 20  # bytes buffered per disk write of a streamed upload
_STALE_UPLOAD_S = 3600  # an incoming temp file this old at startup belongs to a dead upload


def _version() -> str:
    try:
        return importlib.metadata.version("cdcca")
    except importlib.metadata.PackageNotFoundError:  # running from a bare checkout
        return "0+unknown"


class _TooLarge(Exception):
    """Raised from a counted ``receive`` once a streamed body passes its limit."""


class BodyLimit:
    """Pure-ASGI guard: rejects a body over its limit by Content-Length at once, and counts
    streamed (chunked) bytes otherwise.

    Paths under ``/v1/models/`` get ``max_model_bytes`` and pass through unbuffered (model files
    are gigabytes; the endpoint streams them to disk): their bytes are counted as the app reads
    them, and passing the limit aborts the request with the same 413.  Every other body gets
    ``max_bytes`` and is buffered and replayed to the app, which is fine because that limit is
    small and FastAPI would buffer the JSON anyway."""

    def __init__(self, app: ASGIApp, max_bytes: int, max_model_bytes: int | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_model_bytes = max_bytes if max_model_bytes is None else max_model_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            return await self.app(scope, receive, send)
        streamed = scope.get("path", "").startswith(MODELS_PREFIX)
        limit = self.max_model_bytes if streamed else self.max_bytes
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            return await self._reject(scope, send, limit, declared, streamed)
        if streamed:
            return await self._pass_counted(scope, receive, send, limit)
        body = await self._read(receive)
        if body is None:
            return await self._reject(scope, send, limit, None, streamed)
        await self.app(scope, _replay(body, receive), send)

    async def _pass_counted(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        size = 0
        started = False

        async def counted() -> Message:
            nonlocal size
            message = await receive()
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > limit:
                    raise _TooLarge()
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except _TooLarge:
            if started:  # cannot happen with our endpoints (they answer after reading); be safe
                raise
            await self._reject(scope, send, limit, None, streamed=True)

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

    async def _reject(self, scope: Scope, send: Send, limit: int, declared: int | None,
                      streamed: bool) -> None:
        got = f"{declared} bytes" if declared is not None else "more than that"
        hint = ("the cloud's operator can raise max_model_bytes (CDCCA_MAX_MODEL_BYTES)" if streamed
                else "send fewer samples per batch")
        detail = (f"request body too large: the cloud accepts at most {limit} bytes per "
                  f"request, got {got}; {hint}")
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
    # The same folder as the round runner's registry (cloud.round_job.make_runner).
    app.state.registry = ModelRegistry(settings.cloud_dir / "models")
    app.add_middleware(BodyLimit, max_bytes=settings.max_upload_bytes,
                       max_model_bytes=settings.max_model_bytes)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    auth = Depends(_auth_dependency(store))
    _add_routes(app, store, manager, settings, auth)
    _add_model_routes(app, app.state.registry, settings.cloud_dir / "incoming", auth)
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


_OCTET_STREAM_BODY = {"requestBody": {"required": True, "content": {
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


def _add_model_routes(app: FastAPI, registry: ModelRegistry, incoming: Path, auth) -> None:
    """Shared, content-addressed device models: see the module docstring for why any device's
    token may check or upload any model id."""
    incoming.mkdir(parents=True, exist_ok=True)
    _remove_stale_uploads(incoming)
    # put_role stages, hashes and renames in several steps; one at a time keeps two concurrent
    # uploads of the same model from racing each other's rename.
    register_lock = threading.Lock()

    def register(model_id: str, role: str, path: Path) -> bool:
        with register_lock:
            return registry.put_role(model_id, role, path)

    @app.get("/v1/models/{model_id}", response_model=ModelPresence, tags=["models"],
             responses={404: {"description": "the cloud holds no (complete) copy of this model"}})
    def model_presence(model_id: str, device: str = auth) -> ModelPresence:
        _check_model_id(model_id)
        if registry.get(model_id) is None:
            raise HTTPException(404, f"the cloud has no copy of model {model_id}; upload it with "
                                     f"PUT /v1/models/{model_id}/model and .../mmproj")
        return ModelPresence(model_id=model_id, present=True)

    @app.put("/v1/models/{model_id}/{role}", response_model=ModelUploadResult, tags=["models"],
             openapi_extra=_OCTET_STREAM_BODY)
    async def upload_model_file(model_id: str, role: str, request: Request,
                                device: str = auth) -> ModelUploadResult:
        """Raw file bytes as the body (``application/octet-stream``), streamed to disk."""
        _check_model_id(model_id)
        if role not in ROLES:
            raise HTTPException(422, f"unknown model file role {role!r}: use one of "
                                     f"{', '.join(ROLES)}")
        if registry.get(model_id) is not None:  # already held: the bytes are known, skip them
            await _drain(request)
            return ModelUploadResult(model_id=model_id, role=role, complete=True)
        tmp = await _receive_to_temp(request, incoming)
        try:
            complete = await run_in_threadpool(register, model_id, role, tmp)
        except ValueError as exc:
            raise HTTPException(422, f"hash mismatch: {exc}; both files of this model were "
                                     f"discarded, upload them again") from None
        finally:
            tmp.unlink(missing_ok=True)
        if complete:
            log.info("device %s completed the upload of model %s", device, model_id)
        return ModelUploadResult(model_id=model_id, role=role, complete=complete)


def _check_model_id(model_id: str) -> None:
    if not _MODEL_ID.match(model_id):
        raise HTTPException(422, f"invalid model id {model_id[:80]!r}: expected the hex content "
                                 "hash given by device.contracts.model_id")


async def _receive_to_temp(request: Request, folder: Path) -> Path:
    """Stream the request body into a new temp file in ``folder``; never holds more than about
    ``_WRITE_CHUNK`` bytes in memory.  Disk writes run off the event loop."""
    fd, name = tempfile.mkstemp(dir=folder, prefix=".upload.", suffix=".part")
    tmp = Path(name)
    size = 0
    try:
        with os.fdopen(fd, "wb") as f:
            buf = bytearray()
            async for chunk in request.stream():
                buf += chunk
                size += len(chunk)
                if len(buf) >= _WRITE_CHUNK:
                    data, buf = buf, bytearray()
                    await run_in_threadpool(f.write, data)
            if buf:
                await run_in_threadpool(f.write, buf)
            await run_in_threadpool(f.flush)
            await run_in_threadpool(os.fsync, f.fileno())
        if size == 0:
            raise HTTPException(422, "empty model file: send the GGUF bytes as the request body")
    except ClientDisconnect:
        tmp.unlink(missing_ok=True)
        raise HTTPException(400, "the client went away before the upload finished") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


async def _drain(request: Request) -> None:
    try:
        async for _chunk in request.stream():
            pass
    except ClientDisconnect:
        pass


def _remove_stale_uploads(folder: Path) -> None:
    """Temp files of uploads that died with an earlier server process."""
    cutoff = time.time() - _STALE_UPLOAD_S
    for p in folder.glob(".upload.*.part"):
        try:
            if p.stat().st_mtime < cutoff:
                p.unlink()
        except OSError:
            pass


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

