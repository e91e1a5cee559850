"""The device's HTTP client for the cloud (httpx): upload queued samples, run rounds, fetch patches.

Torch-free and cloud-free by design: it speaks only the wire schemas in ``device.contracts``.
Networks on laptops fail, so transient failures (no connection, timeouts, 5xx, 429) are retried
with exponential backoff and full jitter, for a *time* budget (default 90 s, so a cloud restart of
30 s and more is ridden out); anything the cloud *decided* (other 4xx) is raised at once as a
:class:`CloudError` with a one-line reason, because retrying a refusal only hides it.  Nothing the
cloud says is trusted as-is: every answer is validated against the wire schema (a malformed one is
a one-line CloudError), ids are checked by pattern before they go into a URL, and a downloaded
patch is capped in size and written under a name the caller chose.
"""
from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from device.cloud_errors import (  # noqa: F401  (the errors are part of this module's API)
    CloudError, CloudUnavailable, RoundTimeout, _checked, _detail, _error_for, _retryable_exc,
    _retryable_status, _validate,
)
from device.contracts.model_id import ROLES
from device.contracts.signing import SIGNATURE_HEADER
from device.contracts.wire import (
    MAX_UPLOAD_SAMPLES, MODEL_ID_PATTERN, ROUND_ID_PATTERN, SAMPLE_ID_PATTERN, SHA256_PATTERN,
    DeviceInfo, Health,
    ModelPresence, ModelUploadResult, RoundRequest, RoundStatus, SampleCounts, SampleList,
    UploadRequest,
    UploadResponse, UplinkSample,
)
from device.patch import fsync_dir as _fsync_dir
from device.transfer import MAX_PATCH_BYTES, FileBody, plain_http_warning, stream_to_temp

_JSON_OVERHEAD = 64  # bytes of '{"samples":[...]}' framing, generously
# The cloud hashes both model files (gigabytes) before it answers the upload that completes them.
_MODEL_READ_TIMEOUT = 600.0
RETRY_BUDGET_S = 90.0  # > the 30 s cloud restart the device must ride out, with room to spare
_ROUND_ID, _MODEL_ID, _SHA256 = (re.compile(p) for p in (ROUND_ID_PATTERN, MODEL_ID_PATTERN,
                                                         SHA256_PATTERN))
_SAMPLE_ID = re.compile(SAMPLE_ID_PATTERN)


@dataclass
class UploadResult:
    accepted: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)

    @property
    def acknowledged(self) -> list[str]:
        """Ids the cloud holds now: the device may forget them."""
        return self.accepted + self.duplicates

    def add(self, response: UploadResponse) -> None:
        self.accepted += response.accepted
        self.duplicates += response.duplicates


@dataclass(frozen=True)
class DownloadedPatch:
    path: Path
    sha256: str
    bytes: int
    signature: str | None = None  # the cloud's X-Patch-Signature (see device.contracts.signing)


class CloudClient:
    """One cloud endpoint and one device token.  ``transport`` lets tests plug in
    ``httpx.MockTransport`` / ``httpx.ASGITransport`` instead of sockets."""

    def __init__(self, base_url: str, token: str | None, timeout: float = 30.0,
                 retries: int | None = None, backoff: float = 0.5, max_backoff: float = 8.0,
                 transport: httpx.BaseTransport | None = None,
                 retry_budget_s: float = RETRY_BUDGET_S) -> None:
        """``retries=None`` (the default) retries for ``retry_budget_s`` seconds; an int caps the
        number of retries instead (tests, and callers that must fail fast)."""
        self.base_url = base_url.rstrip("/")
        self.retries = None if retries is None else max(0, retries)
        self.retry_budget_s = retry_budget_s
        self.backoff = backoff
        self.max_backoff = max_backoff
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout,
                                  transport=transport)
        self._health: Health | None = None

    def close(self) -> None:
        self._http.close()

    @property
    def transport_warning(self) -> str | None:
        """A one-line warning when the cloud is reached over plain HTTP beyond this machine.

        Why: the patch signature protects the downlink, but the token, the user's images and
        prompts travel in clear over ``http://``; HTTPS is the deployment default (httpx verifies
        certificates). Loopback (the demo, the tests, an SSH tunnel) is not warned about."""
        return plain_http_warning(self.base_url)

    def __enter__(self) -> CloudClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # --- retry core ---------------------------------------------------------------------------
    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        """Full jitter (uniform in [0, cap]) keeps a fleet of devices from retrying in lockstep;
        a server's Retry-After wins when it asks for longer."""
        cap = min(self.max_backoff, self.backoff * (2 ** attempt))
        delay = random.uniform(0, cap)
        if response is not None:
            try:
                delay = max(delay, min(self.max_backoff, float(response.headers["retry-after"])))
            except (KeyError, ValueError):
                pass
        return delay

    @contextmanager
    def _send(self, method: str, path: str, *, idempotent: bool = True, stream: bool = False,
              **kwargs: Any) -> Iterator[httpx.Response]:
        """Send with retries; yields a successful (2xx) response, raises CloudError otherwise."""
        deadline = time.monotonic() + self.retry_budget_s
        last = ""
        attempt = 0
        while True:
            response: httpx.Response | None = None
            try:
                request = self._http.build_request(method, path, **kwargs)
                response = self._http.send(request, stream=stream)
            except httpx.HTTPError as exc:
                if not _retryable_exc(exc, idempotent):
                    raise CloudError(f"request to {self.base_url}{path} failed: {exc!r}") from exc
                last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                if response.is_success:
                    try:
                        yield response
                    finally:
                        response.close()
                    return
                if stream:
                    response.read()
                response.close()
                if not _retryable_status(response.status_code, idempotent):
                    raise _error_for(response)
                last = f"HTTP {response.status_code}: {_detail(response)}"
            attempt += 1
            left = deadline - time.monotonic()
            if (attempt > self.retries) if self.retries is not None else left <= 0:
                break
            delay = self._delay(attempt - 1, response)
            time.sleep(delay if self.retries is not None else min(delay, left))
        raise CloudUnavailable(
            f"cloud at {self.base_url} is unreachable after {attempt} tries: {last}")

    def _json(self, method: str, path: str, *, idempotent: bool = True, **kwargs: Any) -> Any:
        with self._send(method, path, idempotent=idempotent, **kwargs) as response:
            try:
                return response.json()
            except ValueError:
                raise CloudError(f"cloud sent a non-JSON answer to {method} {path}") from None

    # --- API ----------------------------------------------------------------------------------
    def health(self) -> Health:
        self._health = _validate(Health, self._json("GET", "/v1/health"), "GET /v1/health")
        return self._health

    def me(self) -> DeviceInfo:
        return _validate(DeviceInfo, self._json("GET", "/v1/me"), "GET /v1/me")

    def sample_counts(self) -> SampleCounts:
        return _validate(SampleCounts, self._json("GET", "/v1/samples/count"), "GET /v1/samples/count")

    def list_samples(self, after: str | None = None, limit: int = 100) -> SampleList:
        """One page of this device's samples on the cloud, oldest first (``next_after`` pages on)."""
        params: dict[str, Any] = {"limit": limit}
        if after is not None:
            params["after"] = _checked(_SAMPLE_ID, after, "sample id")
        return _validate(SampleList, self._json("GET", "/v1/samples", params=params), "GET /v1/samples")

    def delete_sample(self, sample_id: str) -> bool:
        """Delete one of this device's samples on the cloud; False if the cloud had none."""
        _checked(_SAMPLE_ID, sample_id, "sample id")
        try:
            self._json("DELETE", f"/v1/samples/{sample_id}")
        except CloudError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def upload(self, samples: Sequence[UplinkSample], batch_size: int = 32, progress: bool = True,
               on_ack: Callable[[list[str]], None] | None = None) -> UploadResult:
        """Upload in batches that fit both ``batch_size`` and the cloud's advertised limits.
        ``on_ack`` sees each batch's acknowledged ids as soon as the cloud confirms them, so a
        failure later in the call never loses confirmations already received."""
        result = UploadResult()
        if not samples:
            return result
        bodies = self._batches(samples, batch_size)
        with tqdm(total=len(samples), unit="sample", desc="uplink", disable=not progress) as bar:
            for batch in bodies:
                body = UploadRequest(samples=batch).model_dump_json().encode()
                data = self._json("POST", "/v1/samples", content=body,
                                  headers={"Content-Type": "application/json"})
                response = _validate(UploadResponse, data, "POST /v1/samples")
                result.add(response)
                if on_ack is not None:
                    on_ack(response.accepted + response.duplicates)
                bar.update(len(batch))
        return result

    def _batches(self, samples: Sequence[UplinkSample], batch_size: int) -> list[list[UplinkSample]]:
        """Split by count and by encoded size, so no request can trip the cloud's 413."""
        limits = self._health or self.health()
        max_count = max(1, min(batch_size, limits.max_upload_samples, MAX_UPLOAD_SAMPLES))
        max_bytes = limits.max_upload_bytes - _JSON_OVERHEAD
        batches: list[list[UplinkSample]] = []
        current: list[UplinkSample] = []
        size = 0
        for sample in samples:
            n = len(sample.model_dump_json().encode()) + 1  # +1 for the separating comma
            if n > max_bytes:
                raise CloudError(f"sample {sample.sample_id} is {n} bytes, over the cloud's "
                                 f"upload limit of {limits.max_upload_bytes} bytes", 413)
            if current and (len(current) >= max_count or size + n > max_bytes):
                batches.append(current)
                current, size = [], 0
            current.append(sample)
            size += n
        if current:
            batches.append(current)
        return batches

    # --- device models (content-addressed, shared by all devices on the cloud) ----------------
    def has_model(self, model_id: str) -> bool:
        """Whether the cloud holds both GGUF files of ``model_id`` (see device.contracts.model_id)."""
        _checked(_MODEL_ID, model_id, "model id")
        try:
            data = self._json("GET", f"/v1/models/{model_id}")
        except CloudError as exc:
            if exc.status == 404:
                return False
            raise
        return _validate(ModelPresence, data, "GET /v1/models/{id}").present

    def upload_model(self, model_id: str, files: dict[str, Path], progress: bool = True) -> None:
        """Stream each file of the model (``{"model": path, "mmproj": path}``) as a raw PUT body,
        never reading a whole file into memory.  Same retry policy as sample uploads (a PUT is
        idempotent: a retry re-sends the file from its start); a refusal raises CloudError, e.g.
        422 when the files do not hash to ``model_id``."""
        _checked(_MODEL_ID, model_id, "model id")
        if files.get("model") is None:
            raise ValueError(f"model {model_id}: no model file to upload")
        # a text-only model has no mmproj: its id hashes the model file alone, so the cloud knows
        # it is complete after the one file (device.contracts.model_id)
        paths = {r: Path(files[r]) for r in ROLES if files.get(r) is not None}
        sizes = {r: p.stat().st_size for r, p in paths.items()}
        t = self._http.timeout
        timeout = httpx.Timeout(connect=t.connect, write=t.write, pool=t.pool,
                                read=None if t.read is None else max(t.read, _MODEL_READ_TIMEOUT))
        result: ModelUploadResult | None = None
        with tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, unit_divisor=1024,
                  desc="model upload", disable=not progress) as bar:
            for role in paths:
                headers = {"Content-Type": "application/octet-stream",
                           "Content-Length": str(sizes[role])}
                data = self._json("PUT", f"/v1/models/{model_id}/{role}", timeout=timeout,
                                  content=FileBody(paths[role], bar), headers=headers)
                result = _validate(ModelUploadResult, data, "PUT /v1/models/{id}/{role}")
                if result.complete:  # the cloud may have it already (another device sent it)
                    break
        if result is None or not result.complete:
            raise CloudError(f"cloud did not register model {model_id} after all of its files "
                             "were uploaded")

    def ensure_model(self, model_id: str, files: dict[str, Path], progress: bool = True) -> bool:
        """Upload the model unless the cloud holds it already; True when it was uploaded now."""
        if self.has_model(model_id):
            return False
        self.upload_model(model_id, files, progress=progress)
        return True

    def start_round(self, req: RoundRequest) -> RoundStatus:
        """Not idempotent (each call queues a round), so only retried when surely not processed."""
        data = self._json("POST", "/v1/rounds", idempotent=False,
                          content=req.model_dump_json().encode(),
                          headers={"Content-Type": "application/json"})
        return _validate(RoundStatus, data, "POST /v1/rounds")

    def round_status(self, round_id: str) -> RoundStatus:
        _checked(_ROUND_ID, round_id, "round id")
        status = _validate(RoundStatus, self._json("GET", f"/v1/rounds/{round_id}"),
                           "GET /v1/rounds/{id}")
        if status.round_id != round_id:
            raise CloudError(f"cloud answered round {status.round_id} when asked for {round_id}")
        return status

    def list_rounds(self) -> list[RoundStatus]:
        data = self._json("GET", "/v1/rounds")
        if not isinstance(data, list):
            raise CloudError("cloud sent an invalid answer to GET /v1/rounds: not a list")
        return [_validate(RoundStatus, r, "GET /v1/rounds") for r in data]

    def cancel_round(self, round_id: str) -> RoundStatus:
        # Cancelling twice is harmless, so this POST may be retried like a read.
        _checked(_ROUND_ID, round_id, "round id")
        return _validate(RoundStatus, self._json("POST", f"/v1/rounds/{round_id}/cancel"),
                         "POST /v1/rounds/{id}/cancel")

    def release_round(self, round_id: str) -> bool:
        """Tell the cloud this device will never apply ``round_id`` (refused patch, failed smoke
        test, moved on): its samples become usable again.  False when the cloud has no such route
        (older server) or no such round; releasing twice is harmless, so it is retried."""
        _checked(_ROUND_ID, round_id, "round id")
        try:
            self._json("POST", f"/v1/rounds/{round_id}/release")
        except CloudError as exc:
            if exc.status in (404, 405, 501):
                return False
            raise
        return True

    def wait_round(self, round_id: str, on_progress: Callable[[RoundStatus], None] | None = None,
                   poll: float = 0.5, timeout: float | None = None) -> RoundStatus:
        """Poll until the round is done/failed/cancelled and return that final status;
        ``on_progress`` is called whenever stage, progress or message change."""
        deadline = None if timeout is None else time.monotonic() + timeout
        seen: tuple[Any, ...] | None = None
        while True:
            status = self.round_status(round_id)
            key = (status.state, status.stage, status.progress, status.message)
            if on_progress is not None and key != seen:
                on_progress(status)
            seen = key
            if status.finished:
                return status
            if deadline is not None and time.monotonic() >= deadline:
                raise RoundTimeout(f"round {round_id} still {status.state} ({status.stage}, "
                                   f"{status.progress:.0%}) after {timeout:g} s")
            time.sleep(poll)

    def download_patch(self, round_id: str, dest_path: str | os.PathLike[str],
                       max_bytes: int = MAX_PATCH_BYTES) -> DownloadedPatch:
        """Stream the patch to a temp file beside ``dest_path`` (a name the device chose, never
        one from the cloud), refusing more than ``max_bytes``; verify its SHA-256 against the
        cloud's header, fsync, then rename: ``dest_path`` is either absent or the whole patch."""
        _checked(_ROUND_ID, round_id, "round id")
        dest = Path(dest_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with self._send("GET", f"/v1/rounds/{round_id}/patch", stream=True) as response:
            expected = response.headers.get("x-patch-sha256", "").lower()
            if not _SHA256.match(expected):
                raise CloudError(f"cloud sent the patch of round {round_id} without a valid "
                                 "X-Patch-SHA256")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise CloudError(f"patch of round {round_id} is {int(declared)} bytes, over the "
                                 f"{max_bytes}-byte limit: refusing it")
            signature = response.headers.get(SIGNATURE_HEADER.lower())
            tmp, digest, size = stream_to_temp(response, dest, max_bytes)
        try:
            if digest != expected:
                raise CloudError(f"patch of round {round_id} is corrupt: sha256 {digest[:12]}... "
                                 f"!= announced {expected[:12]}...")
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(dest.parent)
        return DownloadedPatch(dest, digest, size, signature)
