"""The cloud's HTTP API (FastAPI): devices upload uncertain samples, start rounds, fetch patches.
It never trains: rounds wait in the store's queue for workers (``cloud/worker.py``).

Every route but ``GET /v1/health`` needs ``Authorization: Bearer <token>``, checked by the front
gate (``cloud/gate.py``) before any body byte is read; a device only ever sees its own samples
and rounds (another device's round id answers 404, not 403, so ids cannot be probed).

Samples are checked at the door (issue 11, item 2): non-finite numbers (the wire schema) and
undecodable images or inconsistent arrays (``cloud/admission.py``) are refused with 422 naming
the field, and a device can list and delete what it sent.

Device models (``/v1/models/{model_id}``) are the exception to per-device isolation, on purpose:
they are content-addressed by ``model_id`` (a hash of the GGUF bytes, see
``device.contracts.model_id``) and shared, so a model that ten devices run is stored once.
Knowing a model id grants nothing else: there is no route that returns model bytes.  An upload
is staged in the uploading device's own staging and accepted only if the two files hash to the
id, so nobody can plant other bytes under an id or disturb another device's upload.
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

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from device.contracts.config import Settings
from device.contracts.model_id import ROLES
from device.contracts.signing import SIGNATURE_HEADER, public_key_b64, sign_patch
from device.contracts.wire import (
    MODEL_ID_PATTERN, SAMPLE_ID_PATTERN, DeviceInfo, Health, ModelPresence, ModelUploadResult,
    RoundRequest, RoundStatus, SampleCounts, SampleDeleted, SampleList, UploadRequest,
    UploadResponse,
)

from .admission import sample_problem
from .gate import BAD_TOKEN, MISSING_TOKEN, SCOPE_DEVICE, Gate, GateLimits
from .registry import ModelRegistry
from .signing import load_or_create_key
from .rounds import RoundConflict, RoundManager, RoundRejected, RoundRunner
from .store import Store

log = logging.getLogger(__name__)
_MODEL_ID = re.compile(MODEL_ID_PATTERN)
_SAMPLE_ID = re.compile(SAMPLE_ID_PATTERN)
_WRITE_CHUNK = 1 << 20  # bytes buffered per disk write of a streamed upload


def _version() -> str:
    try:
        return importlib.metadata.version("cdcca")
    except importlib.metadata.PackageNotFoundError:  # running from a bare checkout
        return "0+unknown"


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
    """The device the gate authenticated; looked up again only if the gate was bypassed."""
    def current_device(request: Request,
                       authorization: Annotated[str | None, Header()] = None) -> str:
        device = request.scope.get(SCOPE_DEVICE)
        if device is not None:
            return device
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HTTPException(401, MISSING_TOKEN, headers={"WWW-Authenticate": "Bearer"})
        device = store.device_for_token(token.strip())
        if device is None:
            raise HTTPException(403, BAD_TOKEN)
        return device

    return current_device


def create_app(settings: Settings, round_runner: RoundRunner | None = None,
               accept_rounds: bool = False, local_workers: int = 1) -> FastAPI:
    """Build the API around one Store and one RoundManager (both on ``app.state``).

    ``round_runner`` runs rounds in ``local_workers`` threads of this process (tests, the
    loopback cloud); ``accept_rounds`` queues them for ``cdcca cloud worker`` processes."""
    store = Store(settings)
    manager = RoundManager(store, settings, round_runner, local_workers, accept_rounds)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        manager.shutdown(wait=False)

    app = FastAPI(title="cdcca cloud", version=_version(), lifespan=lifespan,
                  description="Cloud side of cloud-device collaborative continual adaptation.")
    app.state.store = store
    app.state.rounds = manager
    app.state.settings = settings
    app.state.signing_key = load_or_create_key(settings.cloud_dir)  # signs every patch served
    # The same folder as the round runner's registry (cloud.round_job.make_runner).
    app.state.registry = ModelRegistry.from_settings(settings)
    app.add_middleware(Gate, authenticate=store.device_for_token, limits=GateLimits(
        max_bytes=settings.max_upload_bytes, max_model_bytes=settings.max_model_bytes,
        max_concurrent=settings.max_concurrent_uploads, body_timeout_s=settings.body_timeout_s))
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(RoundRejected, lambda _r, e: JSONResponse(
        {"detail": e.detail}, status_code=e.status, headers=e.headers))
    auth = Depends(_auth_dependency(store))
    _add_sample_routes(app, store, settings, auth)
    _add_round_routes(app, store, manager, auth)
    _add_model_routes(app, app.state.registry, settings, auth)
    return app


def parse_upload(body: bytes) -> UploadRequest:
    """JSON straight into the schema (no intermediate dict: less memory), then the door check.
    Errors carry ``body.samples.N.field`` locations like FastAPI's own."""
    try:
        request = UploadRequest.model_validate_json(body)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors(
            include_input=False, include_url=False)]) from None
    errors = []
    for i, sample in enumerate(request.samples):
        found = sample_problem(sample)
        if found is not None:
            field, reason = found
            errors.append({"loc": ("body", "samples", i, *field.split(".")), "type": "unusable",
                           "msg": f"sample {sample.sample_id}: {reason}"})
    if errors:
        raise RequestValidationError(errors)
    return request


def _add_sample_routes(app: FastAPI, store: Store, settings: Settings, auth) -> None:
    # ``device: str = auth`` rather than an Annotated alias: with postponed annotations FastAPI
    # resolves hints in module globals, where a local alias would not be found.

    @app.get("/v1/health", response_model=Health, tags=["meta"])
    def health() -> Health:
        return Health(ok=True, version=_version(), max_upload_bytes=settings.max_upload_bytes,
                      signing_key=public_key_b64(app.state.signing_key))

    @app.get("/v1/me", response_model=DeviceInfo, tags=["meta"])
    def me(device: str = auth) -> DeviceInfo:
        row = store.get_device(device)
        return DeviceInfo(name=device, created_at=row.created_at, samples=store.sample_counts(device))

    @app.post("/v1/samples", response_model=UploadResponse, tags=["samples"], openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": UploadRequest.model_json_schema(ref_template="#/components/schemas/{model}")}}}})
    async def upload(request: Request, device: str = auth) -> UploadResponse:
        body = await request.body()
        parsed = await run_in_threadpool(parse_upload, body)
        del body
        accepted, duplicates = await run_in_threadpool(store.add_samples, device, parsed.samples)
        return UploadResponse(accepted=accepted, duplicates=duplicates)

    @app.get("/v1/samples/count", response_model=SampleCounts, tags=["samples"])
    def count(device: str = auth) -> SampleCounts:
        return store.sample_counts(device)

    @app.get("/v1/samples", response_model=SampleList, tags=["samples"])
    def list_samples(after: str | None = Query(None, pattern=SAMPLE_ID_PATTERN),
                     limit: int = Query(100, ge=1, le=1000), device: str = auth) -> SampleList:
        rows = store.list_samples(device, after, limit)
        return SampleList(samples=rows, next_after=rows[-1].sample_id if len(rows) == limit else None)

    @app.delete("/v1/samples/{sample_id}", response_model=SampleDeleted, tags=["samples"])
    def delete_sample(sample_id: str, device: str = auth) -> SampleDeleted:
        if not _SAMPLE_ID.match(sample_id):
            raise HTTPException(422, f"invalid sample id {sample_id[:80]!r}: expected 16-64 hex digits")
        if not store.delete_sample(device, sample_id):
            raise HTTPException(404, f"no sample {sample_id} for this device")
        return SampleDeleted(sample_id=sample_id)


def _add_round_routes(app: FastAPI, store: Store, manager: RoundManager, auth) -> None:
    @app.post("/v1/rounds", response_model=RoundStatus, status_code=202, tags=["rounds"])
    def start_round(body: RoundRequest, device: str = auth) -> RoundStatus:
        if not manager.accepts:
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

    @app.post("/v1/rounds/{round_id}/release", response_model=RoundStatus, tags=["rounds"])
    def release_round(round_id: str, device: str = auth) -> RoundStatus:
        """The device did not apply this round's patch: its samples become usable again."""
        status = _own_round(store, round_id, device)
        if store.release_round(round_id, device) is None:
            raise HTTPException(409, f"round {round_id} is {status.state}: only a done round can be released")
        return _own_round(store, round_id, device)

    @app.get("/v1/rounds/{round_id}/patch", tags=["rounds"],
             responses={200: {"content": {"application/octet-stream": {}}}})
    def patch(round_id: str, device: str = auth) -> Response:
        status = _own_round(store, round_id, device)
        if status.state != "done":
            raise HTTPException(409, f"round {round_id} is {status.state}, not done: no patch yet")
        found = store.round_patch(round_id, device)
        if found is None or not store.blobs.exists(found.sha256):
            raise HTTPException(410, f"the patch of round {round_id} is no longer on the server")
        headers = {"X-Patch-SHA256": found.sha256, SIGNATURE_HEADER: sign_patch(
            app.state.signing_key, found.sha256, round_id, status.base_model)}
        if store.blobs.url is None:
            return FileResponse(store.blobs.path_for(found.sha256), headers=headers,
                                media_type="application/octet-stream",
                                filename=f"cdcca-{round_id}.gguf")
        return Response(store.blobs.get(found.sha256), media_type="application/octet-stream",
                        headers={**headers, "Content-Disposition":
                                 f'attachment; filename="cdcca-{round_id}.gguf"'})


_OCTET_STREAM_BODY = {"requestBody": {"required": True, "content": {
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


def _add_model_routes(app: FastAPI, registry: ModelRegistry, settings: Settings, auth) -> None:
    """Shared, content-addressed device models: see the module docstring for why any device's
    token may check or upload any model id."""
    incoming = settings.cloud_dir / "incoming"
    incoming.mkdir(parents=True, exist_ok=True, mode=0o700)
    # a live upload writes its temp file at least every body_timeout_s; older ones are dead
    remove_stale_uploads(incoming, max(60.0, 2 * settings.body_timeout_s))
    registry.sweep()
    # put_role stages, hashes and renames in several steps; one at a time keeps two concurrent
    # uploads of the same model from racing each other's rename.
    register_lock = threading.Lock()

    def register(model_id: str, role: str, path: Path, owner: str) -> bool:
        with register_lock:
            return registry.put_role(model_id, role, path, owner)

    @app.get("/v1/models/{model_id}", response_model=ModelPresence, tags=["models"],
             responses={404: {"description": "the cloud holds no (complete) copy of this model"}})
    def model_presence(model_id: str, device: str = auth) -> ModelPresence:
        _check_model_id(model_id)
        if not registry.has(model_id):
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
        if registry.has(model_id):  # already held: the bytes are known, skip them
            await _drain(request)
            return ModelUploadResult(model_id=model_id, role=role, complete=True)
        tmp = await _receive_to_temp(request, incoming)
        try:
            complete = await run_in_threadpool(register, model_id, role, tmp, device)
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


def remove_stale_uploads(folder: Path, max_age_s: float) -> int:
    """Temp files of uploads that died (with an earlier server process, or stalled)."""
    cutoff = time.time() - max_age_s
    n = 0
    for p in folder.glob(".upload.*.part"):
        try:
            if p.stat().st_mtime < cutoff:
                p.unlink()
                n += 1
        except OSError:
            pass
    return n


def _own_round(store: Store, round_id: str, device: str) -> RoundStatus:
    status = store.get_round(round_id, device)
    if status is None:
        raise _no_round(round_id)
    return status


def _no_round(round_id: str) -> HTTPException:
    return HTTPException(404, f"no round {round_id[:80]!r} for this device")


def uvicorn_limits(settings: Settings) -> dict:
    """uvicorn's own limits (issue 11, item 3): idle keep-alive connections close after 5 s,
    at most this many connections+tasks at once (more get 503), small header buffers."""
    return {"timeout_keep_alive": 5, "limit_concurrency": max(64, 16 * settings.max_concurrent_uploads),
            "h11_max_incomplete_event_size": 16 * 1024, "timeout_graceful_shutdown": 10}


def serve(settings: Settings, host: str | None = None, port: int | None = None,
          round_runner: RoundRunner | None = None, log_level: str = "info",
          accept_rounds: bool = True) -> None:
    """Run the API with uvicorn; host/port default to those of ``settings.cloud_url``, so the
    device and the server agree on the address without extra configuration."""
    import uvicorn

    url = urlsplit(settings.cloud_url)
    app = create_app(settings, round_runner, accept_rounds=accept_rounds)
    uvicorn.run(app, host=host or url.hostname or "127.0.0.1", port=port or url.port or 8765,
                log_level=log_level, **uvicorn_limits(settings))
