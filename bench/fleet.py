"""Section 5 -- a fleet: N device processes (own token, own durable queue) upload concurrently to
one loopback cloud; then the same again with the cloud stopped and restarted mid-run on the same
data folder and port.  Every sample must be stored exactly once (checked in the cloud's store)."""
from __future__ import annotations

import multiprocessing as mp
import socket
import time
from pathlib import Path

import numpy as np
from sqlalchemy import func, select

from cloud.loopback import LoopbackCloud
from cloud.store import samples as samples_table
from device.contracts.config import load_settings

from .common import Context, Section
from .synth import device_proc, synthetic_id
from .table import Table, na, num


class PortCloud(LoopbackCloud):
    """A LoopbackCloud on a chosen port (to restart on the port the devices know)."""

    def __init__(self, settings, runner, port: int | None = None):
        super().__init__(settings, runner=runner)
        # SO_REUSEADDR on every listener (its accepted connections inherit it), so the next server
        # can bind the port while the old connections linger in FIN-WAIT/TIME-WAIT
        self._sock.close()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", port or 0))
        self.url = f"http://127.0.0.1:{self.port}"

    @property
    def port(self) -> int:
        return self._sock.getsockname()[1]


def _no_rounds(ctx):  # the fleet only uploads
    raise RuntimeError("no rounds in the fleet benchmark")


def _stored(cloud: LoopbackCloud, prefix: str) -> int:
    with cloud.app.state.store.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(samples_table)
                            .where(samples_table.c.device.like(f"{prefix}-%"))).scalar_one()


def _phase(holder: dict, work: Path, prefix: str, n_dev: int, n: int, batch: int, restart_at: float | None) -> dict:
    cloud = holder["cloud"]
    mpc = mp.get_context("spawn")
    ready, results, go = mpc.Queue(), mpc.Queue(), mpc.Event()
    names = [f"{prefix}-{i}" for i in range(n_dev)]
    procs = []
    for i, name in enumerate(names):
        token = cloud.add_device(name)
        qdir = work / prefix / name
        qdir.mkdir(parents=True, exist_ok=True)
        procs.append(mpc.Process(target=device_proc, args=(cloud.url, token, str(qdir), name, n, batch, i,
                                                           ready, go, results), daemon=True))
    t_spawn = time.perf_counter()
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=300)
    spawn_s = time.perf_counter() - t_spawn
    expected = n_dev * n
    t0 = time.time()
    go.set()
    restart = None
    if restart_at is not None:
        while _stored(cloud, prefix) < restart_at * expected and any(p.is_alive() for p in procs):
            time.sleep(0.005)
        at = _stored(cloud, prefix)
        t = time.perf_counter()
        port = cloud.port
        cloud.stop()
        cloud.app.state.store.close()
        cloud = holder["cloud"] = PortCloud(cloud.settings, _no_rounds, port).start()
        restart = {"stored_at_restart": at, "expected": expected, "downtime_s": time.perf_counter() - t,
                   "same_port": cloud.port == port}
    reports = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(30)
    t1 = max(r["t_end"] for r in reports)
    lat = np.array([x for r in reports for x in r["latencies"]], dtype=float)
    store = cloud.app.state.store
    with store.engine.connect() as conn:
        rows = conn.execute(select(samples_table.c.device, samples_table.c.sample_id)
                            .where(samples_table.c.device.like(f"{prefix}-%"))).all()
    got = {}
    for dev, sid in rows:
        got.setdefault(dev, []).append(sid)
    exact_once = all(sorted(got.get(d, [])) == sorted(synthetic_id(d, i) for i in range(n)) for d in names)
    return {"devices": n_dev, "per_device": n, "expected": expected, "stored_rows": len(rows),
            "distinct": len(set(rows)), "exactly_once": exact_once and len(rows) == expected,
            "counts_ok": all(store.sample_counts(d).total == n for d in names),
            "requests": int(lat.size), "seconds": t1 - t0, "throughput": expected / max(t1 - t0, 1e-9),
            "p50_ms": float(np.percentile(lat, 50) * 1e3) if lat.size else float("nan"),
            "p99_ms": float(np.percentile(lat, 99) * 1e3) if lat.size else float("nan"),
            "latencies_ms": (lat * 1e3).round(3).tolist(), "accepted": sum(r["accepted"] for r in reports),
            "duplicates_answered": sum(r["duplicates"] for r in reports),
            "client_errors": sum(r["errors"] for r in reports),
            "left_pending": sum(r["pending"] for r in reports), "spawn_s": spawn_s, "restart": restart}


def run(ctx: Context) -> Section:
    p = ctx.profile
    sec = Section("fleet", "5. Fleet: concurrent devices, one cloud, and a cloud restart")
    settings = load_settings(home=ctx.work / "fleet-home")
    holder = {"cloud": PortCloud(settings, _no_rounds).start()}
    try:
        steady = _phase(holder, ctx.work / "fleet", "steady", p.fleet_devices, p.fleet_samples, p.fleet_batch, None)
        restart = _phase(holder, ctx.work / "fleet", "restart", p.fleet_devices, p.fleet_samples, p.fleet_batch, 0.3)
    finally:
        holder["cloud"].stop()
    t = Table("fleet", "Concurrent uploads over loopback HTTP", [
        "run", "devices x samples", "upload requests", "throughput (samples/s)", "p50 request ms", "p99 request ms",
        "stored rows / expected", "exactly once", "re-sends answered as duplicate", "failed syncs retried"])
    for label, r in (("steady (no restart)", steady), ("cloud restarted mid-run", restart)):
        t.add(label, [num(r["devices"] * r["per_device"], "{:.0f}"), num(r["requests"], "{:.0f}"),
                      num(r["throughput"], "{:.0f}"), num(r["p50_ms"], "{:.1f}"), num(r["p99_ms"], "{:.1f}"),
                      num(r["stored_rows"] / r["expected"], "{:.3f}"), num(1.0 if r["exactly_once"] else 0.0, "{:.0f}"),
                      num(r["duplicates_answered"], "{:.0f}"), num(r["client_errors"], "{:.0f}")])
    rs = restart["restart"]
    t.notes = [
        f"{p.fleet_devices} device processes (multiprocessing, spawn), each with its own bearer token and SQLite queue "
        f"of {p.fleet_samples} schema-valid synthetic UplinkSamples (~2 KB each), uploading with the product's "
        f"`sync_queue` in requests of {p.fleet_batch} samples after a common start signal; the cloud is a "
        "LoopbackCloud (uvicorn + FastAPI + SQLite store) in the bench process. Latency = wall time of one upload "
        "request as the device's CloudClient sees it, retries included. Throughput = samples / (last device done - start).",
        f"Restart run: when {rs['stored_at_restart']} of {rs['expected']} samples were stored, the cloud was stopped "
        f"and a new one started on the same data folder and {'the same' if rs['same_port'] else 'a NEW'} port "
        f"({1e3 * rs['downtime_s']:.0f} ms down); devices retried (CloudClient backoff) and re-synced their queues.",
        "'Exactly once' = 1 when every generated sample id of every device is in the cloud's store exactly once "
        "and nothing else is (checked with SQL on the store after the run), else 0.",
    ]
    sec.tables.append(t)
    for label, r in (("Steady run", steady), ("Restart run", restart)):
        ok = r["exactly_once"] and r["counts_ok"] and r["left_pending"] == 0
        sec.findings.append(f"{label}: {r['stored_rows']} of {r['expected']} samples stored, "
                            + ("every one exactly once." if ok else "NOT exactly once (see table)."))
        if not ok:
            sec.not_beaten.append(f"Fleet {label.lower()}: samples lost or duplicated.")
    down_ms = 1e3 * restart["restart"]["downtime_s"]
    if restart["client_errors"]:
        sec.findings.append(f"Restart: {restart['client_errors']} device syncs failed during the {down_ms:.0f} ms "
                            "downtime and were run again from the durable queue; "
                            f"{restart['duplicates_answered']} re-sent samples were recognised as duplicates.")
    else:
        sec.findings.append(f"Restart: no device sync failed -- the CloudClient's retries with backoff rode out the "
                            f"{down_ms:.0f} ms downtime; {restart['duplicates_answered']} re-sent samples were "
                            "recognised as duplicates.")
    if restart["restart"]["stored_at_restart"] >= restart["expected"]:
        sec.findings.append("The uploads finished before the restart could happen: the restart run did not "
                            "exercise recovery.")
    sec.data = {"steady": steady, "restart": restart}
    if steady["p99_ms"] != steady["p99_ms"]:
        t.rows[0][1][4] = na("no requests")
    return sec
