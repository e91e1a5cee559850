"""UTS: both stages, the payload's real byte savings, and the budgets."""
from __future__ import annotations

import io
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from device.contracts.feature_stats import FeatureStats
from device.contracts.image import encode_png
from device.uncertainty import TokenUncertainty
from device.uts import (ChatRecord, SampleGate, UTSConfig, raw_bytes, sample_id_for, select, select_answer_tokens,
                        select_round, token_ood)
from device.uts_payload import decode_visual_tokens, encode_image, encode_visual_tokens

REPO = Path(__file__).resolve().parents[2]
D, P, SIDE = 32, 8, 32  # embedding dim, patch size, image side: a 4x4 grid of 16 visual tokens
N = (SIDE // P) ** 2


@pytest.fixture(scope="module")
def stats() -> FeatureStats:
    return FeatureStats.from_features(np.random.default_rng(0).standard_normal((4096, D)))


def toks(entropies) -> list[TokenUncertainty]:
    return [TokenUncertainty(float(h), math.exp(-h), 0.1, i) for i, h in enumerate(entropies)]


def record(seed=0, entropies=(0.1, 0.9, 0.3), shift=0.0, shifted=(), image=True, prompt="what shape is red?",
           vocab=1000) -> ChatRecord:
    """Image of smooth blobs + noise; embeddings ~N(0, 1), tokens in ``shifted`` moved by ``shift``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIDE, :SIDE]
    rgb = np.stack([(np.sin(xx / 3 + c) * 100 + 120 + rng.integers(0, 40, (SIDE, SIDE))) for c in range(3)], -1)
    rgb = rgb.clip(0, 255).astype(np.uint8)
    emb = rng.standard_normal((N, D)).astype(np.float32)
    emb[list(shifted)] += shift
    return ChatRecord(prompt=prompt, answer="circle", answer_token_ids=list(range(100, 100 + len(entropies))),
                      tokens=toks(entropies), vocab_size=vocab, base_model="m" * 16,
                      image_bytes=encode_png(rgb) if image else None, image=rgb if image else None, patch_size=P,
                      visual_embeddings=emb if image else None, tag="test")


ABS = UTSConfig(mode="absolute", entropy_threshold=0.5, ood_threshold=2.0, ship_visual_tokens=True, mask_ratio=0.5,
                entropy_ref_vocab=None)  # plain nats here; the log V scaling has its own test


# --- sample stage -------------------------------------------------------------------------------

def test_absolute_entropy_threshold_obeyed(stats):
    cfg = replace(ABS, rule="entropy")
    for h in np.linspace(0.0, 1.0, 21):
        d = select(record(entropies=(h, h)), cfg, stats)
        assert d.kept == (h >= 0.5) and d.entropy == pytest.approx(h)
        assert (d.sample is not None) == d.kept


def test_or_rule_catches_confident_but_shifted_images(stats):
    calm, shifted = record(entropies=(0.05,)), record(entropies=(0.05,), shift=3.0, shifted=range(N))
    assert not select(calm, ABS, stats).kept  # confident and in distribution
    d = select(shifted, ABS, stats)  # confident, but the image is far from the source
    assert d.kept and d.ood_score > 2.0 and d.sample.ood_score == d.ood_score
    assert not select(shifted, replace(ABS, rule="entropy"), stats).kept
    assert not select(record(entropies=(0.9,)), replace(ABS, rule="and"), stats).kept
    assert select(record(entropies=(0.9,)), ABS, None).ood_score == 0.0  # no stats: OOD not measured


@pytest.mark.parametrize("rule", ["or", "and", "entropy", "ood"])
def test_adaptive_keeps_target_fraction(rule):
    rng = np.random.default_rng(5)
    gate = SampleGate(UTSConfig(mode="adaptive", rule=rule, keep_fraction=0.3, window=256))
    kept = [gate(float(rng.gamma(2.0)), float(rng.lognormal()))[0] for _ in range(6000)]
    assert abs(np.mean(kept[500:]) - 0.3) < 0.03


def test_adaptive_follows_a_shift_and_needs_a_gate(stats):
    rng = np.random.default_rng(6)
    gate = SampleGate(UTSConfig(rule="entropy", keep_fraction=0.2, window=200))
    for scale in (1.0, 10.0):  # every score jumps tenfold: the running quantile re-adapts
        kept = [gate(float(rng.exponential(scale)), None)[0] for _ in range(2000)]
        assert abs(np.mean(kept[400:]) - 0.2) < 0.04
    with pytest.raises(ValueError, match="SampleGate"):
        select(record(), UTSConfig(mode="adaptive"), stats)
    d = select(record(entropies=(2.0,)), UTSConfig(mode="adaptive"), stats, gate=SampleGate(UTSConfig()))
    assert d.kept  # the first sample has nothing to beat


# --- token stage ------------------------------------------------------------------------------------

def test_answer_token_positions():
    h = np.array([0.1, 0.9, 0.3, 0.6, 0.05])
    pick = lambda **kw: select_answer_tokens(h, UTSConfig(**kw)).tolist()  # noqa: E731
    assert pick(token_entropy_threshold=0.5, token_top_fraction=None) == [1, 3]
    assert pick(token_entropy_threshold=None, token_top_fraction=None) == [1]  # always the max one
    assert pick(token_entropy_threshold=2.0, token_top_fraction=None) == [1]
    assert pick(token_entropy_threshold=None, token_top_fraction=0.6) == [1, 2, 3]
    assert pick(token_entropy_threshold=0.5, token_top_fraction=0.2) == [1, 3]
    assert select_answer_tokens(np.array([]), UTSConfig()).tolist() == []


def test_selected_tokens_reach_the_wire(stats):
    cfg = replace(ABS, aggregate="max", token_entropy_threshold=0.5, token_top_fraction=None)
    rec = record(entropies=(0.1, 0.9, 0.3, 0.6, 0.05, 0.2))  # one surplus EOS step below
    rec = replace(rec, answer_token_ids=rec.answer_token_ids[:5])
    t = select(rec, cfg, stats).sample.tokens
    assert (t.positions, t.token_ids, t.entropy) == ([1, 3], [101, 103], [0.9, 0.6])
    with pytest.raises(ValueError, match="token stats"):
        select(replace(rec, tokens=rec.tokens[:2]), cfg, stats)


def test_mask_ratio_half_keeps_the_most_ood_half(stats):
    hot = [0, 2, 5, 7, 8, 11, 13, 15]
    rec = record(entropies=(0.9,), shift=2.5, shifted=hot)
    s = select(rec, ABS, stats).sample
    assert s.visual_tokens.indices == hot and s.visual_tokens.n_total == N
    assert s.image_patch_kept == hot
    img = np.asarray(Image.open(io.BytesIO(s.image)).convert("RGB"))
    for i in range(N):
        r, c = divmod(i, SIDE // P)
        patch, orig = img[r * P:(r + 1) * P, c * P:(c + 1) * P], rec.image[r * P:(r + 1) * P, c * P:(c + 1) * P]
        assert np.array_equal(patch, orig) if i in hot else (patch == 0).all()
    np.testing.assert_allclose(decode_visual_tokens(s.visual_tokens), rec.visual_embeddings[hot], atol=2e-2)
    assert len(select(rec, replace(ABS, mask_ratio=0.75), stats).sample.visual_tokens.indices) == 4


def test_masked_image_is_smaller_than_the_unmasked_png(stats):
    for fmt in ("png", "webp"):
        rec = record(entropies=(0.9,))
        s = select(rec, replace(ABS, image_format=fmt), stats).sample
        assert s.image_format == fmt
        assert len(s.image) < len(encode_image(rec.image, fmt)[0]) <= 1.2 * len(encode_png(rec.image))


def test_q8_visual_tokens():
    emb = np.random.default_rng(7).standard_normal((N, D)).astype(np.float32) * 5
    emb[3] = 0.0
    vt = encode_visual_tokens(emb, [9, 3, 1], "q8")
    assert vt.indices == [1, 3, 9] and len(vt.data) == 3 * D and len(vt.scale) == 3
    err = np.abs(decode_visual_tokens(vt) - emb[[1, 3, 9]]).max(axis=1)
    assert (err <= np.abs(emb[[1, 3, 9]]).max(axis=1) / 254 + 1e-6).all()


# --- bytes ---------------------------------------------------------------------------------------------

def test_raw_bytes_formula_and_shipped_bytes(stats):
    rec = record(entropies=(0.9, 0.8, 0.7), prompt="wie heißt die Form?", vocab=262144)
    expected = len(rec.image_bytes) + len(rec.prompt.encode("utf-8")) + len("circle") + N * D * 4 + 3 * 262144 * 4
    assert raw_bytes(rec) == expected
    d = select(rec, ABS, stats)
    assert d.raw_bytes == d.sample.raw_bytes == expected
    assert d.shipped_bytes == len(d.sample.model_dump_json()) and d.shipped_bytes < expected / 100
    text = replace(rec, image_bytes=None, image=None, visual_embeddings=None)
    assert raw_bytes(text) == expected - len(rec.image_bytes) - N * D * 4
    assert select(text, ABS, stats).sample.image is None


def test_per_sample_budget_never_exceeded(stats):
    rec = record(entropies=(0.9,), shift=1.0, shifted=range(4))
    full = select(rec, replace(ABS, sample_budget_bytes=None), stats).shipped_bytes
    reasons = set()
    for budget in range(200, full + 200, 150):
        for cfg in (replace(ABS, sample_budget_bytes=budget), replace(ABS, sample_budget_bytes=budget, ship_image=False)):
            d = select(rec, cfg, stats)
            reasons.add(d.reason.split(":")[0])
            if d.kept:
                assert d.shipped_bytes == len(d.sample.model_dump_json()) <= budget
                assert d.sample.image is not None or d.sample.visual_tokens is not None
            else:
                assert "budget" in d.reason and d.sample is None
    assert reasons == {"kept", "over the sample budget"}
    small = select(rec, replace(ABS, sample_budget_bytes=full - 1), stats)
    assert small.kept and "q8" in small.reason  # the first degradation step


def test_per_round_budget_never_exceeded(stats):
    rng = np.random.default_rng(8)
    samples = []
    for i in range(30):
        rec = record(seed=i, entropies=tuple(rng.uniform(0.5, 2, rng.integers(1, 6))), prompt=f"q{i}" * i)
        samples.append(select(rec, ABS, stats).sample)
    sizes = {s.sample_id: len(s.model_dump_json()) for s in samples}
    for budget in (0, 500, 3000, 10_000, 40_000, 10**9):
        picked = select_round(samples, budget)
        assert sum(sizes[s.sample_id] for s in picked) <= budget
        assert [s.score for s in picked] == sorted((s.score for s in picked), reverse=True)
        left = budget - sum(sizes[s.sample_id] for s in picked)
        best_out = [s for s in samples if s not in picked and s.score > picked[-1].score] if picked else samples
        assert all(sizes[s.sample_id] > left for s in best_out)  # nothing better was skipped that fit
    assert len(select_round(samples, 10**9)) == 30 == len(select_round(samples, None))


def test_sample_id_stable_and_idempotent(stats):
    a, b = record(entropies=(0.9,)), record(entropies=(0.7, 1.2))
    ids = {select(a, ABS, stats).sample.sample_id for _ in range(3)} | {select(b, ABS, stats).sample.sample_id}
    assert len(ids) == 1 and len(ids.pop()) == 32
    assert sample_id_for(b"ab", "c", "m") != sample_id_for(b"a", "bc", "m")
    assert sample_id_for(None, "q", "m") == sample_id_for(b"", "q", "m") != sample_id_for(None, "q", "n")


def test_feature_stats_roundtrip(tmp_path, stats):
    stats.save(tmp_path / "fs.npz")
    back = FeatureStats.load(tmp_path / "fs.npz")
    assert np.array_equal(back.mean, stats.mean) and np.array_equal(back.var, stats.var) and back.count == 4096
    (tmp_path / "bad.npz").write_bytes(b"nope")
    with pytest.raises(ValueError):
        FeatureStats.load(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="stale"):
        token_ood(record().visual_embeddings, FeatureStats(np.zeros(D + 1), np.ones(D + 1)))
    # another model's stats never crash a chat: OOD is simply not measured
    d = select(record(entropies=(0.9,)), ABS, FeatureStats(np.zeros(D + 1), np.ones(D + 1)))
    assert d.kept and d.ood_score == 0.0


def test_per_position_stats(stats):
    """The cloud may write [N, D] stats (one mean/var per grid position); they broadcast."""
    per_pos = FeatureStats(np.tile(stats.mean, (N, 1)), np.tile(stats.var, (N, 1)))
    rec = record(entropies=(0.9,), shift=2.5, shifted=[1, 4])
    assert select(rec, ABS, per_pos).ood_score == pytest.approx(select(rec, ABS, stats).ood_score, rel=1e-5)
    with pytest.raises(ValueError, match="per-position"):
        token_ood(rec.visual_embeddings, FeatureStats(per_pos.mean[:4], per_pos.var[:4]))
    assert select(rec, ABS, FeatureStats(per_pos.mean[:4], per_pos.var[:4])).ood_score == 0.0


def test_absolute_entropy_threshold_scales_with_log_vocabulary():
    """0.5 nats at the toy's 373 tokens is the same fraction of log V as 1.05 nats at 262k."""
    cfg = replace(ABS, rule="entropy", entropy_ref_vocab=373)
    gate = SampleGate(cfg)
    assert gate.entropy_threshold(373) == pytest.approx(0.5)
    big = gate.entropy_threshold(262144)
    assert big == pytest.approx(0.5 * math.log(262144) / math.log(373))
    assert select(record(entropies=(0.8, 0.8), vocab=373), cfg, None).kept
    assert not select(record(entropies=(0.8, 0.8), vocab=262144), cfg, None).kept
    assert select(record(entropies=(big + 0.01,) * 2, vocab=262144), cfg, None).kept


def test_device_modules_import_without_torch():
    code = ("import sys\n"
            "for m in ('torch', 'transformers', 'peft'): sys.modules[m] = None\n"
            "import device.uncertainty, device.uts, device.queue, device.contracts.feature_stats\n"
            "assert not any(k.split('.')[0] in ('torch', 'transformers') and v is not None for k, v in sys.modules.items())\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
