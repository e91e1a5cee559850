"""Section 4 -- a fleet against a cloud of separate processes (issues 11 and 13): one
``cdcca cloud serve --workers 0`` API process and two round-worker processes on PostgreSQL
(SQLite if no PostgreSQL is installed, said in the notes), N device processes each with its own
token and durable queue uploading through the product client (``sync_queue``).

* steady run: uploads, then ``round_devices`` devices request a round at the same moment while
  the bench polls ``GET /v1/rounds`` (the API must stay responsive while workers run rounds);
* restart run: the same uploads with the API process killed (SIGKILL) when 30% are stored and
  restarted on the same port after ``fleet_restart_s`` seconds.

Exactly-once is checked in SQL on the store.  The workers run a *synthetic* CPU-bound round
(a busy loop of ``fleet_round_s`` seconds, progress reported like a real round) so that the
section measures the queue and the scheduling, not AKD (sections 1 and 5 measure that).
"""
from __future__ import annotations

import multiprocessing as mp
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from .common import Context, Section
from .fleet_procs import ROOT, CloudProcs, fleet_device
from .synth import synthetic_id
from .table import Table, na, num


# --- a phase ----------------------------------------------------------------------------------------

def _stored(store, prefix: str) -> int:
    from sqlalchemy import func, select

    from cloud.schema import samples
    with store.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(samples)
                            .where(samples.c.device.like(f"{prefix}-%"))).scalar_one()


def _poll_status(url: str, token: str, stop: threading.Event, out: list[float]) -> None:
    import httpx

    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=10) as c:
        while not stop.is_set():
            t = time.perf_counter()
            try:
                c.get("/v1/rounds")
                out.append(time.perf_counter() - t)
            except httpx.HTTPError:
                pass
            stop.wait(0.02)


def _exactly_once(store, prefix: str, names: list[str], n: int) -> dict:
    from sqlalchemy import func, select

    from cloud.schema import rounds, samples
    with store.engine.connect() as conn:
        rows = conn.execute(select(samples.c.device, samples.c.sample_id)
                            .where(samples.c.device.like(f"{prefix}-%"))).all()
        doubled = conn.execute(select(samples.c.device, samples.c.sample_id, func.count())
                               .where(samples.c.device.like(f"{prefix}-%"))
                               .group_by(samples.c.device, samples.c.sample_id)
                               .having(func.count() > 1)).all()
        used = conn.execute(select(func.count()).select_from(samples).where(
            samples.c.device.like(f"{prefix}-%"), samples.c.round_id.is_not(None))).scalar_one()
        learnt = conn.execute(select(func.coalesce(func.sum(rounds.c.n_samples), 0)).where(
            rounds.c.device.like(f"{prefix}-%"), rounds.c.state == "done")).scalar_one()
    got: dict[str, set[str]] = {}
    for dev, sid in rows:
        got.setdefault(dev, set()).add(sid)
    ids_ok = all(got.get(d, set()) == {synthetic_id(d, i) for i in range(n)} for d in names)
    return {"stored_rows": len(rows), "distinct": len(set(rows)), "doubled": len(doubled),
            "exactly_once": ids_ok and not doubled and len(rows) == len(names) * n,
            "samples_learnt": int(learnt), "samples_marked_used": int(used)}


def _phase(cloud: CloudProcs, store, work: Path, prefix: str, n_dev: int, n: int, batch: int,
           restart_at: float | None, restart_s: float, round_devices: int) -> dict:
    mpc = mp.get_context("spawn")
    ready, results, go, go_rounds = mpc.Queue(), mpc.Queue(), mpc.Event(), mpc.Event()
    names = [f"{prefix}-{i}" for i in range(n_dev)]
    tokens = {name: store.add_device(name) for name in names}
    procs = []
    for i, name in enumerate(names):
        qdir = work / prefix / name
        qdir.mkdir(parents=True, exist_ok=True)
        procs.append(mpc.Process(target=fleet_device, daemon=True, args=(
            cloud.url, tokens[name], str(qdir), name, n, batch, i, ready, go, go_rounds, results,
            i < round_devices)))
    t_spawn = time.perf_counter()
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=600)
    spawn_s = time.perf_counter() - t_spawn
    expected = n_dev * n
    t0 = time.time()
    go.set()
    restart = None
    if restart_at is not None:
        while _stored(store, prefix) < restart_at * expected and any(p.is_alive() for p in procs):
            time.sleep(0.01)
        at = _stored(store, prefix)
        t = time.perf_counter()
        cloud.kill_api()
        time.sleep(restart_s)
        cloud.start_api()
        restart = {"stored_at_restart": at, "expected": expected, "downtime_s": time.perf_counter() - t}
    uploads = [results.get(timeout=900)[1] for _ in procs]
    t1 = max(r["t_end"] for r in uploads)
    status_lat: list[float] = []
    idle_lat: list[float] = []
    stop = threading.Event()
    rounds_out = []
    for proc in procs[round_devices:]:  # devices without a round are done: let them exit first
        proc.join(60)
    if round_devices:  # baseline first: the same polling for 3 s while the workers are idle
        idle = threading.Event()
        poller = threading.Thread(target=_poll_status, args=(cloud.url, tokens[names[0]], idle, idle_lat))
        poller.start()
        time.sleep(3.0)
        idle.set()
        poller.join(10)
        poller = threading.Thread(target=_poll_status, args=(cloud.url, tokens[names[0]], stop, status_lat))
        poller.start()
        go_rounds.set()
        rounds_out = [results.get(timeout=900)[1] for _ in range(round_devices)]
        stop.set()
        poller.join(10)
    for p in procs:
        p.join(30)
    lat = np.array([x for r in uploads for x in r["latencies"]], dtype=float)
    slat = np.array(status_lat, dtype=float)
    ilat = np.array(idle_lat, dtype=float)
    done = [r for r in rounds_out if r["state"] == "done"]
    span = (max(r["finished"] for r in done) - min(r["requested"] for r in done)) if done else float("nan")
    return {"devices": n_dev, "per_device": n, "expected": expected, **_exactly_once(store, prefix, names, n),
            "counts_ok": all(store.sample_counts(d).total == n for d in names),
            "requests": int(lat.size), "seconds": t1 - t0, "throughput": expected / max(t1 - t0, 1e-9),
            "p50_ms": float(np.percentile(lat, 50) * 1e3) if lat.size else float("nan"),
            "p99_ms": float(np.percentile(lat, 99) * 1e3) if lat.size else float("nan"),
            "latencies_ms": (lat * 1e3).round(3).tolist(), "accepted": sum(r["accepted"] for r in uploads),
            "duplicates_answered": sum(r["duplicates"] for r in uploads),
            "client_errors": sum(r["errors"] for r in uploads),
            "left_pending": sum(r["pending"] for r in uploads), "spawn_s": spawn_s, "restart": restart,
            "rounds": rounds_out, "rounds_done": len(done),
            "rounds_per_min": len(done) / span * 60 if done else float("nan"),
            "status_requests": int(slat.size),
            "status_p50_ms": float(np.percentile(slat, 50) * 1e3) if slat.size else float("nan"),
            "status_p99_ms": float(np.percentile(slat, 99) * 1e3) if slat.size else float("nan"),
            "idle_status_p50_ms": float(np.percentile(ilat, 50) * 1e3) if ilat.size else float("nan"),
            "idle_status_p99_ms": float(np.percentile(ilat, 99) * 1e3) if ilat.size else float("nan"),
            "idle_status_requests": int(ilat.size)}


# --- the section ------------------------------------------------------------------------------------

def run(ctx: Context) -> Section:
    from cloud.store import Store
    from device.contracts.config import load_settings

    p = ctx.profile
    sec = Section("fleet", "4. Fleet: device processes against API + 2 worker processes, and a cloud restart")
    home = ctx.work / "fleet-home"
    (home / "cloud").mkdir(parents=True, exist_ok=True)
    pg, db_note = None, "PostgreSQL (a throwaway server started by cloud.pg_local)"
    try:
        from cloud.pg_local import PostgresServer

        pg = PostgresServer()
        db_url = pg.new_database()
    except (FileNotFoundError, subprocess.CalledProcessError) as exc:
        db_url, db_note = None, f"SQLite (PostgreSQL unavailable: {str(exc).splitlines()[0][:120]})"
    store = Store(load_settings(home=home, db_url=db_url))
    cloud = CloudProcs(home, db_url, p.fleet_round_s).start()
    n_rounds = min(p.fleet_round_devices, p.fleet_devices)
    try:
        steady = _phase(cloud, store, ctx.work / "fleet", "steady", p.fleet_devices, p.fleet_samples,
                        p.fleet_batch, None, 0.0, n_rounds)
        restart = _phase(cloud, store, ctx.work / "fleet", "restart", p.fleet_devices, p.fleet_samples,
                         p.fleet_batch, 0.3, p.fleet_restart_s, 0)
    finally:
        cloud.stop()
        store.close()
        if pg is not None:
            pg.stop()
    _tables(sec, p, steady, restart, cloud.peak, db_note)
    sec.data = {"steady": steady, "restart": restart, "peak_rss_mib": cloud.peak, "database": db_note}
    return sec


def _tables(sec: Section, p, steady: dict, restart: dict, peak: dict, db_note: str) -> None:
    t = Table("fleet", "Concurrent uploads through the product client", [
        "run", "devices x samples", "upload requests", "throughput (samples/s)", "p50 request ms", "p99 request ms",
        "stored rows / expected", "exactly once", "re-sends answered as duplicate", "failed syncs retried"])
    for label, r in (("steady (no restart)", steady), ("cloud killed + restarted mid-run", restart)):
        t.add(label, [num(r["devices"] * r["per_device"], "{:.0f}"), num(r["requests"], "{:.0f}"),
                      num(r["throughput"], "{:.0f}"), num(r["p50_ms"], "{:.1f}"), num(r["p99_ms"], "{:.1f}"),
                      num(r["stored_rows"] / r["expected"], "{:.3f}"), num(1.0 if r["exactly_once"] else 0.0, "{:.0f}"),
                      num(r["duplicates_answered"], "{:.0f}"), num(r["client_errors"], "{:.0f}")])
    if steady["p99_ms"] != steady["p99_ms"]:
        t.rows[0][1][4] = na("no requests")
    rs = restart["restart"]
    t.notes = [
        f"Cloud: `cdcca cloud serve --workers 0` (uvicorn + FastAPI) and 2 `cdcca cloud worker`-style processes "
        f"(bench.fleet_procs worker: the product Worker with a synthetic round), store on {db_note}. "
        f"{p.fleet_devices} device processes (spawn), each with its own token and SQLite queue of {p.fleet_samples} "
        f"schema-valid synthetic UplinkSamples (~2 KB PNG each), uploading with `sync_queue` in requests of "
        f"{p.fleet_batch}. Latency = one upload request as the device's CloudClient sees it, retries included.",
        f"Restart run: when {rs['stored_at_restart']} of {rs['expected']} samples were stored the API process was "
        f"killed (SIGKILL) and started again on the same data and port {rs['downtime_s']:.1f} s later.",
        "'Exactly once' = 1 when every generated sample id of every device is in the store exactly once and nothing "
        "else is (SQL GROUP BY ... HAVING count(*) > 1 finds none), else 0. The machine was shared and loaded.",
    ]
    sec.tables.append(t)
    waits = [r["queue_wait_s"] for r in steady["rounds"] if r["state"] == "done"]
    t2 = Table("fleet_rounds", "Rounds: devices requesting at once, two workers, fair by age", [
        "run", "rounds requested", "done", "rounds/min", "queue wait min s", "queue wait median s", "queue wait max s",
        "GET status p50 ms", "GET status p99 ms", "idle: GET p50 ms", "idle: GET p99 ms",
        "API peak RSS MiB", "worker peak RSS MiB"])
    t2.add("steady run", [num(len(steady["rounds"]), "{:.0f}"), num(steady["rounds_done"], "{:.0f}"),
                          num(steady["rounds_per_min"], "{:.1f}"),
                          num(min(waits) if waits else float("nan"), "{:.1f}"),
                          num(float(np.median(waits)) if waits else float("nan"), "{:.1f}"),
                          num(max(waits) if waits else float("nan"), "{:.1f}"),
                          num(steady["status_p50_ms"], "{:.1f}"), num(steady["status_p99_ms"], "{:.1f}"),
                          num(steady["idle_status_p50_ms"], "{:.1f}"), num(steady["idle_status_p99_ms"], "{:.1f}"),
                          num(peak["api"], "{:.0f}"), num(peak["worker"], "{:.0f}")])
    t2.notes = [
        f"{len(steady['rounds'])} devices call POST /v1/rounds at the same moment after their uploads; each round is "
        f"a synthetic CPU-bound {p.fleet_round_s:g} s busy loop per worker (measures queue + scheduling, not AKD). "
        "Queue wait = started_at - created_at of each device's round. GET status = GET /v1/rounds polled every "
        f"20 ms by the bench while the workers ran ({steady['status_requests']} requests); 'idle' = the same "
        "polling for 3 s just before, workers idle ("
        f"{steady['idle_status_requests']} requests; baseline, same run). Peak RSS = VmHWM.",
    ]
    sec.tables.append(t2)
    for label, r in (("Steady run", steady), ("Restart run", restart)):
        ok = r["exactly_once"] and r["counts_ok"] and r["left_pending"] == 0
        sec.findings.append(f"{label}: {r['stored_rows']} of {r['expected']} samples stored, "
                            + ("every one exactly once." if ok else "NOT exactly once (see table)."))
        if not ok:
            sec.not_beaten.append(f"Fleet {label.lower()}: samples lost or duplicated.")
    if steady["samples_learnt"] != steady["samples_marked_used"]:
        sec.not_beaten.append("Rounds: samples marked used differ from the rounds' sample counts.")
    sec.findings.append(f"Restart: {restart['client_errors']} device syncs failed during the "
                        f"{rs['downtime_s']:.1f} s outage (each re-ran from its durable queue); "
                        f"{restart['duplicates_answered']} re-sent samples were answered as duplicates.")
    if rs["stored_at_restart"] >= rs["expected"]:
        sec.findings.append("The uploads finished before the restart: the restart run did not exercise recovery.")

def _section_main(profile: str, out: Path) -> None:
    """`python -m bench.fleet run quick|full OUT`: this section alone; OUT/fleet.json + a summary."""
    import json

    from .profiles import PROFILES

    ctx = Context(profile=PROFILES[profile], out=out, work=out / "work", model_dir=ROOT)
    sec = run(ctx)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fleet.json").write_text(json.dumps({"findings": sec.findings, "not_beaten": sec.not_beaten,
                                                "data": sec.data}, indent=1, default=str))
    for key in ("steady", "restart"):
        r = sec.data[key]
        print(f"{key}: {r['stored_rows']}/{r['expected']} exactly_once={r['exactly_once']} "
              f"throughput={r['throughput']:.0f}/s p50={r['p50_ms']:.0f} ms p99={r['p99_ms']:.0f} ms "
              f"failed_syncs={r['client_errors']} restart={r['restart']}")
    r = sec.data["steady"]
    print(f"rounds: {r['rounds_done']}/{len(r['rounds'])} done, {r['rounds_per_min']:.1f}/min, queue waits "
          f"{sorted(round(x['queue_wait_s'], 2) for x in r['rounds'] if 'queue_wait_s' in x)} s; GET status "
          f"p50/p99 {r['status_p50_ms']:.1f}/{r['status_p99_ms']:.1f} ms busy, "
          f"{r['idle_status_p50_ms']:.1f}/{r['idle_status_p99_ms']:.1f} ms idle; peak RSS {sec.data['peak_rss_mib']}")


if __name__ == "__main__" and len(sys.argv) >= 4 and sys.argv[1] == "run":
    _section_main(sys.argv[2], Path(sys.argv[3]))
