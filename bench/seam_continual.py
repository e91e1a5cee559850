"""Continual rounds on the family seam: drifts arrive one after another; each round the device
(llama.cpp, its CURRENT version) answers a fresh drift stream (70 % source, 30 % the round's domain),
UTS keeps what it keeps, the cloud's own ``cloud.round_job.run_round`` (teacher labels -> AKD ->
Fisher -> DWC patch within the product's downlink budget, registered as the next version) learns
from it, and the patched device is measured on the held-out set.  The question is issue 12's: does each earlier domain keep its gain?"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from device.contracts.metrics import paired_bootstrap

from .chats import DOMAINS
from .common import BUDGET_KIB, Section, mean, pts
from .table import Table, na, num

KEEP_FRACTION = 0.9  # issue 12: after the rounds each earlier domain keeps >= 90 % of its gain


@dataclass
class _Ctx:
    """What ``run_round`` reads from a cloud.rounds.RoundContext (a round with no server around it)."""

    round_id: str
    base_model: str
    samples: list
    options: object
    patch_path: Path
    work_dir: Path
    log: list = field(default_factory=list)

    def progress(self, stage: str, fraction: float, message: str = "") -> None:
        self.log.append((stage, fraction))

    def cancelled(self) -> bool:
        return False


def job(prof, work: Path) -> dict:
    return dict(kind="continual", name="continual", work=str(work / "continual"), domains=list(prof.continual_domains),
                chats=prof.chats_per_domain * len(DOMAINS), steps=prof.steps, seed=1)


def run_rounds(spec: dict) -> dict:
    """Worker side (bench.seam_jobs' loaded twin, teacher and eval set)."""
    from cloud.registry import ModelRegistry
    from cloud.round_job import HFAssets, run_round
    from device.contracts.feature_stats import FEATURE_STATS_FILE, FeatureStats
    from device.contracts.wire import RoundOptions
    from device.models import DeviceModel
    from device.queue import Queue

    from .chats import run_chats
    from .seam_jobs import _W, device_correct, stream_samples

    work = Path(spec["work"])
    registry = ModelRegistry(work / "registry")
    mid = registry.put(_W["files"])
    base = _W["assets"]
    assets = HFAssets(base.teacher_dir, base.replay_path, None)  # evaluation: ours, per question, below

    sp = _W["model_dir"] / FEATURE_STATS_FILE
    stats = FeatureStats.load(sp) if sp.is_file() else None
    rounds = [{"domain": None, "correct": device_correct(_W["files"])}]
    for r, domain in enumerate(spec["domains"]):
        f = registry.get(mid)
        dm = DeviceModel(f["model"], f["mmproj"], mid, stats, None, None)
        seed = spec["seed"] + 100 * (r + 1)
        stream = run_chats(stream_samples("drift", seed, spec["chats"], (domain,)), home=work / "device", model=dm,
                           threads=_W["threads"])
        with Queue(work / "device" / "device" / "queue.sqlite") as q:  # the sync would acknowledge them
            q.mark_acknowledged([s.sample_id for s in stream.kept_samples])
        opts = RoundOptions(steps=spec["steps"], seed=spec["seed"], max_samples=None)
        ctx = _Ctx(f"continual-{r}", mid, stream.kept_samples, opts, work / f"round{r}.gguf", work)
        m = run_round(ctx, registry, assets, threads=_W["threads"])
        mid = m["new_model"]
        rounds.append({"domain": domain, "chats": len(stream.chats), "kept": len(stream.kept_samples),
                       "patch_bytes": m["dwc"]["patch_file_bytes"], "correct": device_correct(registry.get(mid))})
    return {"rounds": rounds}


def build(res: dict, prof) -> Section:
    doms = res["base"]["domains"]
    rounds = res["continual"]["rounds"]
    acc = lambda c, d: mean([x for x, dd in zip(c, doms) if dd == d])  # noqa: E731
    sec = Section("continual", "5. Continual rounds on the family seam (device-measured)")
    cols = ["model"] + [f"{d} VQA" for d in DOMAINS] + ["UTS kept", "patch KiB"]
    t = Table("seam_continual", "Device accuracy after each round (llama.cpp on the patched GGUF)", cols)
    start = rounds[0]["correct"]
    t.add("start (device as shipped)", [num(acc(start, d)) for d in DOMAINS] + [na("no round yet"), na("no round yet")])
    for i, r in enumerate(rounds[1:], 1):
        t.add(f"after round {i} ({r['domain']})", [num(acc(r["correct"], d)) for d in DOMAINS]
              + [num(r["kept"], "{:.0f}"), num(r["patch_bytes"] / 1024, "{:.1f}")])
    t.notes = [f"Each round: a fresh drift stream of {rounds[1]['chats'] if len(rounds) > 1 else 0} chats (70 % "
               "source, 30 % the round's domain), answered by the device's current version with the product's "
               "UTS; the cloud's run_round learns from what UTS kept "
               f"({prof.steps} AKD steps, {BUDGET_KIB} patch budget); one seed (1), {doms.count('source')} held-out "
               "VQA per domain."]
    sec.tables.append(t)
    last = rounds[-1]["correct"]
    for i, r in enumerate(rounds[1:], 1):
        d, prev = r["domain"], rounds[i - 1]["correct"]
        diff, lo, hi = _paired(r["correct"], prev, doms, d)
        sec.findings.append(f"Round {i} ({d}): {d} {pts(diff)} (paired 95 % CI {pts(lo)} .. {pts(hi)}).")
        if lo <= 0:
            sec.not_beaten.append(f"Continual round {i}: the round's own domain ({d}) did not improve measurably "
                                  f"({pts(diff)}, CI {pts(lo)} .. {pts(hi)}).")
        if i < len(rounds) - 1:
            gain, kept = acc(r["correct"], d) - acc(start, d), acc(last, d) - acc(start, d)
            if gain > 0:
                s = (f"Domain {d} (round {i}) keeps {100 * kept / gain:.0f} % of its gain by the last round "
                     f"({pts(kept)} of {pts(gain)}; issue 12 asks >= {100 * KEEP_FRACTION:.0f} %).")
                sec.findings.append(s)
                if kept < KEEP_FRACTION * gain:
                    sec.not_beaten.append(s)
    diff, lo, hi = _paired(last, start, doms, "source")
    sec.findings.append(f"Source after {len(rounds) - 1} round(s): {pts(diff)} (paired 95 % CI {pts(lo)} .. {pts(hi)}).")
    sec.data = {"rounds": [{k: v for k, v in r.items() if k != "correct"} for r in rounds],
                "per_domain": [{d: acc(r["correct"], d) for d in DOMAINS} for r in rounds],
                "n_per_domain": {d: doms.count(d) for d in DOMAINS}}
    return sec


def _paired(a, b, doms, d) -> tuple[float, float, float]:
    return paired_bootstrap([x for x, dd in zip(a, doms) if dd == d], [x for x, dd in zip(b, doms) if dd == d])
