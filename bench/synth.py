"""Synthetic but schema-valid UplinkSamples and the fleet's device process.  Kept free of torch
and of the rest of the bench so that dozens of spawned device processes start quickly."""
from __future__ import annotations

import base64
import hashlib
import io
import time
from pathlib import Path

import numpy as np
from PIL import Image

from device.contracts.wire import TokenStats, UplinkSample


def synthetic_id(device: str, i: int) -> str:
    return hashlib.sha256(f"{device}/{i}".encode()).hexdigest()[:32]


def synthetic_sample(device: str, i: int, seed: int = 0) -> UplinkSample:
    """A 32x32 image of coarse random blocks (PNG, ~2 KB like a UTS-kept scene) + QA text."""
    rng = np.random.default_rng([seed, i, int(hashlib.sha256(device.encode()).hexdigest()[:8], 16)])
    img = np.repeat(np.repeat(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), 2, 0), 2, 1)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    n_tok = int(rng.integers(1, 4))
    ent = [round(float(x), 4) for x in rng.uniform(0.2, 1.5, n_tok)]
    return UplinkSample(
        sample_id=synthetic_id(device, i), base_model="0" * 16, prompt="what colour is the circle?",
        answer="red", answer_token_ids=list(range(5, 5 + n_tok)), image=base64.b64encode(buf.getvalue()),
        image_format="png", tokens=TokenStats(positions=list(range(n_tok)), token_ids=list(range(5, 5 + n_tok)),
                                              entropy=ent),
        score=max(ent), ood_score=float(rng.uniform(0.5, 3.0)), raw_bytes=20_000, tag="fleet")


def _timed_client(url: str, token: str):
    from device.uplink import CloudClient

    class TimedClient(CloudClient):
        """Records the wall time of every sample-upload request (retries included)."""

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

    return TimedClient(url, token, retries=8, backoff=0.1, max_backoff=1.0)


def device_proc(url: str, token: str, qdir: str, device: str, n: int, batch: int, seed: int,
                ready, go, results, deadline_s: float = 300.0) -> None:
    """One simulated device: its own token and durable queue; uploads like `cdcca sync` does
    (sync_queue), and if the cloud is gone it re-syncs later -- the queue keeps what was not
    acknowledged."""
    from device.queue import Queue
    from device.uplink import CloudError, sync_queue

    q = Queue(Path(qdir) / "queue.sqlite")
    for i in range(n):
        q.add(synthetic_sample(device, i, seed))
    client = _timed_client(url, token)
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
    results.put({"device": device, "latencies": client.latencies, "accepted": accepted, "duplicates": dups,
                 "errors": errors, "acknowledged": st.acknowledged, "pending": st.pending,
                 "t_start": t0, "t_end": time.time()})
    client.close()
    q.close()
