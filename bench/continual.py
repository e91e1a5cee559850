"""Section 6 -- continual rounds: domain shifts arrive one after another; after each round the
device runs the patched model and the next round starts from it."""
from __future__ import annotations

from .chats import DOMAINS
from .common import Context, Section, columns_of, pts, target_mean, vqa
from .table import Table, na, num


def jobs(ctx: Context) -> list[dict]:
    p = ctx.profile
    return [dict(kind="continual", name="continual", work_dir=str(ctx.work / "continual"),
                 domains=list(p.continual_domains), chats=p.continual_chats, steps=p.steps, seed=0)]


def build(ctx: Context) -> Section:
    res = ctx.results["continual"]["rounds"]
    sec = Section("continual", "6. Continual rounds (domain shifts in sequence)")
    cols = ["model"] + [f"{d} VQA" for d in DOMAINS] + ["target mean VQA", "caption F1", "samples", "patch KiB"]
    t = Table("continual", "Accuracy after each round (torch-measured on the patched device weights)", cols)
    start = res[0]["accuracy"]["before"]
    t.add("start (device as shipped)", [num(x) for x in columns_of(start)] + [na("no round yet"), na("no round yet")])
    series = {"start": columns_of(start)}
    for i, r in enumerate(res, 1):
        acc = r["accuracy"]["after"]
        label = f"after round {i} ({r['domain']})"
        t.add(label, [num(x) for x in columns_of(acc)] + [num(r["samples"], "{:.0f}"), num(r["patch_bytes"] / 1024, "{:.1f}")])
        series[label] = columns_of(acc)
    t.add("teacher (upper bound)", [num(x) for x in columns_of(res[0]["accuracy"]["teacher"])] +
          [na("not adapted"), na("not adapted")])
    p = ctx.profile
    t.notes = [
        f"Each round: {p.continual_chats} fresh chats of the round's domain + {max(1, p.continual_chats // 4)} source "
        "chats (mixed), answered by the device running the CURRENT version (llama.cpp); UTS keeps samples through "
        "one persistent queue; the cloud's own `run_round` (teacher labels -> AKD -> Fisher -> 48 KiB DWC patch) "
        f"learns from them with {p.steps} AKD steps; the next round's device model is the patched one.",
        "Accuracy: torch evaluation of the patched weights (`dwc.patched_twin`, what the device runs after applying "
        f"the patch) on the cloud's eval split ({p.eval_n} per domain); run_round reports it.",
    ]
    sec.tables.append(t)
    prev = start
    for i, r in enumerate(res, 1):
        acc = r["accuracy"]["after"]
        d = r["domain"]
        sec.findings.append(f"Round {i} ({d}): {d} {pts(vqa(acc, d) - vqa(prev, d))}, target mean "
                            f"{pts(target_mean(acc) - target_mean(prev))}, source {pts(vqa(acc, 'source') - vqa(prev, 'source'))}.")
        if vqa(acc, d) <= vqa(prev, d) + 0.005:
            sec.not_beaten.append(f"Continual round {i}: the round's own domain ({d}) did not improve "
                                  f"({vqa(prev, d):.3f} -> {vqa(acc, d):.3f}).")
        prev = acc
    drop = vqa(prev, "source") - vqa(start, "source")
    s = f"Source domain after {len(res)} rounds: {vqa(start, 'source'):.3f} -> {vqa(prev, 'source'):.3f} ({pts(drop)})"
    sec.findings.append(s + (": not forgotten (within 2 points)." if drop >= -0.02 else ": FORGETTING beyond 2 points."))
    if drop < -0.02:
        sec.not_beaten.append(s + ": forgetting.")
    for i, d in enumerate(r["domain"] for r in res[:-1]):
        later = res[-1]["accuracy"]["after"]
        own = res[i]["accuracy"]["after"]
        if vqa(later, d) < vqa(own, d) - 0.02:
            s = (f"Domain {d} (round {i + 1}) loses {pts(vqa(later, d) - vqa(own, d))} by the last round "
                 "(forgetting of an earlier target domain).")
            sec.findings.append(s)
            sec.not_beaten.append(s)
    sec.data = {"series": series, "rounds": [{k: v for k, v in r.items() if k != "accuracy"} for r in res],
                "columns": cols[1:8]}
    return sec
