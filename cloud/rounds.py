"""Rounds: the context handed to a round runner, the state machine, and the worker that runs them.

A *round runner* is the pluggable heavy part (AKD distillation + DWC compression, written
elsewhere).  This module owns everything around it that must be right regardless of the runner:
which samples it sees, how progress and cancellation reach the database, and that every round
ends in exactly one terminal state.

    queued --> running --> done
       |          |------> failed
       |          '------> cancelled
       '--> cancelled / failed   (cancelled before it started, or the server went away)
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from device.contracts.model_id import file_sha256 as sha256_file
from device.contracts.wire import RoundOptions, RoundRequest, RoundStatus, UplinkSample

from .store import Store, jsonable, utcnow

log = logging.getLogger(__name__)

TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"running", "cancelled", "failed"}),
    "running": frozenset({"done", "failed", "cancelled"}),
}


def sources(target: str) -> frozenset[str]:
    """States a round may leave to enter ``target`` (the CAS guard for :meth:`Store.transition`)."""
    return frozenset(s for s, targets in TRANSITIONS.items() if target in targets)


class RoundCancelled(Exception):
    """Raised inside the runner (by ``ctx.progress`` or the runner itself) to stop a round."""


class RoundConflict(Exception):
    """The requested change does not apply to the round's current state."""


@dataclass
class RoundContext:
    """Everything a runner gets.  ``progress`` doubles as a cancellation point: it raises
    :class:`RoundCancelled` once the device asked to cancel, so a runner that reports progress
    stops promptly without polling ``cancelled()`` itself."""

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


class RoundManager:
    """Queues rounds on a small executor (one at a time by default: a round saturates the GPU)."""

    def __init__(self, store: Store, runner: RoundRunner | None, workers: int = 1) -> None:
        self.store = store
        self.runner = runner
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cdcca-round")
        self._cancel: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._closing = False

    def recover(self) -> int:
        """Rounds left queued/running by a previous process cannot resume: fail them clearly."""
        stale = self.store.rounds_in(TRANSITIONS.keys())
        for rid in stale:
            self._end(rid, "failed", "interrupted: the server restarted before this round finished")
        return len(stale)

    def submit(self, device: str, request: RoundRequest) -> RoundStatus:
        status = self.store.create_round(device, request)
        with self._lock:
            self._cancel[status.round_id] = threading.Event()
        self._executor.submit(self._run, status.round_id)
        return status

    def cancel(self, device: str, round_id: str) -> RoundStatus | None:
        """Queued rounds cancel at once; running ones at the runner's next progress report."""
        status = self.store.get_round(round_id, device)
        if status is None:
            return None
        if status.finished:
            raise RoundConflict(f"round {round_id} is already {status.state}")
        if self._end(round_id, "cancelled", "cancelled by the device before it started",
                     expected=frozenset({"queued"})):
            return self.store.get_round(round_id, device)
        with self._lock:
            event = self._cancel.get(round_id)
        if event is not None:
            # note first, then signal: the runner's final "cancelled" message must come last
            self.store.update_round(round_id, message="cancel requested")
            event.set()
        return self.store.get_round(round_id, device)

    def shutdown(self, wait: bool = True) -> None:
        """Stop taking work; running rounds are asked to stop, queued ones are failed."""
        self._closing = True
        with self._lock:
            for event in self._cancel.values():
                event.set()
        self._executor.shutdown(wait=wait, cancel_futures=True)
        for rid in self.store.rounds_in({"queued"}):
            self._end(rid, "failed", "interrupted: the server shut down before this round started")

    # --- worker side --------------------------------------------------------------------------
    def _run(self, round_id: str) -> None:
        try:
            if not self.store.transition(round_id, sources("running"), "running",
                                         started_at=utcnow(), stage="loading samples"):
                return  # cancelled while queued
            self._execute(self._context(round_id))
        except RoundCancelled:
            self._end_interrupted(round_id)
        except Exception as exc:  # noqa: BLE001 - any runner failure becomes the round's message
            log.exception("round %s failed", round_id)
            if self._cancel_requested(round_id):
                self._end_interrupted(round_id)
            else:
                self._end(round_id, "failed", one_line(exc))
        finally:
            with self._lock:
                self._cancel.pop(round_id, None)

    def _context(self, round_id: str) -> RoundContext:
        device, request = self.store.round_request(round_id)
        batch = self.store.unused_samples(device, request.options.max_samples)
        if not batch:
            raise RuntimeError("no unused samples to learn from; upload some first")
        self.store.update_round(round_id, n_samples=len(batch))
        work_dir = self.store.root / "rounds" / round_id
        work_dir.mkdir(parents=True, exist_ok=True)
        with self._lock:
            event = self._cancel.setdefault(round_id, threading.Event())
        return RoundContext(
            device=device, round_id=round_id, base_model=request.base_model, samples=batch,
            options=request.options, patch_path=work_dir / "patch.gguf", work_dir=work_dir,
            _report=lambda stage, frac, msg: self._report(round_id, stage, frac, msg),
            _cancel_event=event)

    def _report(self, round_id: str, stage: str, fraction: float, message: str) -> None:
        fraction = min(1.0, max(0.0, float(fraction)))
        self.store.update_round(round_id, stage=stage[:64], progress=fraction, message=message[:1000])

    def _execute(self, ctx: RoundContext) -> None:
        if self.runner is None:
            raise RuntimeError("this server has no round runner configured")
        metrics = jsonable(dict(self.runner(ctx) or {}))
        if ctx.cancelled():
            raise RoundCancelled("cancelled by the device")
        if not ctx.patch_path.is_file():
            raise RuntimeError(f"the round runner wrote no patch at {ctx.patch_path.name}")
        size = ctx.patch_path.stat().st_size
        done = self.store.complete_round(
            ctx.round_id, ctx.device, [s.sample_id for s in ctx.samples],
            stage="done", progress=1.0, message=f"patch ready ({size} bytes)", metrics=metrics,
            patch_path=str(ctx.patch_path), patch_sha256=sha256_file(ctx.patch_path),
            patch_bytes=size, finished_at=utcnow())
        if not done:
            raise RoundConflict(f"round {ctx.round_id} left the running state unexpectedly")

    def _cancel_requested(self, round_id: str) -> bool:
        with self._lock:
            event = self._cancel.get(round_id)
        return event is not None and event.is_set()

    def _end_interrupted(self, round_id: str) -> None:
        if self._closing:
            self._end(round_id, "failed", "interrupted: the server shut down during this round")
        else:
            self._end(round_id, "cancelled", "cancelled by the device")

    def _end(self, round_id: str, state: str, message: str,
             expected: frozenset[str] | None = None) -> bool:
        return self.store.transition(round_id, expected or sources(state), state,
                                     message=message, finished_at=utcnow())
