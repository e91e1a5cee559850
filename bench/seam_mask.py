"""The UTS visual-token mask sweep (part of section 1): the first reported seed's UTS-kept chats of
the drift stream, re-packed by the product's UTS token stage at each mask ratio (masked patches are
filled with a constant before PNG encoding, so the bytes really shrink), then the CDCCA recipe on the
seam (teacher labels of the MASKED images the cloud receives -> AKD -> DWC patch at the product
budget), measured on the device and paired against the product's own ratio."""
from __future__ import annotations

from pathlib import Path

from device.contracts.metrics import exact, paired_bootstrap
from device.uts import UTSConfig

from .chats import sample_key
from .common import BUDGET_KIB, DEFAULT_BUDGET, Section, pts
from .table import Table, na, num

DEFAULT_RATIO = UTSConfig().mask_ratio


def _job(ratio: float, seed: int) -> str:
    return f"drift-cdcca-s{seed}" if ratio == DEFAULT_RATIO else f"drift-mask{round(100 * ratio)}-s{seed}"


def jobs(prof, stream, seed: int, work: Path, akd: dict) -> tuple[list[dict], dict]:
    """Training jobs for every ratio but the product's (that one is CDCCA's own job, same data), and
    what the table needs about each ratio's uplink."""
    chats = {sample_key(c.record): c for c in stream.chats}
    out, info = [], {"seed": seed, "raw_kept": sum(c.raw_bytes for c in stream.chats if c.kept), "rows": {}}
    for r in prof.mask_ratios:
        samples = (stream.kept_samples if r == DEFAULT_RATIO
                   else stream.repack(stream.kept_index, UTSConfig(mask_ratio=r)))
        kept = [chats[x.sample_id] for x in samples]
        info["rows"][r] = {"bytes": sum(len(x.model_dump_json()) for x in samples), "n": len(samples),
                           "truths": [c.truth for c in kept], "domains": [c.domain for c in kept],
                           "tasks": [c.task for c in kept],
                           "masked": sum(x.image_patch_kept is not None for x in samples)}
        if r != DEFAULT_RATIO:
            out.append(dict(kind="train", name=_job(r, seed), work=str(work), labels="teacher", truths=[],
                            samples=samples, akd=akd, budgets=[DEFAULT_BUDGET]))
    return out, info


def _label_acc(labels, row: dict, keep) -> float | None:
    idx = [i for i, (t, d) in enumerate(zip(row["tasks"], row["domains"])) if t != "caption" and d in keep]
    return sum(exact(labels[i], row["truths"][i]) for i in idx) / len(idx) if idx else None


def build(sec: Section, res: dict, info: dict, drifted: tuple[str, ...]) -> None:
    doms = res["base"]["domains"]
    seed = info["seed"]

    def correct(r, keep):
        c = res[_job(r, seed)]["patches"][str(DEFAULT_BUDGET)]["correct"]
        return [x for x, d in zip(c, doms) if d in keep]

    t = Table("seam_mask_sweep", f"UTS visual-token mask ratio (seed {seed}'s UTS-kept drift chats; CDCCA on the "
              f"seam, {BUDGET_KIB} DWC patch, device-measured)",
              ["mask ratio", "uplink KiB", "% of raw (kept chats)", "teacher label acc (kept QA)",
               "teacher label acc (drifted QA)", "drifted mean VQA after", "source VQA after",
               "drifted minus product ratio", "95% CI low", "95% CI high"])
    rows = {}
    for r, row in info["rows"].items():
        labels = res[_job(r, seed)]["labels"]
        if len(labels) != row["n"]:
            raise RuntimeError(f"mask {r}: {len(labels)} teacher labels for {row['n']} samples")
        la, ld = _label_acc(labels, row, set(row["domains"])), _label_acc(labels, row, drifted)
        a, src = correct(r, drifted), correct(r, ("source",))
        d, lo, hi = paired_bootstrap(a, correct(DEFAULT_RATIO, drifted), seed=0)
        rows[r] = {"bytes": row["bytes"], "masked_images": row["masked"], "label_acc": la, "label_acc_drifted": ld, "drifted": sum(a) / len(a),
                   "source": sum(src) / len(src), "diff": [d, lo, hi]}
        t.add(f"{r:.2f}" + (" (product default)" if r == DEFAULT_RATIO else ""),
              [num(row["bytes"] / 1024, "{:.1f}"), num(100 * row["bytes"] / info["raw_kept"], "{:.2f}"),
               num(la) if la is not None else na("no QA sample kept"),
               num(ld) if ld is not None else na("no drifted QA sample kept"),
               num(rows[r]["drifted"]), num(rows[r]["source"]), num(d), num(lo), num(hi)])
    t.notes = ["Teacher label accuracy = exact match of the teacher's answer on the image the cloud receives "
               "(masked) with the generator's ground truth, kept QA samples only (captions excluded). Raw = the "
               f"no-selection uplink formula of device/uts.py for the kept chats ({info['raw_kept']:,} B). "
               f"Drifted = seed {seed}'s drifted pair ({' + '.join(drifted)}); the difference is a paired bootstrap "
               "over the same questions against the product's ratio."]
    unmasked = [r for r, x in rows.items() if r > 0 and x["masked_images"] == 0]
    if unmasked:
        t.notes.append(f"At ratio(s) {', '.join(f'{r:.2f}' for r in unmasked)} UTS masked NO image: on this model the "
                       "visual tokens do not map 1:1 onto the image's patch grid (e.g. a pixel-shuffle connector), and "
                       "device/uts.py masks image patches only then: the cloud receives the unmasked image and the "
                       "bytes differ only through the rest of the payload.")
    sec.tables.append(t)
    for r, x in rows.items():
        if r == DEFAULT_RATIO:
            continue
        d, lo, hi = x["diff"]
        verdict = "lower" if hi < 0 else ("higher" if lo > 0 else "not measurably different")
        sec.findings.append(f"Mask ratio {r:.2f} vs the product's {DEFAULT_RATIO:.2f}: uplink "
                            f"{x['bytes'] / max(rows[DEFAULT_RATIO]['bytes'], 1):.2f}x the bytes, drifted accuracy "
                            f"after the round {pts(d)} (95 % CI {pts(lo)} .. {pts(hi)}): {verdict}.")
    sec.data["mask_sweep"] = {f"{r:.2f}": x for r, x in rows.items()}
