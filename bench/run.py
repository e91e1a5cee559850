"""Drive `cdcca bench` on the family seam: device chat streams -> every training / device-evaluation
job at once (bench.pool) -> the accuracy and continual sections -> the timing-sensitive sections
(transmission, device, fleet) with the pool closed -> plots, report.md, results.json."""
from __future__ import annotations

import shutil
import sys
import tempfile
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

from cloud.zoo.hf_assets import is_build_folder
from device.contracts.config import DEFAULT_MODEL_DIR

from . import env, report, seam, seam_continual, seam_mask
from .chats import DOMAINS, run_chats
from .common import DEFAULT_BUDGET, Context
from .profiles import PROFILES
from .seam_jobs import Runner, chat_seed, device_model, drifted_pair, stream_samples


def log(msg: str, t0: float) -> None:
    print(f"[bench {time.time() - t0:6.0f}s] {msg}", file=sys.stderr, flush=True)


def check_model_dir(model_dir: Path) -> None:
    """One clear line for a folder the bench cannot run on."""
    if not is_build_folder(model_dir):
        raise ValueError(f"{model_dir}: not an HF build folder (no teacher/config.json + manifest.json); cdcca bench runs on the "
                         "family seam and needs a folder built by `cdcca models build` (default: "
                         f"{DEFAULT_MODEL_DIR})")


def run_bench(profile: str = "quick", out: Path = Path("results"), seeds: int | None = None,
              workers: int | None = None, model_dir: Path = DEFAULT_MODEL_DIR, command: str = "cdcca bench",
              keep_work: bool = False) -> Path:
    model_dir, out = Path(model_dir), Path(out)
    check_model_dir(model_dir)
    from . import device_perf, fleet, plots, transmission  # after the check: a refusal stays instant

    t0 = time.time()
    prof = PROFILES[profile].with_seeds(seeds)
    prof = replace(prof, workers=workers) if workers is not None else prof
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="cdcca-bench-"))
    meta = {"command": command, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": env.machine(), "versions": env.versions(), "profile": asdict(prof), "timings": {}}
    timings = meta["timings"]
    ss = seam.seeds_of(prof)
    ctx = Context(prof, out, work, model_dir)
    try:
        t, uplink = time.time(), {}
        jobs = [dict(kind="base", name="base"), *seam.full_ft_jobs(prof, work), seam_continual.job(prof, work)]
        dm = device_model(model_dir)
        n = prof.chats_per_domain * len(DOMAINS)
        for s in ss:
            for kind in seam.STREAMS:
                st = run_chats(stream_samples(kind, s, n), home=work / f"chat-{kind}-{s}", model=dm, seed=s)
                log(f"seed {s} {kind}: {len(st.chats)} chats on the device, UTS kept {len(st.kept_samples)}", t0)
                jobs += seam.stream_jobs(prof, kind, s, st, work, uplink)
                if kind == "drift" and s == ss[0]:  # transmission's uplink and the mask sweep's chats
                    ctx.stream = st
                    mask_jobs, mask_info = seam_mask.jobs(prof, st, s, work, seam.akd_config(prof, s))
                    jobs += mask_jobs
        timings["chat streams (device)"] = time.time() - t
        t = time.time()
        log(f"{len(jobs)} training/evaluation jobs on {prof.workers} worker(s)", t0)
        with Runner(model_dir, prof.eval_n, prof.replay_n, prof.workers) as r:
            res = r.run(jobs, lambda x: log(f"job {x['name']} done in {x['seconds']:.0f}s", t0))
        timings["training + device evaluation jobs"] = time.time() - t
        lead = res[f"drift-cdcca-s{ss[0]}"]
        ctx.patch = Path(lead["patches"][str(DEFAULT_BUDGET)]["path"])
        ctx.delta = Path(lead["delta_blob"])
        t = time.time()
        sections = {"accuracy": seam.build(res, ss, uplink, prof), "continual": seam_continual.build(res, prof)}
        seam_mask.build(sections["accuracy"], res, mask_info, drifted_pair(ss[0]))
        sections["accuracy"].compute_s = sum(x["seconds"] for k, x in res.items() if k != "continual")
        sections["continual"].compute_s = res["continual"]["seconds"]
        for sec in sections.values():
            sec.seconds = time.time() - t
            timings[sec.title + " (tables; training is in the jobs row)"] = sec.seconds
        for key, fn in (("transmission", transmission.run), ("device", device_perf.run), ("fleet", fleet.run)):
            t = time.time()
            sections[key] = fn(ctx)
            sections[key].seconds = time.time() - t
            timings[sections[key].title] = sections[key].seconds
            log(f"section {key} done", t0)
        t = time.time()
        plots.all_plots(sections, out)
        meta["seeds_text"] = (f"reported seeds {', '.join(map(str, ss))} (seed 0 is the development seed, never "
                              f"reported); chat streams {', '.join(str(chat_seed(s)) for s in ss)} (scene generator), "
                              f"AKD seeds = the seed, random-selection seeds 10000+seed, device prompts "
                              f"{device_perf.PROMPT_SEED}; models: {model_dir} (eval split = the build's "
                              "data/eval.json).")
        timings["plots + report"] = time.time() - t
        meta["wall_s"] = time.time() - t0
        timings["total"] = meta["wall_s"]
        md, _ = report.write(out, meta, sections)
        log(f"wrote {md} ({meta['wall_s'] / 60:.1f} min)", t0)
        return md
    finally:
        if not keep_work:
            shutil.rmtree(work, ignore_errors=True)
