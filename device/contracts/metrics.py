"""The one definition of answer scoring, used by the cloud's torch evaluation and the device's
llama.cpp evaluation alike: VQA = exact match after normalisation; captions = token F1."""
from __future__ import annotations


def normalise(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


def token_f1(pred: str, ref: str) -> float:
    p, r = normalise(pred).replace(",", "").split(), normalise(ref).replace(",", "").split()
    if not p or not r:
        return float(p == r)
    common = sum(min(p.count(w), r.count(w)) for w in set(p))
    if common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(r)
    return 2 * prec * rec / (prec + rec)


def exact(pred: str, ref: str) -> float:
    return float(normalise(pred) == normalise(ref))


# --- intervals: one definition, so the demo, the e2e test and the benchmark agree ---------------

def wilson(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval for a proportion.

    Why Wilson and not the normal approximation: accuracies near 0 or 1 (the student on source is
    ~1.0) make the normal interval collapse to zero width or leave [0, 1]; Wilson stays honest at
    the edges and for the few hundred samples per domain a CPU run can afford."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_bootstrap(a: "list[float]", b: "list[float]", n_boot: int = 2000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``a - b`` over paired items (same questions scored by two systems) and its
    bootstrap percentile interval.

    A comparison is a *win* only when the interval excludes 0: pairing removes the variance of
    which questions happened to be drawn, which is most of the variance at a few hundred items."""
    import numpy as np

    x = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError("paired_bootstrap needs two equally long, non-empty score lists")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    means = x[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(x.mean()), float(lo), float(hi)


def seed_interval(values: "list[float]", level: float = 0.95) -> tuple[float, float, float]:
    """Mean over seeds and its Student-t interval (few seeds: t, not z)."""
    import math

    n = len(values)
    if n == 0:
        raise ValueError("seed_interval needs at least one value")
    m = sum(values) / n
    if n == 1:
        return m, m, m
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    # two-sided 95 % t quantiles for 1..9 degrees of freedom; beyond that ~z
    t = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}.get(n - 1, 1.96)
    if level != 0.95:
        raise ValueError("seed_interval supports the 95 % level only")
    half = t * sd / math.sqrt(n)
    return m, m - half, m + half
