"""How a round's gain grows with its number of chats: one drift stream (70 % source) per size, the
product's UTS + AKD (the quick profile's steps) on the family seam, every-row and DWC-budget patches,
device-measured on the build's held-out set.  Why: the benchmark's two ceilings say a round is short
of drifted images; this measures it on CDCCA itself.

    python -m bench.round_size --seed 0 500 1000 2000     # seed 0 = the development seed
"""
from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

from device.contracts.config import DEFAULT_MODEL_DIR

from . import seam
from .chats import run_chats
from .common import DEFAULT_BUDGET, mean
from .profiles import PROFILES
from .seam_jobs import Runner, device_model, drifted_pair, stream_samples


def cdcca_job(prof, seed: int, n: int, work: Path, dm) -> tuple[dict, int]:
    st = run_chats(stream_samples("drift", seed, n), home=work / f"chat-{n}", model=dm, seed=seed)
    job = next(j for j in seam.stream_jobs(prof, "drift", seed, st, work, {}) if j["name"] == f"drift-cdcca-s{seed}")
    job = {k: v for k, v in job.items() if k not in ("delta_blob", "nofisher_budget")}
    return dict(job, name=f"n{n}", budgets=[None, DEFAULT_BUDGET], full_precision=False), len(st.kept_samples)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sizes", nargs="+", type=int, help="chats per round")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, help="AKD steps per round (default: the profile's)")
    ap.add_argument("--profile", choices=sorted(PROFILES), default="quick", help="eval size, batch, replay")
    a = ap.parse_args(argv)
    prof = PROFILES[a.profile]
    prof, work = replace(prof, steps=a.steps or prof.steps), Path(tempfile.mkdtemp(prefix="cdcca-round-size-"))
    jobs, kept, dm = [dict(kind="base", name="base")], {}, device_model(DEFAULT_MODEL_DIR)
    for n in a.sizes:
        job, kept[n] = cdcca_job(prof, a.seed, n, work, dm)
        jobs.append(job)
    with Runner(DEFAULT_MODEL_DIR, prof.eval_n, prof.replay_n, prof.workers) as r:
        res = r.run(jobs)
    doms, pair = res["base"]["domains"], drifted_pair(a.seed)
    acc = lambda c, keep: mean([x for x, d in zip(c, doms) if d in keep])  # noqa: E731
    src = res["base"]["student"]
    print(f"seed {a.seed}, drifted {'+'.join(pair)}, {prof.steps} AKD steps; as shipped: drifted "
          f"{acc(src, pair):.3f}, source {acc(src, ('source',)):.3f}")
    print("| chats | UTS kept | patch | KiB | drifted | gain pts | source |\n|---|---|---|---|---|---|---|")
    rows = []
    for n in a.sizes:
        for b in ("unlimited", str(DEFAULT_BUDGET)):
            p = res[f"n{n}"]["patches"][b]
            d = acc(p["correct"], pair)
            r = dict(chats=n, kept=kept[n], patch="every row" if b == "unlimited" else "DWC budget", bytes=p["bytes"],
                     drifted=d, gain=d - acc(src, pair), source=acc(p["correct"], ("source",)))
            rows.append(r)
            print(f"| {n} | {r['kept']} | {r['patch']} | {r['bytes'] / 1024:.0f} | {r['drifted']:.3f} | "
                  f"{100 * r['gain']:+.1f} | {r['source']:.3f} |")
    return rows


if __name__ == "__main__":
    main()
