"""The server's front gate (pure ASGI, in front of FastAPI): who may send a body, how big, how
many at once, and how long it may take.

Why not in FastAPI itself: FastAPI reads and parses a JSON body before any dependency runs, so a
client without a token could make the server buffer and parse megabytes (issue 11, item 3: waves
of 40 unauthenticated 7 MiB bodies grew the server from 0.5 to 1.9 GB).  The gate therefore

1. checks the bearer token from the headers alone, before a single body byte is read
   (401/403 with ``Connection: close``; uvicorn stops reading a body nobody receives, its
   flow control holds at most ~64 KiB per connection);
2. refuses a declared ``Content-Length`` over the limit at once (413) and counts streamed bytes;
3. lets at most ``max_concurrent`` bodies be read at a time; a request that cannot get a slot
   within ``queue_wait_s`` gets 503 with ``Retry-After`` (the device client retries those);
4. cuts a body that has not arrived within ``body_timeout_s`` (408): a whole-body deadline for
   the small buffered JSON bodies, an idle deadline per chunk for streamed model files.

The device name found here is put in the scope (``SCOPE_DEVICE``) so routes need not look the
token up a second time.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
MODELS_PREFIX = "/v1/models/"  # streamed model-file uploads: their own, larger body limit
PUBLIC_PATHS = frozenset({"/v1/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
SCOPE_DEVICE = "cdcca.device"
MISSING_TOKEN = ("missing bearer token: send 'Authorization: Bearer <token>' "
                 "(get one with `cdcca cloud add-device NAME`)")
BAD_TOKEN = "unknown or revoked device token"


@dataclass(frozen=True)
class GateLimits:
    max_bytes: int
    max_model_bytes: int
    max_concurrent: int = 8
    max_concurrent_models: int = 2
    body_timeout_s: float = 30.0
    queue_wait_s: float = 5.0


class _Refused(Exception):
    """Raised from a guarded ``receive``: the body broke a limit while the app was reading it."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def bearer(scope: Scope) -> str | None:
    """The token of an ``Authorization: Bearer`` header, or None."""
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return (token.strip() or None) if scheme.lower() == "bearer" else None
    return None


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class Gate:
    """See the module docstring.  ``authenticate(token) -> device | None`` is a blocking store
    lookup; it runs in the thread pool so the event loop never waits on the database."""

    def __init__(self, app: ASGIApp, authenticate: Callable[[str], str | None],
                 limits: GateLimits) -> None:
        self.app = app
        self.authenticate = authenticate
        self.limits = limits
        self._slots: asyncio.Semaphore | None = None
        self._model_slots: asyncio.Semaphore | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope.get("path", "") not in PUBLIC_PATHS:
            token = bearer(scope)
            if token is None:
                return await _answer(scope, send, 401, MISSING_TOKEN, {"WWW-Authenticate": "Bearer"})
            device = await run_in_threadpool(self.authenticate, token)
            if device is None:
                return await _answer(scope, send, 403, BAD_TOKEN)
            scope[SCOPE_DEVICE] = device
        if scope["method"] not in BODY_METHODS:
            return await self.app(scope, receive, send)
        streamed = scope.get("path", "").startswith(MODELS_PREFIX)
        limit = self.limits.max_model_bytes if streamed else self.limits.max_bytes
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            return await _answer(scope, send, 413, _too_large(limit, f"{declared} bytes", streamed))
        slots = self._semaphores()[1 if streamed else 0]
        try:
            await asyncio.wait_for(slots.acquire(), self.limits.queue_wait_s)
        except TimeoutError:
            return await _answer(scope, send, 503, "the cloud is busy reading other uploads; "
                                 "retry shortly", {"Retry-After": "1"})
        try:
            if streamed:
                await self._pass_guarded(scope, receive, send, limit)
            else:
                await self._buffered(scope, receive, send, limit)
        finally:
            slots.release()

    def _semaphores(self) -> tuple[asyncio.Semaphore, asyncio.Semaphore]:
        if self._slots is None:  # created in the serving loop, on first use
            self._slots = asyncio.Semaphore(self.limits.max_concurrent)
            self._model_slots = asyncio.Semaphore(self.limits.max_concurrent_models)
        return self._slots, self._model_slots

    async def _buffered(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        """Small JSON bodies: read whole (under the cap and deadline), then replay to the app."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.body_timeout_s
        chunks: list[bytes] = []
        size = 0
        try:
            while True:
                message = await _receive_by(receive, deadline - loop.time(), self.limits.body_timeout_s)
                if message["type"] != "http.request":
                    break  # the client went away: let the app see what came
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise _Refused(413, _too_large(limit, "more than that", False))
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
        except _Refused as exc:
            return await _answer(scope, send, exc.status, exc.detail)
        body = b"".join(chunks)
        chunks.clear()
        await self.app(scope, _replay(body, receive), send)

    async def _pass_guarded(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        """Model files: passed through unbuffered; bytes counted, each chunk under an idle deadline."""
        size = 0
        started = False
        idle = self.limits.body_timeout_s

        async def guarded() -> Message:
            nonlocal size
            message = await _receive_by(receive, idle, idle)
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > limit:
                    raise _Refused(413, _too_large(limit, "more than that", True))
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, guarded, watched)
        except _Refused as exc:
            if started:  # our endpoints answer only after reading; be safe anyway
                raise
            await _answer(scope, send, exc.status, exc.detail)


async def _receive_by(receive: Receive, remaining: float, budget: float) -> Message:
    if remaining <= 0:
        raise _Refused(408, _slow(budget))
    try:
        return await asyncio.wait_for(receive(), remaining)
    except TimeoutError:
        raise _Refused(408, _slow(budget)) from None


def _slow(budget: float) -> str:
    return (f"request body too slow: it did not arrive within {budget:g} s "
            "(body_timeout_s, CDCCA_BODY_TIMEOUT_S)")


def _too_large(limit: int, got: str, streamed: bool) -> str:
    hint = ("the cloud's operator can raise max_model_bytes (CDCCA_MAX_MODEL_BYTES)" if streamed
            else "send fewer samples per batch")
    return (f"request body too large: the cloud accepts at most {limit} bytes per request, "
            f"got {got}; {hint}")


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


async def _answer(scope: Scope, send: Send, status: int, detail: str,
                  headers: dict[str, str] | None = None) -> None:
    """A JSON error that also closes the connection: a body we did not read must not be parsed
    as the next request."""
    response = JSONResponse({"detail": detail}, status_code=status,
                            headers={"Connection": "close", **(headers or {})})
    await response(scope, _no_receive, send)
