"""Drive the benchmark: chat streams (device) -> all training jobs at once (pool) -> the
timing-sensitive sections with the pool closed -> plots, report.md, results.json."""
from __future__ import annotations

import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from device.contracts.config import DEFAULT_MODEL_DIR

from . import env, report
from .chats import DOMAINS, generate_samples, run_chats
from .common import Context, chat_seed
from .jobs import Runner
from .profiles import PROFILES


def log(msg: str, t0: float) -> None:
    print(f"[bench {time.time() - t0:6.0f}s] {msg}", file=sys.stderr, flush=True)


def run_bench(profile: str = "quick", out: Path = Path("results"), seeds: int | None = None,
              workers: int | None = None, model_dir: Path = DEFAULT_MODEL_DIR, command: str = "cdcca bench",
              keep_work: bool = False) -> Path:
    from .seam_jobs import is_hf_build

    if is_hf_build(model_dir):  # an HF build folder: the bench on the family seam (like cloud/round_job)
        from .seam import run_seam_bench

        return run_seam_bench(profile, out, seeds, workers, Path(model_dir), command, keep_work)
    # the legacy TinyLlava sections (imported here: the seam path does not depend on them)
    from . import ablations, accuracy, continual, device_perf, fleet, plots, transmission

    t0 = time.time()
    prof = PROFILES[profile].with_seeds(seeds)
    if workers is not None:
        from dataclasses import replace

        prof = replace(prof, workers=workers)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="cdcca-bench-"))
    ctx = Context(prof, out, work, Path(model_dir))
    meta = {"command": command, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": env.machine(), "versions": env.versions(), "profile": asdict(prof), "timings": {}}
    timings = meta["timings"]
    try:
        t = time.time()
        for s in ctx.seeds:
            stream = run_chats(generate_samples(DOMAINS, prof.chats_per_domain, chat_seed(s), chat_seed(s)),
                               home=work / f"chat-home-{s}", seed=s)
            ctx.streams.append(stream)
            log(f"seed {s}: {len(stream.chats)} chats on the device, UTS kept {len(stream.kept_samples)}", t0)
        timings["chat streams (device)"] = time.time() - t
        t = time.time()
        jobs = continual.jobs(ctx) + accuracy.jobs(ctx) + ablations.jobs(ctx)
        log(f"{len(jobs)} training/evaluation jobs on {prof.workers} worker(s)", t0)
        with Runner(ctx.model_dir, prof.eval_n, prof.replay_n, prof.workers) as runner:
            ctx.results.update(runner.run(jobs, lambda r: log(f"job {r['name']} done in {r['seconds']:.0f}s", t0)))
        timings["training + evaluation jobs"] = time.time() - t
        sections = {}
        for key, fn in (("accuracy", accuracy.build), ("ablations", ablations.build), ("continual", continual.build),
                        ("transmission", transmission.run), ("device", device_perf.run), ("fleet", fleet.run)):
            t = time.time()
            sections[key] = fn(ctx)
            sections[key].seconds = time.time() - t
            timings[sections[key].title + (" (tables; training is in the jobs row)" if key in
                                           ("accuracy", "ablations", "continual") else "")] = sections[key].seconds
            log(f"section {key} done", t0)
        for key in ("accuracy", "ablations", "continual"):  # their compute ran in the jobs
            sections[key].compute_s = sum(r["seconds"] for n, r in ctx.results.items()
                                          if isinstance(r, dict) and "seconds" in r and _owner(n) == key)
        t = time.time()
        plots.all_plots(sections, out)
        timings["plots + report"] = time.time() - t
        meta["seeds_text"] = (f"chat streams {', '.join(str(chat_seed(s)) for s in ctx.seeds)} (scene generator), "
                              f"AKD seeds {', '.join(map(str, ctx.seeds))}, random-selection seeds "
                              f"{', '.join(str(10_000 + s) for s in ctx.seeds)}, eval split 2000, device prompts 4000, "
                              "continual rounds 100/200/...; the models are the embedded build (seed 0).")
        meta["wall_s"] = time.time() - t0
        timings["total"] = meta["wall_s"]
        md, _ = report.write(out, meta, sections)
        log(f"wrote {md} ({meta['wall_s'] / 60:.1f} min)", t0)
        return md
    finally:
        if not keep_work:
            shutil.rmtree(work, ignore_errors=True)


def _owner(job_name: str) -> str:
    if job_name == "continual":
        return "continual"
    if job_name.startswith(("akd-", "mask-")):
        return "ablations"
    return "accuracy"
