"""Rounds, API side: the context a round runner gets, the state machine, and the admission of
new rounds (quotas and caps).  Running them is the workers' job (``cloud/worker.py``).

A *round runner* is the pluggable heavy part (AKD distillation + DWC compression, written
elsewhere).  This module and the worker own everything around it that must be right regardless
of the runner: which samples it sees, how progress and cancellation reach the database, and that
every round ends in exactly one terminal state.

    queued --> running --> done
       |   ^      |------> failed      (runner error, wall-time cap, lease lost too often)
       |   '------|        (lease lost: re-queued, keeps its place in line)
       |          '------> cancelled
       '--> cancelled
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

from device.contracts.config import Settings
from device.contracts.wire import RoundOptions, RoundRequest, RoundStatus, UplinkSample

from .store import ActiveRound, Store, utcnow

log = logging.getLogger(__name__)

TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"running", "cancelled", "failed"}),
    "running": frozenset({"done", "failed", "cancelled", "queued"}),
}


def sources(target: str) -> frozenset[str]:
    """States a round may leave to enter ``target`` (the CAS guard for :meth:`Store.transition`)."""
    return frozenset(s for s, targets in TRANSITIONS.items() if target in targets)


class RoundCancelled(Exception):
    """Raised inside the runner (by ``ctx.progress`` or the runner itself) to stop a round."""


class RoundConflict(Exception):
    """The requested change does not apply to the round's current state."""


class RoundRejected(Exception):
    """A new round the cloud will not queue: an HTTP status, a one-line reason, headers."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers or {}


@dataclass
class RoundContext:
    """Everything a runner gets.  ``progress`` doubles as a cancellation point: it raises
    :class:`RoundCancelled` once the round must stop (the device cancelled, the wall-time cap
    passed, the worker lost its lease), so a runner that reports progress stops promptly."""

    device: str
    round_id: str
    base_model: str
    samples: list[UplinkSample]
    options: RoundOptions
    patch_path: Path
    work_dir: Path
    _report: Callable[[str, float, str], None] = field(repr=False)
    _cancel_event: threading.Event = field(repr=False)

    def progress(self, stage: str, fraction: float, message: str = "") -> None:
        if self.cancelled():
            raise RoundCancelled("cancelled by the device")
        self._report(stage, fraction, message)

    def cancelled(self) -> bool:
        return self._cancel_event.is_set()


class RoundRunner(Protocol):
    def __call__(self, ctx: RoundContext) -> dict[str, Any]:
        """Write the patch to ``ctx.patch_path``; return JSON-able metrics."""
        ...


def one_line(exc: BaseException, limit: int = 500) -> str:
    text = str(exc).strip().splitlines()
    detail = text[0] if text else ""
    msg = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    return msg[:limit]


def capped(request: RoundRequest, settings: Settings) -> RoundRequest:
    """The request with the cloud's caps applied.  Too many steps is refused (the device asked
    this cloud to spend more than it will); ``max_samples`` is an "up to" and is clamped to the
    cap (``None``, "all", means the cap), so a device's default works with any cloud."""
    opts = request.options
    if opts.steps > settings.max_round_steps:
        raise RoundRejected(422, f"options.steps: {opts.steps} is over this cloud's cap of "
                                 f"{settings.max_round_steps} (max_round_steps)")
    cap = settings.max_round_samples
    limit = cap if opts.max_samples is None else min(opts.max_samples, cap)
    return request.model_copy(update={"options": opts.model_copy(update={"max_samples": limit})})


class RoundManager:
    """Admits rounds into the durable queue; optional in-process workers run them.

    With a ``runner`` (tests, the loopback cloud), ``local_workers`` threads of
    :class:`cloud.worker.Worker` claim rounds from the same queue an external ``cdcca cloud
    worker`` would.  With ``accept_rounds=True`` and no runner (``cdcca cloud serve``), rounds
    wait for worker processes.  Neither: the server refuses rounds (501)."""

    def __init__(self, store: Store, settings: Settings, runner: RoundRunner | None = None,
                 local_workers: int = 1, accept_rounds: bool = False) -> None:
        self.store = store
        self.settings = settings
        self.runner = runner
        self.accepts = runner is not None or accept_rounds
        self._local = None
        if runner is not None and local_workers > 0:
            from .worker import LocalWorkers

            self._local = LocalWorkers(store, runner, settings, local_workers)

    def recover(self) -> int:
        """Rounds whose worker died (its lease ran out) go back in line; returns how many."""
        requeued, failed = self.store.expire_leases(self.settings.round_attempts)
        return len(requeued) + len(failed)

    def submit(self, device: str, request: RoundRequest) -> RoundStatus:
        request = capped(request, self.settings)
        since = utcnow() - timedelta(hours=1)
        if self.store.rounds_created_since(device, since) >= self.settings.rounds_per_hour:
            raise RoundRejected(429, f"this device created {self.settings.rounds_per_hour} rounds "
                                     "in the last hour, the cloud's limit (rounds_per_hour)",
                                {"Retry-After": "60"})
        try:
            status = self.store.create_round(device, request)
        except ActiveRound as exc:
            raise RoundRejected(409, f"round {exc.round_id} of this device is still active "
                                     "(queued or running): wait for it or cancel it first") from None
        if self._local is not None:
            self._local.wake()
        return status

    def cancel(self, device: str, round_id: str) -> RoundStatus | None:
        """Queued rounds cancel at once; running ones at the runner's next progress report
        (the worker learns of it from its heartbeat, or at once if it runs in this process)."""
        status = self.store.get_round(round_id, device)
        if status is None:
            return None
        if status.finished:
            raise RoundConflict(f"round {round_id} is already {status.state}")
        if self.store.transition(round_id, {"queued"}, "cancelled", finished_at=utcnow(),
                                 message="cancelled by the device before it started"):
            return self.store.get_round(round_id, device)
        # note first, then signal: the runner's final "cancelled" message must come last
        self.store.request_cancel(round_id)
        if self._local is not None:
            self._local.cancel(round_id)
        return self.store.get_round(round_id, device)

    def shutdown(self, wait: bool = True) -> None:
        """Stop the in-process workers; a round they were running goes back in line."""
        if self._local is not None:
            self._local.stop(wait=wait)
