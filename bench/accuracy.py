"""Section 1 -- the paper's Tables 1-2 in miniature: accuracy per domain after one round.

Every trained row learns from the SAME chat stream of its seed (the real device answered it and
UTS decided), with the same AKD steps, batch, learning rate and source replay; only the data
selection and the loss terms differ.  Pseudo-label, random and CDCCA rows learn from exactly k
samples (k = what UTS kept); vanilla KD is the no-selection baseline and learns from all n chats.
"""
from __future__ import annotations

import numpy as np

from cloud.round_job import distill_set
from device.contracts.wire import RoundOptions

from .chats import DOMAINS
from .common import DEFAULT_BUDGET, Context, Section, columns_of, compare, mean, pts
from .table import Table, mean_std, na

IMAGE_SIZE = 32
METHODS = (
    ("source", "Source-only student (device model as shipped, q4_0)"),
    ("teacher", "Teacher (upper bound)"),
    ("pseudo", "Pseudo-label fine-tuning only (CE on teacher answers, UTS samples)"),
    ("vanilla", "Vanilla logit KD on ALL chats (no UTS)"),
    ("random", "Random selection at the UTS count (AKD all terms)"),
    ("cdcca_merged", "CDCCA before DWC (UTS + AKD, full-precision merged update)"),
    ("cdcca", "**CDCCA** (UTS + AKD all terms + DWC patch, 48 KiB)"),
)
BASELINES = ("source", "pseudo", "vanilla", "random")


def akd_config(ctx: Context, seed: int, **switches) -> dict:
    p = ctx.profile
    return dict(steps=p.steps, batch_size=p.batch_size, lr=RoundOptions().learning_rate, seed=seed, **switches)


def _spec(name: str, samples, akd: dict, ctx: Context, **extra) -> dict:
    ds = distill_set(samples, IMAGE_SIZE)
    return dict(kind="distil", name=name, images=ds.images, questions=ds.questions, uncertain=ds.uncertain_positions,
                akd=akd, patch_dir=str(ctx.work), **extra)


def random_index(stream, k: int, seed: int) -> list[int]:
    return sorted(np.random.default_rng(10_000 + seed).choice(len(stream.chats), size=k, replace=False).tolist())


def jobs(ctx: Context) -> list[dict]:
    p = ctx.profile
    out = [dict(kind="base_eval", name="base")]
    for s, stream in zip(ctx.seeds, ctx.streams):
        uts = stream.kept_samples
        k = len(uts)
        every = stream.repack(range(len(stream.chats)))
        rnd = stream.repack(random_index(stream, k, s))
        first = s == ctx.seeds[0]
        extra = dict(dwc_budgets=[DEFAULT_BUDGET] if not first else [b if b is None else b * 1024 for b in p.dwc_budgets_kib],
                     lora=first, delta_blob=first, lora_mm_budgets=[DEFAULT_BUDGET, None])
        if first and DEFAULT_BUDGET not in extra["dwc_budgets"]:
            extra["dwc_budgets"].append(DEFAULT_BUDGET)
        out += [
            _spec(f"pseudo-s{s}", uts, akd_config(ctx, s, ce=True, kd=False, feat=False), ctx),
            _spec(f"vanilla-s{s}", every, akd_config(ctx, s, ce=False, kd=True, feat=False), ctx),
            _spec(f"random-s{s}", rnd, akd_config(ctx, s), ctx),
            _spec(f"cdcca-s{s}", uts, akd_config(ctx, s), ctx, **extra),
        ]
        ctx.results.setdefault("uplink", {})[s] = {
            "uts": (k, sum(len(x.model_dump_json()) for x in uts)),
            "vanilla": (len(every), sum(len(x.model_dump_json()) for x in every)),
            "random": (len(rnd), sum(len(x.model_dump_json()) for x in rnd)),
        }
    return out


def per_seed_acc(ctx: Context, method: str) -> list[dict]:
    r = ctx.results
    if method == "source":
        return [r["base"]["student"]] * len(ctx.seeds)
    if method == "teacher":
        return [r["base"]["teacher"]] * len(ctx.seeds)
    if method == "cdcca":
        return [r[f"cdcca-s{s}"]["dwc"][str(DEFAULT_BUDGET)]["acc"] for s in ctx.seeds]
    name = "cdcca" if method == "cdcca_merged" else method
    return [r[f"{name}-s{s}"]["merged"] for s in ctx.seeds]


def _uplink_cells(ctx: Context, method: str):
    if method in ("source", "teacher"):
        return [na("no uplink"), na("no uplink")]
    key = {"pseudo": "uts", "cdcca": "uts", "cdcca_merged": "uts"}.get(method, method)
    ups = [ctx.results["uplink"][s][key] for s in ctx.seeds]
    return [mean_std([u[0] for u in ups], "{:.0f}"), mean_std([u[1] / 1024 for u in ups], "{:.1f}")]


def _downlink_cell(ctx: Context, method: str):
    r = ctx.results
    if method in ("source", "teacher"):
        return na("no update")
    if method == "cdcca":
        return mean_std([r[f"cdcca-s{s}"]["dwc"][str(DEFAULT_BUDGET)]["patch_bytes"] / 1024 for s in ctx.seeds], "{:.1f}")
    name = "cdcca" if method == "cdcca_merged" else method
    return mean_std([r[f"{name}-s{s}"]["fp16_delta_bytes"] / 1024 for s in ctx.seeds], "{:.1f}")


def build(ctx: Context) -> Section:
    p = ctx.profile
    sec = Section("accuracy", "1. Accuracy after one round (paper Tables 1-2 in miniature)")
    cols = ["Method"] + [f"{d} VQA" for d in DOMAINS] + ["target mean VQA", "caption F1",
                                                         "uplink samples", "uplink KiB", "downlink KiB"]
    t = Table("accuracy", "Accuracy per domain, mean ± std over seeds", cols)
    vals: dict[str, list[list[float]]] = {}
    for key, label in METHODS:
        accs = per_seed_acc(ctx, key)
        rows = [columns_of(a) for a in accs]
        vals[key] = rows
        cells = [mean_std([r[i] for r in rows]) for i in range(len(rows[0]))]
        t.add(label, cells + _uplink_cells(ctx, key) + [_downlink_cell(ctx, key)])
    n_chats = [len(s.chats) for s in ctx.streams]
    t.notes = [
        f"{len(ctx.seeds)} seed(s) ({', '.join(str(s) for s in ctx.seeds)}); each seed is its own chat stream of "
        f"{n_chats[0]} generated chats ({p.chats_per_domain} per domain: source + texture, noise, combo, rotate, "
        f"shuffled), answered by the device (llama.cpp, q4_0) with UTS deciding as in the product, and its own AKD seed."
        + (" Teacher and source-only rows do not depend on the seed (std 0)." if len(ctx.seeds) > 1 else ""),
        f"Accuracy: torch evaluation on the cloud's held-out eval split ({p.eval_n} per domain, generator seed 2000, "
        "disjoint from the chats); VQA = exact match, caption = token F1 over all domains.",
        f"AKD: {p.steps} steps (the product's default is {RoundOptions().steps}), batch {p.batch_size}, lr "
        f"{RoundOptions().learning_rate}, half of each batch source replay, for every trained row."
        + (" Quick mode uses fewer steps and 2 seeds to fit its time limit." if p.name == "quick" else ""),
        "Uplink KiB = the exact serialized UplinkSample bytes of the samples each row learns from "
        "(every chat's sample for vanilla KD). Downlink KiB = the fp16 size of the full merged update for "
        "rows evaluated on merged weights, the real patch file for CDCCA.",
        "The CDCCA row is evaluated on the PATCHED device weights (`dwc.patched_twin`: the 48 KiB patch applied "
        "to a copy of the device's GGUF files, re-quantized to q4_0); every other trained row on its merged "
        "full-precision model, which is an advantage those rows get over CDCCA.",
    ]
    sec.tables.append(t)
    sec.data = {"per_seed": vals, "columns": cols[1:8]}
    _findings(sec, vals)
    return sec


def _findings(sec: Section, vals: dict) -> None:
    ti, si, ci = len(DOMAINS), 0, len(DOMAINS) + 1  # target mean, source, caption columns
    names = dict(METHODS)
    names["cdcca"] = "CDCCA"
    for b in BASELINES:
        for idx, what in ((ti, "the target-domain mean VQA"), (ci, "caption F1")):
            s, win = compare([r[idx] for r in vals["cdcca"]], [r[idx] for r in vals[b]], what, "CDCCA", names[b])
            sec.findings.append(s)
            if not win:
                sec.not_beaten.append(s)
        if b != "source":
            worse = [d for j, d in enumerate(DOMAINS)
                     if mean([r[j] for r in vals["cdcca"]]) < mean([r[j] for r in vals[b]]) - 0.005]
            if worse:
                s = f"Per domain, CDCCA is below {names[b]} on: {', '.join(worse)}."
                sec.findings.append(s)
                sec.not_beaten.append(s)
    s, win = compare([r[ti] for r in vals["cdcca_merged"]], [r[ti] for r in vals["random"]],
                     "the target-domain mean VQA (both merged, AKD all terms: only the selection differs)",
                     "UTS selection", "random selection of as many chats")
    sec.findings.append(s)
    if not win:
        sec.not_beaten.append(s)
    src = mean([r[si] for r in vals["cdcca"]]) - mean([r[si] for r in vals["source"]])
    sec.findings.append(f"Source domain after CDCCA: {pts(src)} vs the device as shipped "
                        + ("(no forgetting beyond half a point)." if src >= -0.005 else "(forgetting)."))
    gap = mean([r[ti] for r in vals["teacher"]]) - mean([r[ti] for r in vals["cdcca"]])
    sec.findings.append(f"CDCCA's target mean is {pts(-gap)} relative to the teacher (upper bound).")
    dwc = mean([r[ti] for r in vals["cdcca"]]) - mean([r[ti] for r in vals["cdcca_merged"]])
    sec.findings.append(f"The 48 KiB DWC patch changes the target mean by {pts(dwc)} relative to the full-precision "
                        "merged update it compresses.")
