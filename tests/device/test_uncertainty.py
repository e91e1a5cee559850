"""Entropy / max-prob / margin against a plain float64 reference, including hostile logits."""
from __future__ import annotations

import math

import numpy as np
import pytest

from device.uncertainty import (SampleUncertainty, Scratch, TokenUncertainty, UncertaintyRecorder, summarize,
                                token_stats, token_stats_batch, token_stats_fast)


def reference(logits: np.ndarray) -> tuple[float, float, float, int]:
    """The obvious float64 way: softmax with -inf -> 0, +inf entries sharing the mass."""
    x = np.asarray(logits, dtype=np.float64)
    if np.isposinf(x).any():
        p = np.isposinf(x).astype(np.float64)
    else:
        p = np.exp(x - x.max())
    p /= p.sum()
    nz = p[p > 0]
    h = float(-(nz * np.log(nz)).sum())
    top = np.sort(p)[::-1]
    return h, float(top[0]), float(top[0] - (top[1] if len(top) > 1 else 0.0)), int(np.argmax(x))


def _cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    V = 5000
    huge = rng.standard_normal(V).astype(np.float32) * 1e4
    neg = rng.standard_normal(V).astype(np.float32)
    neg[rng.random(V) < 0.9] = -np.inf
    spiky = np.full(V, -30.0, dtype=np.float32)
    spiky[17] = 30.0
    tied = np.zeros(V, dtype=np.float32)
    tied[[3, 9]] = 5.0
    posinf = rng.standard_normal(V).astype(np.float32)
    posinf[[4, 40, 400]] = np.inf
    return {
        "normal": rng.standard_normal(V).astype(np.float32) * 3,
        "big_offset": (rng.standard_normal(V) * 2 + 1e4).astype(np.float32),
        "huge_scale": huge,
        "near_float32_max": np.array([3e38, -3e38, 1e38, 0.0], dtype=np.float32),
        "mostly_neg_inf": neg,
        "uniform": np.zeros(V, dtype=np.float32),
        "one_hot_like": spiky,
        "two_way_tie": tied,
        "pos_inf": posinf,
        "single_token": np.array([1.5], dtype=np.float32),
        "float16": rng.standard_normal(64).astype(np.float16),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_matches_float64_reference(name):
    x = _cases()[name]
    h, p, m, a = reference(x)
    t = token_stats(x)
    assert t.entropy == pytest.approx(h, rel=1e-9, abs=1e-9)
    assert t.max_prob == pytest.approx(p, rel=1e-9, abs=1e-12)
    assert t.margin == pytest.approx(m, rel=1e-9, abs=1e-12)
    assert t.token_id == a
    assert 0.0 <= t.entropy <= math.log(len(x)) + 1e-9


def test_known_values():
    assert token_stats(np.zeros(262144, np.float32)).entropy == pytest.approx(math.log(262144), rel=1e-12)
    t = token_stats(np.array([0.0, -np.inf, -np.inf], np.float32))
    assert (t.entropy, t.max_prob, t.margin, t.token_id) == (0.0, 1.0, 1.0, 0)


def test_batched_equals_rows_and_chunks():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((7, 3000)) * rng.uniform(0.1, 20, (7, 1))).astype(np.float32)
    x[2, ::3] = -np.inf
    _same(token_stats_batch(x), [token_stats(r) for r in x])
    wide = rng.standard_normal((3, 600_000)).astype(np.float32)  # > one chunk: one row per chunk
    _same(token_stats_batch(wide), [token_stats(r) for r in wide])


def _same(a, b):
    """Batched and single-row paths sum in different orders: equal to float64 rounding."""
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert u.token_id == v.token_id
        for f in ("entropy", "max_prob", "margin"):
            assert getattr(u, f) == pytest.approx(getattr(v, f), rel=1e-12, abs=1e-12), f


def test_rejects_nan_and_impossible_rows():
    with pytest.raises(ValueError, match="NaN"):
        token_stats(np.array([0.0, np.nan], np.float32))
    with pytest.raises(ValueError, match="-inf"):
        token_stats(np.full(4, -np.inf, np.float32))
    with pytest.raises(ValueError):
        token_stats(np.zeros((2, 2), np.float32))


def test_logits_are_not_modified():
    x = np.random.default_rng(2).standard_normal(1000).astype(np.float32)
    before = x.copy()
    token_stats(x)
    np.testing.assert_array_equal(x, before)


def test_sample_aggregates():
    toks = [TokenUncertainty(0.2, 0.9, 0.8, 1), TokenUncertainty(1.0, 0.5, 0.1, 2), TokenUncertainty(0.3, 0.8, 0.7, 3)]
    s = summarize(toks, "mean")
    assert s.mean_entropy == pytest.approx(0.5) and s.max_entropy == 1.0
    assert s.prod_confidence == pytest.approx(0.9 * 0.5 * 0.8)
    assert s.score == pytest.approx(0.5)
    assert summarize(toks, "max").score == 1.0
    assert summarize(toks, "prod").score == pytest.approx(1 - 0.36)
    assert summarize([], "prod") == SampleUncertainty(0, 0.0, 0.0, 1.0, "prod")
    assert summarize([TokenUncertainty(0, 1e-200, 0, 0)] * 5, "prod").prod_confidence == 0.0  # no crash
    with pytest.raises(ValueError):
        summarize(toks, "median")  # type: ignore[arg-type]


def test_recorder_copies_stats_not_logits():
    rng = np.random.default_rng(3)
    rec = UncertaintyRecorder(aggregate="max")
    buf = np.empty(500, np.float32)  # one buffer reused every step, like llama.cpp's
    expected = []
    for _ in range(4):
        buf[:] = rng.standard_normal(500) * 4
        expected.append(token_stats_fast(buf, Scratch()))  # the recorder's decode-loop path
        assert rec(buf) == expected[-1]
    buf[:] = 0.0
    assert rec.tokens == expected and len(rec) == 4
    assert rec.summary().score == max(t.entropy for t in expected)
    proc = rec.as_logits_processor()
    assert proc(np.array([1, 2]), buf) is buf and len(rec) == 5
    rec.reset()
    assert rec.tokens == []


@pytest.mark.parametrize("name", list(_cases()))
def test_fast_decode_path_matches_float64_reference(name):
    """The recorder's float32 path: ~1e-6 relative on finite rows, the exact path on odd rows."""
    x = _cases()[name]
    h, p, m, a = reference(x)
    t = token_stats_fast(x, Scratch())
    assert t.entropy == pytest.approx(h, rel=2e-6, abs=1e-6)
    assert t.max_prob == pytest.approx(p, rel=2e-6, abs=1e-9)
    assert t.margin == pytest.approx(m, rel=2e-6, abs=1e-6)
    assert t.token_id == a


@pytest.mark.parametrize("V", [32000, 49152, 262144])
def test_fast_path_at_real_vocabulary_sizes(V):
    rng, sc = np.random.default_rng(V), Scratch()
    for scale in (0.5, 3.0, 12.0):
        x = (rng.standard_normal(V) * scale).astype(np.float32)
        h, p, m, a = reference(x)
        t = token_stats_fast(x, sc)
        assert abs(t.entropy - h) < 1e-5 * max(1.0, h) and t.token_id == a
        assert t.max_prob == pytest.approx(p, rel=1e-5) and t.margin == pytest.approx(m, rel=1e-5, abs=1e-7)
    x = np.zeros(V, np.float32)
    assert token_stats_fast(x, sc).entropy == pytest.approx(math.log(V), rel=1e-6)
    before = x.copy()
    token_stats_fast(x, sc)
    assert np.array_equal(x, before)  # the live logits view is never written


def test_recorder_uses_fast_path_unless_exact():
    x = np.random.default_rng(3).standard_normal(49152).astype(np.float32) * 4
    fast, exact = UncertaintyRecorder(), UncertaintyRecorder(exact=True)
    a, b = fast(x), exact(x)
    assert b == token_stats(x) and a.entropy == pytest.approx(b.entropy, rel=2e-6) and a.token_id == b.token_id


def test_blocked_fast_path_edges():
    """Above 64k tokens the fast path works in blocks: argmax at either end, masked tokens, ties."""
    rng, sc = np.random.default_rng(7), Scratch()
    for where in (0, 262143, 70000):
        x = rng.standard_normal(262144).astype(np.float32)
        x[where] = 9.0
        h, p, m, a = reference(x)
        t = token_stats_fast(x, sc)
        assert t.token_id == a == where and t.entropy == pytest.approx(h, rel=1e-5)
        assert t.margin == pytest.approx(m, rel=1e-5)
    x[::5] = -np.inf  # falls back to the exact path
    assert token_stats_fast(x, sc) == token_stats(x)
    tie = np.zeros(100_000, np.float32)
    tie[[10, 90_000]] = 4.0
    assert token_stats_fast(tie, sc).margin == pytest.approx(0.0, abs=1e-7)
