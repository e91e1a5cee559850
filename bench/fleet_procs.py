"""The fleet section's processes (bench/fleet.py): the cloud API and round workers as child
processes on one home folder and database, the workers' synthetic round, and one simulated device
(a spawned process uploading through the product client).

`python -m bench.fleet_procs worker ROUND_S` is a round worker: the product's worker loop with the
synthetic round."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from .synth import synthetic_sample

ROOT = Path(__file__).resolve().parents[1]


# --- processes ------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hwm_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class CloudProcs:
    """The API and the workers as child processes sharing one home folder and database."""

    def __init__(self, home: Path, db_url: str | None, round_s: float, workers: int = 2) -> None:
        self.home, self.db_url, self.round_s, self.n_workers = home, db_url, round_s, workers
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self.peak = {"api": 0.0, "worker": 0.0}
        self._stop = threading.Event()
        self._watch = threading.Thread(target=self._sample_rss, daemon=True)

    def _env(self) -> dict[str, str]:
        env = {**os.environ, "CDCCA_HOME": str(self.home), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(ROOT)}
        if self.db_url:
            env["CDCCA_DB_URL"] = self.db_url
        return env

    def start(self) -> "CloudProcs":
        self.start_api()
        log = open(self.home / "workers.log", "ab")
        self.workers = [subprocess.Popen([sys.executable, "-m", "bench.fleet_procs", "worker", str(self.round_s)],
                                         env=self._env(), stdout=log, stderr=log) for _ in range(self.n_workers)]
        self._watch.start()
        return self

    def start_api(self) -> None:
        import httpx

        log = open(self.home / "api.log", "ab")
        self.api = subprocess.Popen([sys.executable, "-m", "cdcca_cli", "cloud", "serve", "--workers", "0",
                                     "--host", "127.0.0.1", "--port", str(self.port)],
                                    env=self._env(), stdout=log, stderr=log)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError(f"the cloud API did not start; see {self.home / 'api.log'}")

    def kill_api(self) -> None:
        self.peak["api"] = max(self.peak["api"], _hwm_mib(self.api.pid))
        self.api.send_signal(signal.SIGKILL)
        self.api.wait(30)

    def _sample_rss(self) -> None:
        while not self._stop.wait(0.2):
            if self.api is not None and self.api.poll() is None:
                self.peak["api"] = max(self.peak["api"], _hwm_mib(self.api.pid))
            for w in self.workers:
                self.peak["worker"] = max(self.peak["worker"], _hwm_mib(w.pid))

    def stop(self) -> None:
        self._stop.set()
        for p in [self.api, *self.workers]:
            if p is not None and p.poll() is None:
                p.terminate()
        for p in [self.api, *self.workers]:
            if p is not None:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()


def busy_round(round_s: float):
    """The workers' synthetic round: burns one core for ``round_s`` seconds like training would."""
    def run(ctx):
        t0 = time.monotonic()
        x = np.random.default_rng(0).standard_normal((128, 128))
        while (elapsed := time.monotonic() - t0) < round_s:
            for _ in range(20):
                x = np.tanh(x @ x.T / 128)
            ctx.progress("distil", min(0.99, elapsed / round_s), "synthetic round")
        ctx.patch_path.write_bytes(b"GGUF synthetic patch " + ctx.round_id.encode())
        return {"samples": len(ctx.samples), "seconds": round(time.monotonic() - t0, 3)}

    return run


# --- one device (a spawned process) ---------------------------------------------------------------

def _product_client(url: str, token: str):
    """The device's CloudClient with the product's own retry policy (a time budget that rides
    out a restart), recording the wall time of every sample-upload request, retries included."""
    from device.uplink import CloudClient

    class TimedClient(CloudClient):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.latencies: list[float] = []

        def _json(self, method, path, **kwargs):
            t = time.perf_counter()
            try:
                return super()._json(method, path, **kwargs)
            finally:
                if method == "POST" and path == "/v1/samples":
                    self.latencies.append(time.perf_counter() - t)

    return TimedClient(url, token)


def fleet_device(url: str, token: str, qdir: str, device: str, n: int, batch: int, seed: int, ready, go,
                 go_rounds, results, do_round: bool, deadline_s: float = 600.0) -> None:
    """Upload like `cdcca sync` (re-sync from the durable queue after a failed sync), then
    optionally request one round and wait for it."""
    from device.contracts.wire import RoundOptions, RoundRequest
    from device.queue import Queue
    from device.queue_sync import sync_queue
    from device.uplink import CloudError

    q = Queue(Path(qdir) / "queue.sqlite")
    for i in range(n):
        q.add(synthetic_sample(device, i, seed))
    client = _product_client(url, token)
    ready.put(device)
    go.wait()
    t0, accepted, dups, errors = time.time(), 0, 0, 0
    while time.time() - t0 < deadline_s:
        try:
            r = sync_queue(q, client, batch_size=batch)
            accepted += len(r.accepted)
            dups += len(r.duplicates)
        except CloudError:
            errors += 1
            q.reset_sent_to_pending()
            time.sleep(0.1)
        if q.stats().pending == 0:
            break
    st = q.stats()
    results.put(("upload", {"device": device, "latencies": client.latencies, "accepted": accepted,
                            "duplicates": dups, "errors": errors, "pending": st.pending,
                            "t_start": t0, "t_end": time.time()}))
    q.close()
    if do_round:
        go_rounds.wait()
        t = time.time()
        try:
            rid = client.start_round(RoundRequest(base_model="0" * 16, options=RoundOptions(max_samples=n))).round_id
            final = client.wait_round(rid, poll=0.2, timeout=deadline_s)
            results.put(("round", {"device": device, "state": final.state, "message": final.message,
                                   "queue_wait_s": (final.started_at - final.created_at).total_seconds(),
                                   "run_s": (final.finished_at - final.started_at).total_seconds(),
                                   "requested": t, "finished": time.time(), "round_id": rid}))
        except CloudError as exc:
            results.put(("round", {"device": device, "state": "error", "message": str(exc)}))
    client.close()


def _worker_main(round_s: float) -> None:
    """`python -m bench.fleet_procs worker ROUND_S`: the product's worker loop with the synthetic round."""
    from cloud.worker import run_worker
    from device.contracts.config import load_settings

    run_worker(load_settings(), busy_round(round_s), poll_s=0.2)


if __name__ == "__main__" and len(sys.argv) >= 3 and sys.argv[1] == "worker":
    _worker_main(float(sys.argv[2]))
