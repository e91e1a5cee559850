"""Round workers (issue 13): claim a queued round from the store, run it, heartbeat, hand back.

The API never trains.  Workers are processes (``cdcca cloud worker``) on any machine that reaches
the database and the blob storage; they agree through the database alone:

* **claim** -- ``Store.claim_round``: the oldest queued round of any device, atomically
  (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, compare-and-set under SQLite's single writer);
* **heartbeat** -- a thread extends the round's lease every ``lease/3`` s (at most 2 s) and
  picks up a cancel request; missing the lease hands the round to ``expire_leases``, which any
  worker runs before it claims: re-queued (keeping its place by age) or, after
  ``round_attempts`` tries, failed with the reason;
* **caps** -- past ``max_round_seconds`` the round is stopped and failed with that reason;
* **hand back** -- the patch goes into blob storage, then ``complete_round`` marks the round
  done and its samples used in one transaction, only if this worker still holds it.

:class:`LocalWorkers` runs the same :class:`Worker` in threads of the API process, which is
what the tests and the in-process loopback cloud use.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
from collections import Counter
from pathlib import Path

from device.contracts.config import Settings
from device.contracts.model_id import file_sha256

from .admission import round_problem
from .rounds import RoundCancelled, RoundContext, RoundRunner, one_line, sources
from .store import Store, jsonable, utcnow

log = logging.getLogger(__name__)


class _Stop(threading.Event):
    """A cancel event that remembers why: 'device', 'timeout', 'lost' or 'shutdown'."""

    reason = "device"

    def stop(self, reason: str) -> None:
        if not self.is_set():
            self.reason = reason
            self.set()


class Worker:
    def __init__(self, store: Store, runner: RoundRunner, settings: Settings,
                 name: str | None = None) -> None:
        self.store, self.runner, self.settings = store, runner, settings
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident() % 10000}"
        self.current: tuple[str, _Stop] | None = None

    # --- the loop -------------------------------------------------------------------------------
    def run_once(self) -> str | None:
        """Expire dead leases, claim one round and run it; returns its id (None: queue empty)."""
        requeued, failed = self.store.expire_leases(self.settings.round_attempts)
        for rid in requeued + failed:
            log.warning("round %s lost its worker: %s", rid, "re-queued" if rid in requeued else "failed")
        rid = self.store.claim_round(self.name, self.settings.round_lease_s)
        if rid is not None:
            self.run(rid)
        return rid

    def run_forever(self, stop: threading.Event, poll_s: float = 1.0,
                    wake: threading.Event | None = None) -> None:
        while not stop.is_set():
            if self.run_once() is None:
                (wake or stop).wait(poll_s)
                if wake is not None:
                    wake.clear()

    def cancel(self, round_id: str, reason: str = "device") -> None:
        current = self.current
        if current is not None and current[0] == round_id:
            current[1].stop(reason)

    # --- one round ------------------------------------------------------------------------------
    def run(self, round_id: str) -> None:
        stop = _Stop()
        self.current = (round_id, stop)
        beat = threading.Thread(target=self._heartbeat, args=(round_id, stop, time.monotonic()),
                                daemon=True, name=f"cdcca-heartbeat-{round_id}")
        beat.start()
        work_dir = self.store.root / "rounds" / round_id
        try:
            ctx, skipped = self._context(round_id, stop, work_dir)
            self._execute(ctx, skipped)
        except RoundCancelled:
            self._end_stopped(round_id, stop)
        except Exception as exc:  # noqa: BLE001 - any runner failure becomes the round's message
            log.exception("round %s failed", round_id)
            if stop.is_set():
                self._end_stopped(round_id, stop)
            else:
                self._end(round_id, "failed", one_line(exc))
        finally:
            self.current = None
            stop.stop("finished")
            beat.join(5)
            shutil.rmtree(work_dir, ignore_errors=True)

    def _context(self, round_id: str, stop: _Stop, work_dir: Path) -> tuple[RoundContext, dict[str, str]]:
        device, request = self.store.round_request(round_id)
        batch, skipped = self.store.load_usable(device, request.options.max_samples, round_problem)
        if not batch:
            why = f" ({len(skipped)} skipped: {_reasons(skipped)})" if skipped else ""
            raise RuntimeError(f"no usable samples to learn from{why}; upload some first")
        self.store.update_round(round_id, owner=self.name, n_samples=len(batch))
        work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        ctx = RoundContext(
            device=device, round_id=round_id, base_model=request.base_model, samples=batch,
            options=request.options, patch_path=work_dir / "patch.gguf", work_dir=work_dir,
            _report=lambda stage, frac, msg: self._report(round_id, stop, stage, frac, msg),
            _cancel_event=stop)
        return ctx, skipped

    def _report(self, round_id: str, stop: _Stop, stage: str, fraction: float, message: str) -> None:
        fraction = min(1.0, max(0.0, float(fraction)))
        if not self.store.update_round(round_id, owner=self.name, stage=stage[:64],
                                       progress=fraction, message=message[:1000]):
            stop.stop("lost")
            raise RoundCancelled("this worker no longer holds the round")

    def _execute(self, ctx: RoundContext, skipped: dict[str, str]) -> None:
        metrics = jsonable(dict(self.runner(ctx) or {}))
        if ctx.cancelled():
            raise RoundCancelled("stopped")
        if not ctx.patch_path.is_file():
            raise RuntimeError(f"the round runner wrote no patch at {ctx.patch_path.name}")
        if skipped:
            metrics["skipped_samples"] = {"count": len(skipped), "reasons": dict(
                Counter(r.split(":", 1)[0] for r in skipped.values()))}
        data = ctx.patch_path.read_bytes()
        sha = self.store.blobs.put(data)
        assert sha == file_sha256(ctx.patch_path)
        done = self.store.complete_round(
            ctx.round_id, ctx.device, [s.sample_id for s in ctx.samples], owner=self.name,
            stage="done", progress=1.0, message=f"patch ready ({len(data)} bytes)", metrics=metrics,
            patch_path=self.store.blobs.key(sha), patch_sha256=sha, patch_bytes=len(data),
            finished_at=utcnow())
        if not done:
            log.warning("round %s was taken from this worker before it finished", ctx.round_id)
            return
        self._retention()

    def _retention(self) -> None:
        """Keep the last ``keep_round_models`` rounds' models and patches per device (cloud.gc);
        a failure here never fails the round that just finished."""
        from .gc import collect

        try:
            report = collect(self.settings, self.store)
        except Exception:  # noqa: BLE001
            log.warning("retention sweep failed", exc_info=True)
            return
        if report.models or report.patches or report.blobs:
            log.warning("retention: %s", report.line())

    def _heartbeat(self, round_id: str, stop: _Stop, started: float) -> None:
        period = min(self.settings.round_lease_s / 3, 2.0)
        while not stop.wait(period):
            try:
                cancel = self.store.heartbeat(round_id, self.name, self.settings.round_lease_s)
            except Exception:  # noqa: BLE001 - a database blip: try again next beat
                log.warning("heartbeat of round %s failed", round_id, exc_info=True)
                continue
            if cancel is None:
                stop.stop("lost")
            elif cancel:
                stop.stop("device")
            elif time.monotonic() - started > self.settings.max_round_seconds:
                stop.stop("timeout")

    def _end_stopped(self, round_id: str, stop: _Stop) -> None:
        if stop.reason == "lost":
            return  # the round is someone else's now (or already ended); leave it alone
        if stop.reason == "timeout":
            self._end(round_id, "failed", f"stopped: ran past the cloud's wall-time cap of "
                                          f"{self.settings.max_round_seconds:g} s (max_round_seconds)")
        elif stop.reason == "shutdown":
            self.store.transition(round_id, {"running"}, "queued", owner=self.name, worker=None,
                                  stage="queued", progress=0.0,
                                  message="re-queued: its worker shut down during the round")
        else:
            self._end(round_id, "cancelled", "cancelled by the device")

    def _end(self, round_id: str, state: str, message: str) -> bool:
        return self.store.transition(round_id, sources(state), state, owner=self.name,
                                     message=message, finished_at=utcnow())


def _reasons(skipped: dict[str, str]) -> str:
    top = Counter(r.split(":", 1)[0] for r in skipped.values()).most_common(3)
    return ", ".join(f"{n} {why}" for why, n in top)


class LocalWorkers:
    """``n`` workers in threads of this process (tests, the loopback cloud)."""

    def __init__(self, store: Store, runner: RoundRunner, settings: Settings, n: int = 1) -> None:
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.workers = [Worker(store, runner, settings, name=f"local-{os.getpid()}-{i}")
                        for i in range(n)]
        self._threads = [threading.Thread(target=w.run_forever, args=(self._stop, 0.5, self._wake),
                                          daemon=True, name=f"cdcca-round-{i}")
                         for i, w in enumerate(self.workers)]
        for t in self._threads:
            t.start()

    def wake(self) -> None:
        self._wake.set()

    def cancel(self, round_id: str) -> None:
        for w in self.workers:
            w.cancel(round_id)

    def stop(self, wait: bool = True) -> None:
        self._stop.set()
        self._wake.set()
        for w in self.workers:
            if w.current is not None:
                w.cancel(w.current[0], "shutdown")
        if wait:
            for t in self._threads:
                t.join(30)


def run_worker(settings: Settings, runner: RoundRunner, stop: threading.Event | None = None,
               poll_s: float = 1.0) -> None:
    """The ``cdcca cloud worker`` process body: one worker until ``stop`` is set (SIGTERM and
    Ctrl-C set it).  A round it is running then goes back in line for another worker."""
    import signal

    stop = stop or threading.Event()
    store = Store(settings)
    worker = Worker(store, runner, settings)

    def hand_back() -> None:
        stop.wait()
        if worker.current is not None:
            worker.cancel(worker.current[0], "shutdown")

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda _sig, _frame: stop.set())
    threading.Thread(target=hand_back, daemon=True, name="cdcca-worker-stop").start()
    log.warning("worker %s waiting for rounds", worker.name)
    try:
        worker.run_forever(stop, poll_s)
    finally:
        store.close()
