"""The benchmark's job pool: spawned worker processes, one torch thread each.

Every job is seeded, so results do not depend on scheduling; ``workers <= 1`` runs the jobs in
this process (the tiny test profile, debugging).  The caller passes its ``init_worker``
(loads models once per process) and ``run_job`` (bench.seam_jobs.Runner does)."""
from __future__ import annotations

import multiprocessing as mp
from typing import Any, Callable


class JobPool:
    def __init__(self, init_worker: Callable[..., None], run_job: Callable[[dict], dict],
                 args: tuple[Any, ...], workers: int = 2) -> None:
        self.init_worker, self.run_job, self.args, self.workers, self.pool = init_worker, run_job, args, workers, None

    def __enter__(self) -> "JobPool":
        if self.workers > 1:
            self.pool = mp.get_context("spawn").Pool(self.workers, self.init_worker, self.args)
        else:
            self.init_worker(*self.args)
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.close() if exc[0] is None else self.pool.terminate()
            self.pool.join()

    def run(self, jobs: list[dict], on_done: Callable[[dict], None] | None = None) -> dict[str, dict]:
        """Results by job name, in completion order; ``on_done`` sees each as it finishes."""
        out = {}
        it = self.pool.imap_unordered(self.run_job, jobs) if self.pool is not None else map(self.run_job, jobs)
        for res in it:
            out[res["name"]] = res
            if on_done is not None:
                on_done(res)
        return out
