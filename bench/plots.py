"""PNG figures (matplotlib, Agg backend) from the same numbers as the tables; written next to report.md."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from device.contracts.metrics import wilson  # noqa: E402

from .chats import DOMAINS  # noqa: E402


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path.name


def _bar_ci(k: int, n: int) -> tuple[float, float, float]:
    """(accuracy, distance to the Wilson low, to the Wilson high) for error bars."""
    if n == 0:
        return float("nan"), 0.0, 0.0
    lo, hi = wilson(k, n)
    p = k / n
    return p, p - lo, hi - p


def accuracy_bars(sec, out: Path) -> str:
    """Drift stream: every method's device-measured VQA per domain and on the drifted domains,
    correct answers pooled over seeds, with 95 % Wilson intervals."""
    from .seam import METHODS

    drift = sec.data["streams"]["drift"]
    keys = [(k, lab) for k, lab, kinds in METHODS if "drift" in kinds and k in drift]
    groups = list(DOMAINS) + ["drifted mean"]
    fig, ax = plt.subplots(figsize=(11, 5.4))
    w = 0.8 / len(keys)
    n_seeds = len(sec.data["seeds"])
    for i, (key, label) in enumerate(keys):
        d = drift[key]
        cells = [_bar_ci(sum(d["per_domain"][dom]), n_seeds * d["n_per_domain"][dom]) for dom in DOMAINS]
        cells.append(_bar_ci(d["pooled_correct"], d["pooled_n"]))
        p = np.array(cells)
        ax.bar(np.arange(len(groups)) + i * w, p[:, 0], w, yerr=p[:, 1:].T, capsize=2,
               label=label.replace("**", ""))
    ax.set_xticks(np.arange(len(groups)) + 0.4 - w / 2, groups)
    ax.set_ylabel("VQA accuracy on the device (held-out eval)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.08), frameon=False)
    ax.set_title(f"Accuracy per method after one round, drift stream ({n_seeds} seed(s) pooled, 95 % Wilson intervals)")
    return _save(fig, out / "accuracy_per_domain.png")


def budget_curve(sec, out: Path) -> str:
    """Drifted-domain accuracy of the same merged update shipped under each DWC budget."""
    d = sec.data["dwc_budget"]
    pts = [c for c in d["curve"] if c["budget"] != "unlimited"]
    every = next(c for c in d["curve"] if c["budget"] == "unlimited")
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot([c["bytes"] / 1024 for c in pts], [c["drifted"] for c in pts], "o-", label="DWC patch (device-measured)")
    ax.plot([every["bytes"] / 1024], [every["drifted"]], "s", label="every changed row")
    ax.axhline(d["source"], color="grey", ls=":", label="before (device as shipped)")
    ax.set_xscale("log")
    ax.set_xlabel("downlink KiB (log)")
    ax.set_ylabel("drifted-domain mean VQA")
    ax.legend(fontsize=7)
    ax.set_title("DWC byte budget sweep")
    return _save(fig, out / "dwc_budget_sweep.png")


def mask_sweep(sec, out: Path) -> str:
    """UTS mask ratio: uplink bytes (bars) against teacher-label and after-round accuracy (lines)."""
    m = sec.data["mask_sweep"]
    r = sorted(m, key=float)
    x = [float(k) for k in r]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.bar(x, [m[k]["bytes"] / 1024 for k in r], width=0.12, color="#bbb", label="uplink KiB")
    ax.set_xlabel("visual-token mask ratio")
    ax.set_ylabel("uplink KiB (kept samples)")
    ax2 = ax.twinx()
    ax2.plot(x, [m[k]["drifted"] for k in r], "o-", label="drifted mean VQA after the round (device)")
    ax2.plot(x, [m[k]["label_acc"] if m[k]["label_acc"] is not None else np.nan for k in r], "s--",
             label="teacher label accuracy (kept QA)")
    ax2.set_ylabel("accuracy")
    ax2.set_ylim(0, 1.05)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax2.legend(h1 + h2, l1 + l2, fontsize=7, loc="lower left")
    ax.set_title("UTS mask ratio: bytes vs accuracy")
    return _save(fig, out / "mask_sweep.png")


def continual_lines(sec, out: Path) -> str:
    """Device accuracy per domain after each continual round, with 95 % Wilson intervals."""
    per, n = sec.data["per_domain"], sec.data["n_per_domain"]
    labels = ["start"] + [f"r{i} {r['domain']}" for i, r in enumerate(sec.data["rounds"][1:], 1)]
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(per))
    for j, dom in enumerate(DOMAINS):
        p = np.array([_bar_ci(round(acc[dom] * n[dom]), n[dom]) for acc in per])
        ax.errorbar(x + 0.03 * (j - 2), p[:, 0], yerr=p[:, 1:].T, fmt="o-", capsize=2, label=dom)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("VQA accuracy on the device (patched GGUF)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    ax.set_title("Continual rounds (95 % Wilson intervals)")
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
    for key, fns in (("accuracy", [accuracy_bars, budget_curve, mask_sweep]), ("continual", [continual_lines]), ("fleet", [fleet_hist])):
        if key in sections:
            for fn in fns:
                sections[key].plots.append(fn(sections[key], out))
