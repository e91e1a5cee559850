"""Section 2 -- ablations: AKD loss terms, the UTS visual-token mask ratio, the DWC byte budget
(and a LoRA-adapter downlink beside it)."""
from __future__ import annotations

import numpy as np

from device.contracts.metrics import exact
from device.uts import UTSConfig

from .accuracy import _spec, akd_config
from .common import DEFAULT_BUDGET, Context, Section, compare, mean, pts, target_mean, vqa
from .table import Table, mean_std, na, num

AKD_VARIANTS = (  # (job prefix, label, switches); ce only = table 1's pseudo-label row, all = CDCCA's AKD
    ("pseudo", "CE only (pseudo-labels)", dict(ce=True, kd=False, feat=False)),
    ("akd-cekd", "CE + KD", dict(ce=True, kd=True, feat=False)),
    ("cdcca", "CE + KD + feature (CDCCA's AKD)", dict(ce=True, kd=True, feat=True)),
    ("akd-kd", "KD only", dict(ce=False, kd=True, feat=False)),
)


def _mask_name(r: float) -> str:
    return f"mask-{int(round(100 * r))}"


def jobs(ctx: Context) -> list[dict]:
    out = []
    for s, stream in list(zip(ctx.seeds, ctx.streams))[: ctx.profile.ablation_seeds]:
        for prefix, _label, sw in AKD_VARIANTS:
            if prefix.startswith("akd-"):
                out.append(_spec(f"{prefix}-s{s}", stream.kept_samples, akd_config(ctx, s, **sw), ctx))
    s0, stream = ctx.seeds[0], ctx.streams[0]
    for r in ctx.profile.mask_ratios:
        samples = stream.repack(stream.kept_index, UTSConfig(mask_ratio=r))
        ctx.results.setdefault("mask", {})[r] = {
            "bytes": sum(len(x.model_dump_json()) for x in samples), "n": len(samples),
            "truths": stream.truths(samples), "tasks": [c.task for c in stream.chats if c.kept],
            "domains": [c.domain for c in stream.chats if c.kept]}
        if r != UTSConfig().mask_ratio:  # the default ratio is CDCCA's own run (identical training data)
            out.append(_spec(_mask_name(r), samples, akd_config(ctx, s0), ctx, dwc_budgets=[DEFAULT_BUDGET]))
    return out


def build(ctx: Context) -> Section:
    sec = Section("ablations", "2. Ablations")
    _akd_terms(ctx, sec)
    _mask_sweep(ctx, sec)
    _budget_sweep(ctx, sec)
    return sec


def _akd_terms(ctx: Context, sec: Section) -> None:
    seeds = ctx.seeds[: ctx.profile.ablation_seeds]
    t = Table("akd_terms", "AKD loss terms (UTS samples, merged full-precision update)",
              ["AKD loss terms", "source VQA", "target mean VQA", "caption F1", "all-domain VQA"])
    vals = {}
    for prefix, label, _ in AKD_VARIANTS:
        accs = [ctx.results[f"{prefix}-s{s}"]["merged"] for s in seeds]
        vals[prefix] = [target_mean(a) for a in accs]
        t.add(label, [mean_std([vqa(a, "source") for a in accs]), mean_std(vals[prefix]),
                      mean_std([a["caption_f1"] for a in accs]), mean_std([a["vqa"] for a in accs])])
    t.notes = [f"Seeds: {', '.join(map(str, seeds))}; same samples, steps and replay as table 1. 'CE only' is table 1's "
               "pseudo-label row and 'CE + KD + feature' its CDCCA-before-DWC row (the same runs)."]
    sec.tables.append(t)
    s, win = compare(vals["cdcca"], vals["pseudo"], "the target mean", "AKD with all terms", "CE on pseudo-labels alone")
    sec.findings.append(s + " (The paper reports +2.53 MC / +3.34 DA for AKD over pseudo-labels.)")
    if not win:
        sec.not_beaten.append(s)
    best = max(vals, key=lambda k: mean(vals[k]))
    sec.findings.append(f"Best AKD variant on the target mean: {dict((p, l) for p, l, _ in AKD_VARIANTS)[best]} "
                        f"({mean(vals[best]):.3f}).")
    sec.data["akd_terms"] = vals


def _pl_acc(labels, truths, tasks, domains, keep) -> float:
    idx = [i for i in range(len(labels)) if tasks[i] != "caption" and domains[i] in keep]
    return float(np.mean([exact(labels[i], truths[i]) for i in idx])) if idx else float("nan")


def _mask_sweep(ctx: Context, sec: Section) -> None:
    stream = ctx.streams[0]
    raw_all = stream.stats.seen_raw_bytes
    raw_kept = sum(c.raw_bytes for c in stream.chats if c.kept)
    t = Table("mask_sweep", "UTS visual-token mask ratio (seed 0's UTS-kept chats; CDCCA pipeline with 48 KiB DWC)",
              ["mask ratio", "uplink KiB", "% of raw (kept chats)", "% of raw (all chats)",
               "teacher pseudo-label acc (all QA)", "pseudo-label acc (noise+texture QA)",
               "target mean VQA after", "source VQA after"])
    rows = {}
    for r in ctx.profile.mask_ratios:
        m = ctx.results["mask"][r]
        job = ctx.results["cdcca-s0" if r == UTSConfig().mask_ratio else _mask_name(r)]
        acc = job["dwc"][str(DEFAULT_BUDGET)]["acc"]
        pl_all = _pl_acc(job["labels"], m["truths"], m["tasks"], m["domains"], set(m["domains"]))
        pl_nt = _pl_acc(job["labels"], m["truths"], m["tasks"], m["domains"], {"noise", "texture"})
        rows[r] = dict(bytes=m["bytes"], pl_all=pl_all, pl_nt=pl_nt, target=target_mean(acc), source=vqa(acc, "source"))
        t.add(f"{r:.2f}" + (" (product default)" if r == UTSConfig().mask_ratio else ""),
              [num(m["bytes"] / 1024, "{:.1f}"), num(100 * m["bytes"] / raw_kept, "{:.2f}"),
               num(100 * m["bytes"] / raw_all, "{:.3f}"), num(pl_all),
               num(pl_nt) if not np.isnan(pl_nt) else na("no noise/texture QA sample kept"),
               num(target_mean(acc)), num(vqa(acc, "source"))])
    t.notes = ["Masked patches are filled with a constant before PNG encoding, so bytes really shrink; the teacher "
               "labels the MASKED image the cloud receives. Pseudo-label accuracy = exact match of the teacher's "
               "answer with the generator's ground truth on the kept QA samples (captions excluded).",
               f"Raw = the no-selection uplink formula of device/uts.py (image + text + fp32 visual tokens + fp32 "
               f"full-vocabulary distributions): {raw_kept:,} B for the kept chats, {raw_all:,} B for all "
               f"{len(stream.chats)} chats."]
    sec.tables.append(t)
    r0, rs = ctx.profile.mask_ratios[0], ctx.profile.mask_ratios
    for r in rs[1:]:
        d_pl, d_acc = rows[r]["pl_nt"] - rows[r0]["pl_nt"], rows[r]["target"] - rows[r0]["target"]
        sec.findings.append(f"Mask {r:.2f} vs {r0:.2f}: uplink {rows[r]['bytes'] / max(rows[r0]['bytes'], 1):.2f}x the "
                            f"bytes, teacher pseudo-label accuracy on noise/texture {pts(d_pl)}, target mean after the "
                            f"round {pts(d_acc)}.")
    sec.data["mask_sweep"] = {str(k): v for k, v in rows.items()}


def _gain(acc: float, before: float, full: float):
    den = full - before
    if abs(den) < 0.005:
        return na(f"full update moves the target mean by {pts(den)}: ratio undefined")
    if den < 0:
        return na(f"full update LOWERS the target mean ({pts(den)})")
    return num(100 * (acc - before) / den, "{:.0f}%")


def _budget_sweep(ctx: Context, sec: Section) -> None:
    job = ctx.results["cdcca-s0"]
    before_acc = ctx.results["base"]["student"]
    before, full = target_mean(before_acc), target_mean(job["merged"])
    gguf = sum(p.stat().st_size for p in _device_files(ctx).values())
    t = Table("dwc_budget", "DWC byte budget (seed 0's CDCCA update) and a LoRA-adapter downlink",
              ["downlink", "bytes (KiB)", "% of full GGUF", "rows patched", "Fisher importance kept",
               "target mean VQA", "source VQA", "gain kept"])
    t.add("none (device as shipped)", [num(0, "{:.1f}"), num(0, "{:.2f}"), num(0, "{:.0f}"), num(0),
                                       num(before), num(vqa(before_acc, "source")), num(0, "{:.0f}%")])
    curve = []
    for key, d in job["dwc"].items():
        b = d["patch_bytes"]
        acc = d["acc"]
        curve.append((key, b, target_mean(acc)))
        label = "DWC unlimited (every changed row)" if key == "unlimited" else f"DWC {int(key) // 1024} KiB"
        t.add(label + (" (product default)" if key == str(DEFAULT_BUDGET) else ""),
              [num(b / 1024, "{:.1f}"), num(100 * b / gguf, "{:.2f}"), num(d["rows_patched"], "{:.0f}"),
               num(d["importance_kept"]), num(target_mean(acc)), num(vqa(acc, "source")),
               _gain(target_mean(acc), before, full)])
    fp16 = job["fp16_delta_bytes"]
    t.add("full-precision merged update (reference, fp16 size)",
          [num(fp16 / 1024, "{:.1f}"), num(100 * fp16 / gguf, "{:.2f}"), na("not a row patch"), num(1.0),
           num(full), num(vqa(job["merged"], "source")), num(100, "{:.0f}%")])
    lora = job.get("lora")
    if lora:
        chk = lora["llama_check"]
        rows = [(f"LoRA adapter r{lora['rank']} f16, text model only (llama.cpp `lora_path`)", lora["text_only"])]
        for k, v in lora["with_mmproj_patch"].items():
            kib = "unlimited" if k == "unlimited" else f"{int(k) // 1024} KiB"
            rows.append((f"LoRA adapter + DWC patch of the mmproj update ({kib})", v))
        for label, v in rows:
            t.add(label, [num(v["bytes"] / 1024, "{:.1f}"), num(100 * v["bytes"] / gguf, "{:.2f}"),
                          na("adapter, not rows"), na("not Fisher-selected"), num(target_mean(v["acc"])),
                          num(vqa(v["acc"], "source")), _gain(target_mean(v["acc"]), before, full)])
            curve.append((label, v["bytes"], target_mean(v["acc"])))
        t.notes.append(
            f"LoRA rows: the text-model part of the merged update, factorized by SVD at rank {lora['rank']} (max relative "
            f"residual {lora['max_svd_residual']:.1e}: the AKD update is exactly low-rank) and written as a GGUF LoRA "
            "adapter (general.type=adapter, adapter.type=lora, alpha=rank). llama.cpp loads it through the device "
            f"runtime (`bench.lora.LoraRuntime`, `Llama(lora_path=...)`): on {chk['prompts']} eval prompts its answers "
            f"agree with the torch model of the same weights {100 * chk['agree_with_torch']:.0f}% of the time (max "
            f"logit difference {chk['max_logit_diff_vs_torch']:.3f} over 5 prompts), and differ from the answers "
            f"without the adapter on {100 * chk['answers_changed_vs_base']:.0f}% of prompts. libmtmd takes no adapter "
            "for the mmproj, so the vision/projector part of the update either stays behind (text-only row) or "
            "travels as a DWC patch of the mmproj file.")
    t.notes.insert(0, f"Full GGUF = the device's q4_0 model + f32 mmproj, {gguf:,} B. Gain kept = (acc_patched - "
                   "acc_before) / (acc_full - acc_before) on the target mean, acc_full = the merged full-precision "
                   "update; n/a when the full update gains less than half a point or loses.")
    sec.tables.append(t)
    sec.data["dwc_budget"] = {"before": before, "full": full, "gguf_bytes": gguf, "fp16_delta_bytes": fp16,
                              "curve": curve}
    if abs(full - before) < 0.005 or full < before:
        sec.findings.append(f"The full-precision update itself moves the target mean by {pts(full - before)}, so "
                            "'gain kept' is undefined for this run.")
    dflt = job["dwc"][str(DEFAULT_BUDGET)]
    sec.findings.append(f"At the default 48 KiB budget DWC ships {dflt['patch_bytes']:,} B "
                        f"({100 * dflt['patch_bytes'] / gguf:.1f}% of the full GGUF, "
                        f"{100 * dflt['patch_bytes'] / fp16:.1f}% of the fp16 delta) and keeps "
                        f"{100 * dflt['importance_kept']:.0f}% of the Fisher importance.")
    if lora:
        best = lora["with_mmproj_patch"].get(str(DEFAULT_BUDGET))
        if best is not None:
            s, win = compare([target_mean(dflt["acc"])], [target_mean(best["acc"])], "the target mean",
                             "DWC at 48 KiB", f"LoRA adapter + 48 KiB mmproj patch ({best['bytes'] / 1024:.0f} KiB in all)")
            sec.findings.append(s)
            if not win:
                sec.not_beaten.append(s)


def _device_files(ctx: Context) -> dict:
    from device.models import bundled_files

    from .chats import DEVICE_QUANT

    m, p = bundled_files(DEVICE_QUANT, ctx.model_dir)
    return {"model": m, "mmproj": p}
