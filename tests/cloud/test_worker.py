"""cloud.worker with real worker processes (issue 13, item 1): rounds of several devices are
claimed oldest first, each exactly once; killing a worker mid-round hands the round to the other
worker once the lease expires, and the device's wait ends by itself.  On SQLite and PostgreSQL."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import func, select

from cloud.schema import samples
from cloud.store import Store
from device.contracts.config import load_settings
from device.contracts.wire import RoundRequest, TokenStats, UplinkSample

ROOT = Path(__file__).resolve().parents[2]
HELPER = Path(__file__).with_name("worker_proc.py")


def make_sample(i: int) -> UplinkSample:
    return UplinkSample(sample_id=f"{i:016x}", base_model="m0", prompt=f"q{i}", answer="a",
                        tokens=TokenStats(positions=[0], token_ids=[1], entropy=[1.0]),
                        score=0.5, raw_bytes=10)


def start_worker(home: Path, db_url: str | None, lease: float, steps: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(HELPER), str(home), db_url or "-", str(lease),
                             str(steps)], env=env, cwd=ROOT)


def wait_until(check, timeout: float = 60.0, what: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_killed_worker_hands_its_round_to_the_other(tmp_path: Path, db_url: str | None) -> None:
    settings = load_settings(home=tmp_path, db_url=db_url, round_lease_s=1.0)
    store = Store(settings)
    store.add_device("lap")
    store.add_samples("lap", [make_sample(i) for i in range(3)])
    rid = store.create_round("lap", RoundRequest(base_model="m0")).round_id
    a = start_worker(tmp_path, db_url, 1.0, steps=30)
    b = None
    try:
        running = wait_until(lambda: (s := store.get_round(rid)).state == "running" and
                             s.progress > 0 and s, what="the first worker to start")
        victim = int(running.message.rsplit(" ", 1)[1])
        assert victim == a.pid
        b = start_worker(tmp_path, db_url, 1.0, steps=5)
        os.kill(a.pid, signal.SIGKILL)  # mid-round, no goodbye
        a.wait(10)
        done = wait_until(lambda: (s := store.get_round(rid)).finished and s, what="the round")
        assert done.state == "done", done.message
        assert done.metrics["worker_pid"] == b.pid and done.metrics["samples"] == 3
        with store.engine.connect() as conn:
            used = conn.execute(select(func.count()).select_from(samples)
                                .where(samples.c.round_id == rid)).scalar_one()
        assert used == 3  # exactly once
    finally:
        for p in (a, b):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(20)
        store.close()


def test_two_workers_fair_by_age_each_round_once(tmp_path: Path, db_url: str | None) -> None:
    settings = load_settings(home=tmp_path, db_url=db_url)
    store = Store(settings)
    rids = []
    for d in range(6):
        store.add_device(f"d{d}")
        store.add_samples(f"d{d}", [make_sample(d)])
        rids.append(store.create_round(f"d{d}", RoundRequest(base_model="m0")).round_id)
    workers = [start_worker(tmp_path, db_url, 10.0, steps=3) for _ in range(2)]
    try:
        wait_until(lambda: all(store.get_round(r).finished for r in rids), what="six rounds")
        statuses = [store.get_round(r) for r in rids]
        assert [s.state for s in statuses] == ["done"] * 6
        assert {s.metrics["worker_pid"] for s in statuses} == {w.pid for w in workers}
        starts = [s.started_at for s in statuses]
        # oldest first: round k starts no later than round k+2 (two workers in parallel)
        assert all(starts[k] <= starts[k + 2] for k in range(4)), starts
        # one attempt each: nobody ran a round twice
        with store.engine.connect() as conn:
            from cloud.schema import rounds
            attempts = conn.execute(select(rounds.c.attempts)).scalars().all()
        assert attempts == [1] * 6
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w in workers:
            assert w.wait(20) == 0  # a clean stop on SIGTERM
        store.close()


def test_cancel_reaches_a_remote_worker_through_its_heartbeat(tmp_path: Path, db_url: str | None) -> None:
    from cloud.rounds import RoundManager

    settings = load_settings(home=tmp_path, db_url=db_url, round_lease_s=0.9)
    store = Store(settings)
    store.add_device("lap")
    store.add_samples("lap", [make_sample(1)])
    manager = RoundManager(store, settings, accept_rounds=True)  # the API side: no local workers
    rid = manager.submit("lap", RoundRequest(base_model="m0")).round_id
    w = start_worker(tmp_path, db_url, 0.9, steps=600)
    try:
        wait_until(lambda: store.get_round(rid).progress > 0, what="the round to run")
        t = time.monotonic()
        manager.cancel("lap", rid)
        end = wait_until(lambda: (s := store.get_round(rid)).finished and s, what="the cancel")
        assert end.state == "cancelled" and end.message == "cancelled by the device"
        assert time.monotonic() - t < 5  # one heartbeat (0.3 s here) and a progress report
        assert store.sample_counts("lap").unused == 1  # nothing consumed
    finally:
        w.terminate()
        w.wait(20)
        store.close()
