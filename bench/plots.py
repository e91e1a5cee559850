"""PNG figures (matplotlib, Agg backend) from the same numbers as the tables."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .chats import DOMAINS  # noqa: E402


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def accuracy_bars(sec, out: Path) -> str:
    from .accuracy import METHODS

    per_seed = sec.data["per_seed"]
    groups = list(DOMAINS) + ["target mean"]
    fig, ax = plt.subplots(figsize=(11, 5.2))
    w = 0.8 / len(METHODS)
    for i, (key, label) in enumerate(METHODS):
        rows = np.array(per_seed[key])[:, : len(groups)]
        ax.bar(np.arange(len(groups)) + i * w, rows.mean(0), w, yerr=rows.std(0, ddof=1) if len(rows) > 1 else None,
               label=label.replace("**", ""), capsize=2)
    ax.set_xticks(np.arange(len(groups)) + 0.4 - w / 2, groups)
    ax.set_ylabel("VQA accuracy (eval split)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.08), frameon=False)
    ax.set_title("Accuracy per domain after one round (mean ± std over seeds)")
    return _save(fig, out / "accuracy_per_domain.png")


def budget_curve(sec, out: Path) -> str:
    d = sec.data["dwc_budget"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    dwc = [(b, a) for k, b, a in d["curve"] if k.isdigit() or k == "unlimited"]
    dwc.sort()
    ax.plot([b / 1024 for b, _ in dwc], [a for _, a in dwc], "o-", label="DWC patch")
    for k, b, a in d["curve"]:
        if not (k.isdigit() or k == "unlimited"):
            ax.plot([b / 1024], [a], "s", label=k if len(k) < 60 else k[:57] + "...")
    ax.axhline(d["before"], color="grey", ls=":", label="before (device as shipped)")
    ax.axhline(d["full"], color="k", ls="--", label="full-precision merged update")
    ax.set_xscale("log")
    ax.set_xlabel("downlink KiB (log)")
    ax.set_ylabel("target-domain mean VQA")
    ax.legend(fontsize=7)
    ax.set_title("DWC byte budget sweep")
    return _save(fig, out / "dwc_budget_sweep.png")


def mask_sweep(sec, out: Path) -> str:
    m = sec.data["mask_sweep"]
    r = sorted(m, key=float)
    x = [float(k) for k in r]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.bar(x, [m[k]["bytes"] / 1024 for k in r], width=0.12, color="#bbb", label="uplink KiB")
    ax.set_xlabel("visual-token mask ratio")
    ax.set_ylabel("uplink KiB (kept samples)")
    ax2 = ax.twinx()
    ax2.plot(x, [m[k]["target"] for k in r], "o-", label="target mean VQA after the round")
    ax2.plot(x, [m[k]["pl_nt"] for k in r], "s--", label="teacher pseudo-label acc (noise+texture)")
    ax2.plot(x, [m[k]["pl_all"] for k in r], "^:", label="teacher pseudo-label acc (all)")
    ax2.set_ylabel("accuracy")
    ax2.set_ylim(0, 1.05)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax2.legend(h1 + h2, l1 + l2, fontsize=7, loc="lower left")
    ax.set_title("UTS mask ratio: bytes vs accuracy")
    return _save(fig, out / "mask_sweep.png")


def continual_lines(sec, out: Path) -> str:
    series = sec.data["series"]
    labels = list(series)
    fig, ax = plt.subplots(figsize=(7, 4))
    cols = list(DOMAINS) + ["target mean"]
    for j, name in enumerate(cols):
        ax.plot(range(len(labels)), [series[k][j] for k in labels], "o-" if name != "target mean" else "k--", label=name)
    ax.set_xticks(range(len(labels)), [k.replace("after ", "").replace("(device as shipped)", "") for k in labels],
                  fontsize=7)
    ax.set_ylabel("VQA accuracy (patched weights)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    ax.set_title("Continual rounds")
    return _save(fig, out / "continual_rounds.png")


def fleet_hist(sec, out: Path) -> str:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    every = np.concatenate([np.array(sec.data[k]["latencies_ms"], dtype=float) for k in ("steady", "restart")])
    bins = np.histogram_bin_edges(every, 40) if every.size else 10
    for key, label in (("steady", "steady"), ("restart", "with cloud restart")):
        lat = np.array(sec.data[key]["latencies_ms"])
        if lat.size:
            ax.hist(lat, bins=bins, alpha=0.6, label=f"{label} (p50 {np.percentile(lat, 50):.0f} ms, "
                                                   f"p99 {np.percentile(lat, 99):.0f} ms)")
    ax.set_xlabel("upload request latency (ms)")
    ax.set_ylabel("requests")
    ax.legend(fontsize=7)
    ax.set_title("Fleet upload latency")
    return _save(fig, out / "fleet_latency.png")


def all_plots(sections: dict, out: Path) -> None:
    for key, fns in (("accuracy", [accuracy_bars]), ("ablations", [budget_curve, mask_sweep]),
                     ("continual", [continual_lines]), ("fleet", [fleet_hist])):
        if key in sections:
            for fn in fns:
                sections[key].plots.append(fn(sections[key], out))
