"""How the device reads a cloud's answers: its errors, which failures to retry, and validation.

One place decides what is transient (no connection, 5xx, 429: retried) and what the cloud
*decided* (other 4xx: raised at once, one line), and every answer is parsed with its wire schema
so a malformed or hostile one becomes a one-line :class:`CloudError`, never a traceback.
"""
from __future__ import annotations

import re
from typing import Any

import httpx
from pydantic import BaseModel, ValidationError

# 501/505 are 5xx but permanent ("not implemented"): retrying cannot help.
_PERMANENT_5XX = frozenset({501, 505})
# A non-idempotent request is retried only when it certainly never reached the application.
_NOT_PROCESSED = frozenset({429, 503})


class CloudError(RuntimeError):
    """The cloud refused or failed a request; ``str()`` is a one-line, user-facing reason."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class CloudUnavailable(CloudError):
    """The cloud could not be reached (or kept failing) after all retries."""


class RoundTimeout(CloudError):
    """``wait_round`` gave up before the round finished (the round itself keeps going)."""


_REASONS = {
    401: "cloud needs a device token",
    403: "cloud rejected the token",
    404: "cloud has no such resource",
    409: "cloud refused in the current state",
    413: "cloud refused an upload as too large",
    422: "cloud rejected the request as invalid",
}


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail", "")
    except (ValueError, AttributeError):
        detail = response.text
    if not isinstance(detail, str):
        detail = str(detail)
    return " ".join(detail.split())[:300] or response.reason_phrase


def _error_for(response: httpx.Response) -> CloudError:
    status = response.status_code
    reason = _REASONS.get(status, "cloud error")
    return CloudError(f"{reason} ({status}): {_detail(response)}", status)


def _retryable_status(status: int, idempotent: bool) -> bool:
    if not idempotent:
        return status in _NOT_PROCESSED
    return status == 429 or (status >= 500 and status not in _PERMANENT_5XX)


def _checked(pattern: re.Pattern[str], value: str, what: str) -> str:
    """An id goes into a URL only if it matches its wire pattern (no '/', '..', '?')."""
    if not isinstance(value, str) or not pattern.match(value):
        raise CloudError(f"invalid {what} {str(value)[:80]!r}: refusing to use it")
    return value


def _validate(cls: type[BaseModel], data: Any, what: str) -> Any:
    """Parse an answer with its wire schema; a cloud that answers garbage gets one line."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise CloudError(f"cloud sent an invalid answer to {what}: {loc}: "
                         f"{first.get('msg', 'invalid')}") from None


def _retryable_exc(exc: httpx.HTTPError, idempotent: bool) -> bool:
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
        return True  # the request never left: safe for every method
    return idempotent and isinstance(exc, (httpx.TimeoutException, httpx.NetworkError,
                                           httpx.RemoteProtocolError))
