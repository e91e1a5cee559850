import numpy as np
import pytest

from device.contracts.metrics import exact, paired_bootstrap, seed_interval, token_f1, wilson


def test_exact_and_f1():
    assert exact(" Red. ", "red") == 1.0
    assert token_f1("a red circle", "a red square") == pytest.approx(2 / 3)


def test_wilson_known_values():
    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    lo, hi = wilson(300, 300)  # stays inside [0, 1] and has width at the edge
    assert hi == 1.0 and 0.98 < lo < 1.0
    assert wilson(0, 0) == (0.0, 1.0)


def test_wilson_covers_the_true_rate():
    rng = np.random.default_rng(0)
    p, n, hits = 0.7, 300, 0
    for _ in range(400):
        k = rng.binomial(n, p)
        lo, hi = wilson(k, n)
        hits += lo <= p <= hi
    assert 0.92 <= hits / 400 <= 0.98


def test_paired_bootstrap_detects_a_real_difference_only():
    rng = np.random.default_rng(1)
    base = rng.random(300) < 0.6
    better = base | (rng.random(300) < 0.15)  # strictly more right answers
    d, lo, hi = paired_bootstrap(better.astype(float), base.astype(float))
    assert d > 0 and lo > 0
    d, lo, hi = paired_bootstrap(base.astype(float), base.astype(float))
    assert d == 0 and lo == 0 and hi == 0
    with pytest.raises(ValueError):
        paired_bootstrap([], [])


def test_seed_interval():
    m, lo, hi = seed_interval([0.6, 0.62, 0.64])
    assert m == pytest.approx(0.62) and lo < 0.6 and hi > 0.64
    assert seed_interval([0.5]) == (0.5, 0.5, 0.5)
