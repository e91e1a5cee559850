"""The round in flight: persisted, so a sync survives a crash or restart of either side.

Once the cloud has accepted a round, its id is written to ``<device_dir>/round.json`` (0600,
atomic) before anything else happens, and cleared only when the round's patch is applied or the
round is given up.  A later sync finds it and resumes -- poll, download, apply -- instead of
asking for a new round, so samples the cloud spent on a round are not orphaned by a dropped
connection.  Three more gaps are closed here:

* the cloud restarted and lost the round (it answers ``failed`` with ``ROUND_INTERRUPTED``):
  its samples were never consumed, so a fresh round is started by itself (a bounded number of
  times);
* the POST that created a round got no answer (or the device died before saving the id): the
  device adopts an unfinished round of the same base model from ``GET /v1/rounds``;
* the round is for a model the device no longer runs, or its patch is refused: the cloud is told
  to *release* it, so its samples become usable again.

One sync at a time per device: ``sync_lock`` holds an flock for the whole sync.
"""
from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from device.contracts.wire import (
    BASE_MODEL_PATTERN, ROUND_ID_PATTERN, ROUND_INTERRUPTED, RoundRequest, RoundStatus,
)
from device.trust import private_dir, write_private
from device.uplink import CloudClient, CloudError

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX: single-process use assumed
    fcntl = None  # type: ignore[assignment]

INFLIGHT_FILE = "round.json"
LOCK_FILE = "sync.lock"
MAX_ROUND_ATTEMPTS = 3  # rounds started for one sync when the cloud keeps losing them
_ROUND_ID, _BASE = re.compile(ROUND_ID_PATTERN), re.compile(BASE_MODEL_PATTERN)


class RoundFailed(RuntimeError):
    """The round ended without a patch (failed, cancelled); one line for the user."""


class SyncBusy(RuntimeError):
    """Another sync of this device is running (the TUI and the CLI at once, say)."""


@dataclass(frozen=True)
class InFlight:
    round_id: str
    base_model: str
    started: float


def load_inflight(device_dir: Path) -> InFlight | None:
    """The saved round, or None.  A file that does not parse as one is ignored (and replaced by
    the next save): it was written by this device, so it is garbage, not an attack surface,
    but its id is still checked by pattern before it is ever used in a URL."""
    try:
        d = json.loads((Path(device_dir) / INFLIGHT_FILE).read_text())
        rec = InFlight(str(d["round_id"]), str(d["base_model"]), float(d["started"]))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        return None
    if not (_ROUND_ID.match(rec.round_id) and _BASE.match(rec.base_model)):
        return None
    return rec


def save_inflight(device_dir: Path, rec: InFlight) -> None:
    write_private(Path(device_dir) / INFLIGHT_FILE, json.dumps(asdict(rec)).encode())


def clear_inflight(device_dir: Path) -> None:
    (Path(device_dir) / INFLIGHT_FILE).unlink(missing_ok=True)


@contextmanager
def sync_lock(device_dir: Path) -> Iterator[None]:
    private_dir(Path(device_dir))
    fd = os.open(Path(device_dir) / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SyncBusy("another sync of this device is running; wait for it to finish") from None
        yield
    finally:
        os.close(fd)  # closing releases the flock


def release(client: CloudClient, device_dir: Path, round_id: str) -> bool:
    """Give a round up: its samples become usable again on the cloud; the record is cleared.
    Best effort on the network (a cloud that cannot be told now keeps the samples used)."""
    clear_inflight(device_dir)
    try:
        return client.release_round(round_id)
    except CloudError:
        return False


def adopt(client: CloudClient, model_id: str) -> RoundStatus | None:
    """An unfinished round of this model that the device lost track of (no saved id)."""
    try:
        rounds = client.list_rounds()
    except CloudError:
        return None
    live = [r for r in rounds if not r.finished and r.base_model == model_id]
    return max(live, key=lambda r: r.created_at) if live else None


def start_or_resume(client: CloudClient, device_dir: Path, request: RoundRequest,
                    rec: InFlight | None) -> tuple[str, bool]:
    """The round to follow: the saved one, an adoptable one, or a new one (saved at once).
    Returns (round id, resumed)."""
    if rec is not None:
        return rec.round_id, True
    found = adopt(client, request.base_model)
    if found is None:
        try:
            found = client.start_round(request)
        except CloudError as exc:
            if exc.status is not None:  # the cloud decided (4xx / 5xx): no round exists
                raise
            found = adopt(client, request.base_model)  # the POST may have landed: look once
            if found is None:
                raise
    save_inflight(device_dir, InFlight(found.round_id, request.base_model, time.time()))
    return found.round_id, False


def follow(client: CloudClient, device_dir: Path, request: RoundRequest, rec: InFlight | None,
           on_progress: Callable[[RoundStatus], None], timeout: float,
           on_restart: Callable[[str], None] | None = None) -> tuple[RoundStatus, bool]:
    """Follow the round in flight (or start one) until it is done; returns (status, resumed).
    A round the cloud lost to a restart, or no longer knows (404), is replaced by a new one."""
    resumed_any = rec is not None
    for _attempt in range(MAX_ROUND_ATTEMPTS):
        rid, resumed = start_or_resume(client, device_dir, request, rec)
        rec = None
        try:
            st = client.wait_round(rid, on_progress=on_progress, timeout=timeout)
        except CloudError as exc:
            if exc.status == 404:  # the cloud forgot the round (database reset): start afresh
                clear_inflight(device_dir)
                continue
            raise  # unreachable or timed out: the saved id lets the next sync resume
        if st.state == "done":
            return st, resumed or resumed_any
        clear_inflight(device_dir)
        lost = st.state == "failed" and st.message.startswith(ROUND_INTERRUPTED)
        if lost or resumed:  # a restart lost it, or it ended while no sync watched: go again
            if on_restart is not None:
                on_restart(rid)
            continue
        raise RoundFailed(f"round {rid} {st.state}: {st.message}")
    raise RoundFailed(f"the cloud lost {MAX_ROUND_ATTEMPTS} rounds in a row to restarts; "
                      "try again later")
