"""A real ``cdcca cloud worker`` process body with a light runner (tests/cloud/test_worker.py):
``python tests/cloud/worker_proc.py HOME DB_URL|- LEASE_S STEPS``.

The runner reports progress ``STEPS`` times, 0.1 s apart, and writes a small patch whose bytes
name the worker's pid, so the test can tell which process finished the round."""
from __future__ import annotations

import os
import sys
import time

from cloud.worker import run_worker
from device.contracts.config import load_settings


def runner(steps: int):
    def run(ctx):
        for i in range(steps):
            ctx.progress("distil", i / steps, f"step {i}/{steps} on {os.getpid()}")
            time.sleep(0.1)
        ctx.patch_path.write_bytes(f"GGUF patch by {os.getpid()}".encode())
        return {"worker_pid": os.getpid(), "samples": len(ctx.samples)}

    return run


if __name__ == "__main__":
    home, db_url, lease, steps = sys.argv[1:5]
    settings = load_settings(home=home, db_url=None if db_url == "-" else db_url,
                             round_lease_s=float(lease))
    run_worker(settings, runner(int(steps)), poll_s=0.1)
