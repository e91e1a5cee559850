"""UTS — Uncertainty-guided Token Sampling: which chats the device uploads, and how few bytes.

Two stages, as in the paper (CDCCA, arXiv 2312.16279):

1. Sample stage (``SampleGate``): drop samples the device is sure about.  Output entropy alone is
   not enough: on unseen colour/shape combinations the student is *confidently wrong* (answer
   entropy 0.30 vs 1.02, see the field notes), so the gate also scores the INPUT: how far the
   image's projected visual tokens lie from the source feature statistics (``FeatureStats``).
   Per token the OOD distance is the mean squared z-score over dimensions (a diagonal
   Mahalanobis distance / D: ~1 in distribution, grows with shift); the sample's OOD score is its
   mean over tokens.  ``rule`` combines the two; the default ``"or"`` keeps a sample if EITHER is
   high, so confident-but-shifted samples get through.  ``UplinkSample.score`` carries this
   combined score (not the raw entropy, which would starve those samples in ``select_round``).
2. Token stage: keep only the answer positions with high entropy (always the most uncertain one)
   and the most-OOD ``1 - mask_ratio`` of the visual tokens (the paper's best mask ratio is 50%).
   The bytes really shrink: masked patches of the re-encoded image are filled with a constant
   (compresses to almost nothing) and only the kept visual-token embeddings travel (f16 or q8);
   the codecs live in ``device/uts_payload.py``.

Byte accounting.  ``raw_bytes`` is what a naive uplink without selection sends for the sample:
    len(original image file) + len(prompt, UTF-8) + len(answer, UTF-8)
    + N_visual x D x 4   (all visual-token embeddings, fp32)
    + T_answer x V x 4   (the full-vocabulary fp32 distribution of every answer token)
(image given only as pixels: H x W x 3 instead of the file).  This is the baseline of the paper's
31.10 MB -> 65.54 KB figure.  ``shipped_bytes`` is ``len(sample.model_dump_json())``, exactly
what the queue stores and the uplink sends.

Over the per-sample budget, the payload degrades in this order, keeping information as long as
possible: visual tokens f16 -> q8; halve the kept visual tokens (most-OOD stay) down to 1; drop
them if the image is shipped (the cloud can recompute them from the pixels with its twin of the
device model); re-encode the image as lossy WebP at ``lossy_qualities``.  If nothing fits, reject.
"""
from __future__ import annotations

import base64
import hashlib
import io
import math
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Iterator, Literal, Sequence

import numpy as np
from PIL import Image
from pydantic import ValidationError

from device.contracts.feature_stats import FeatureStats
from device.contracts.wire import TokenStats, UplinkSample
from device.uts_payload import encode_image, encode_visual_tokens, mask_image, n_visual_kept
from device.uncertainty import Aggregate, TokenUncertainty, summarize

Rule = Literal["or", "and", "entropy", "ood"]
_TIE = 1e-3  # adaptive mode: the secondary rank breaks ties of the primary one


@dataclass
class UTSConfig:
    # sample stage
    mode: Literal["absolute", "adaptive"] = "adaptive"
    rule: Rule = "or"  # or: either score passes; and: both; entropy / ood: that score alone
    aggregate: Aggregate = "mean"  # how answer-token entropies become one number
    entropy_threshold: float = 0.5  # absolute mode, nats at a vocabulary of entropy_ref_vocab tokens
    # the threshold scales with log V (entropy's range), so one setting fits a 373-token toy and a
    # 262k-token model alike; None = plain nats. 373 = the embedded default, where 0.5 was tuned.
    entropy_ref_vocab: int | None = 373
    ood_threshold: float = 2.0  # absolute mode, mean squared z-score (~1 in distribution)
    keep_fraction: float = 0.3  # adaptive mode: target fraction of samples kept
    window: int = 512  # adaptive mode: recent samples the running quantiles look at
    # token stage
    token_entropy_threshold: float | None = 0.5  # keep answer tokens at or above (nats)
    token_top_fraction: float | None = 0.2  # ... and the top fraction by entropy
    mask_ratio: float = 0.0  # fraction of visual tokens / image patches masked out (see the mask sweep in bench)
    # payload
    ship_image: bool = True
    ship_visual_tokens: bool = False  # also ship tokens with the image (the cloud recomputes them from pixels); always on without an image
    image_format: Literal["png", "webp"] = "png"  # lossless re-encode
    visual_dtype: Literal["f16", "q8"] = "f16"
    mask_fill: int = 0  # value of masked pixels: a constant compresses to almost nothing
    # budgets (None = unlimited)
    sample_budget_bytes: int | None = 64 << 10
    round_budget_bytes: int | None = 1 << 20
    lossy_qualities: tuple[int, ...] = (75, 50, 25)  # last-resort WebP qualities

    def __post_init__(self) -> None:
        if self.entropy_threshold <= 0 or self.ood_threshold <= 0:
            raise ValueError("UTS thresholds must be > 0")
        if not 0.0 < self.keep_fraction <= 1.0:
            raise ValueError("keep_fraction must be in (0, 1]")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError("mask_ratio must be in [0, 1)")
        if self.window < 1 or not 0 <= self.mask_fill <= 255:
            raise ValueError("window must be >= 1 and mask_fill a byte")


@dataclass(frozen=True)
class ChatRecord:
    """Everything the runtime knows about one answered question (the input of ``select``)."""

    prompt: str
    answer: str
    answer_token_ids: Sequence[int]
    tokens: Sequence[TokenUncertainty]  # per decode step; surplus trailing steps (EOS) are ignored
    vocab_size: int
    base_model: str
    image_bytes: bytes | None = None  # the file as the user gave it
    image: np.ndarray | None = None  # RGB uint8 [H, W, 3] as the model saw it
    patch_size: int = 8
    visual_embeddings: np.ndarray | None = None  # float32 [N, D], N = patches, row-major
    tag: str | None = None


@dataclass(frozen=True)
class UTSDecision:
    """What ``select`` decided and why; the byte counts feed the queue's compression stats."""

    kept: bool
    reason: str
    sample: UplinkSample | None
    score: float  # the sample-stage score (also UplinkSample.score): higher = more worth sending
    entropy: float  # aggregated answer entropy (or 1 - prod max-prob)
    ood_score: float  # mean token OOD distance; 0.0 when not measurable
    raw_bytes: int
    shipped_bytes: int  # 0 when not kept


# --- ids and byte accounting ------------------------------------------------------------------

def sample_id_for(image_bytes: bytes | None, prompt: str, base_model: str) -> str:
    """sha256 over length-prefixed fields (so field boundaries are unambiguous), 32 hex chars."""
    h = hashlib.sha256()
    for part in (image_bytes or b"", prompt.encode(), base_model.encode()):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:32]


def raw_bytes(rec: ChatRecord) -> int:
    """The no-selection baseline; the formula is in the module docstring."""
    img = len(rec.image_bytes) if rec.image_bytes is not None else (rec.image.nbytes if rec.image is not None else 0)
    vis = 0 if rec.visual_embeddings is None else int(np.prod(np.shape(rec.visual_embeddings))) * 4
    text = len(rec.prompt.encode()) + len(rec.answer.encode())
    return img + text + vis + len(rec.answer_token_ids) * rec.vocab_size * 4


# --- sample stage -----------------------------------------------------------------------------

def token_ood(emb: np.ndarray, stats: FeatureStats | None) -> np.ndarray:
    """Per visual token: mean over dimensions of ((x - mean) / std)^2, shape [N].

    Without source statistics the tokens are standardized against the image's own tokens: that
    still ranks tokens for the token stage (which patch stands out), but says nothing about the
    sample as a whole, so ``select`` then reports no sample OOD score.
    """
    x = np.asarray(emb, dtype=np.float32)
    if stats is None:
        mean, var = x.mean(axis=0), x.var(axis=0)
    else:
        if stats.dim != x.shape[-1]:
            raise ValueError(f"feature stats are {stats.dim}-d but the visual tokens are "
                             f"{x.shape[-1]}-d: stale stats file?")
        if stats.mean.ndim == 2 and stats.mean.shape[0] != x.shape[0]:
            raise ValueError(f"per-position feature stats cover {stats.mean.shape[0]} tokens, "
                             f"the image has {x.shape[0]}")
        mean, var = stats.mean, stats.var
    eps = 1e-8 + 1e-6 * float(np.mean(var))  # keeps dead dimensions from dominating
    return (np.square(x - mean) / (var + eps)).mean(axis=-1)


def _rank(window: deque, x: float) -> float:
    """Append x, return the fraction of the window <= x (its empirical CDF value, in (0, 1])."""
    window.append(x)
    return float(np.count_nonzero(np.fromiter(window, float, len(window)) <= x)) / len(window)


def _combine(rule: Rule, e: float, o: float | None, tie: float) -> float:
    if o is None:  # text-only: only the output side can be judged
        return e
    if rule == "or":
        return max(e, o) + tie * min(e, o)
    if rule == "and":
        return min(e, o) + tie * max(e, o)
    return e if rule == "entropy" else o


class SampleGate:
    """The sample stage; holds the running windows of adaptive mode, so keep one per device.

    absolute: each score is divided by its threshold and combined by ``rule`` (or = max,
        and = min); keep iff the result >= 1.  The score is thus "how many thresholds over".
    adaptive: each score becomes its rank among the last ``window`` samples (entropy and OOD in
        their own windows, so their units never mix), the ranks are combined by ``rule``, and the
        sample is kept iff fewer than ``keep_fraction`` of the last ``window`` combined scores
        beat it: a fixed-size window running quantile, which tracks drift in the score
        distribution and keeps ~``keep_fraction`` of a stationary stream.  The first samples are
        kept more often (an empty window has nothing to beat); the windows restart with the
        process.
    """

    def __init__(self, cfg: UTSConfig) -> None:
        self.cfg = cfg
        self._h: deque = deque(maxlen=cfg.window)
        self._o: deque = deque(maxlen=cfg.window)
        self._c: deque = deque(maxlen=cfg.window)

    def entropy_threshold(self, vocab_size: int | None) -> float:
        """The absolute entropy threshold in nats for a model with ``vocab_size`` tokens."""
        cfg = self.cfg
        if cfg.entropy_ref_vocab is None or not vocab_size or vocab_size < 2:
            return cfg.entropy_threshold
        return cfg.entropy_threshold * math.log(vocab_size) / math.log(cfg.entropy_ref_vocab)

    def __call__(self, entropy: float, ood: float | None, vocab_size: int | None = None) -> tuple[bool, float, str]:
        cfg = self.cfg
        if cfg.rule == "ood" and ood is None:
            return False, 0.0, "rule 'ood' but the sample has no visual tokens to score"
        if cfg.mode == "absolute":
            h_thr = self.entropy_threshold(vocab_size)
            c = _combine(cfg.rule, entropy / h_thr, None if ood is None else ood / cfg.ood_threshold, 0.0)
            why = f"score {c:.3f} {'>=' if c >= 1.0 else '<'} 1 (thresholds: entropy {h_thr:.3g} nats, " \
                  f"ood {cfg.ood_threshold})"
            return c >= 1.0, c, why
        e = _rank(self._h, entropy)
        o = None if ood is None else _rank(self._o, ood)
        c = _combine(cfg.rule, e, o, _TIE)
        beaten_by = sum(1 for v in self._c if v > c) / max(1, len(self._c))
        self._c.append(c)
        why = f"{beaten_by:.0%} of the last {len(self._c) - 1} samples scored higher (keeps top {cfg.keep_fraction:.0%})"
        return beaten_by < cfg.keep_fraction, c, why


# --- token stage ------------------------------------------------------------------------------

def select_answer_tokens(entropy: np.ndarray, cfg: UTSConfig) -> np.ndarray:
    """Sorted positions: the max-entropy one, those >= threshold, and the top fraction."""
    h = np.asarray(entropy, dtype=np.float64)
    if h.size == 0:
        return np.zeros(0, dtype=np.int64)
    keep = np.zeros(h.size, dtype=bool)
    keep[int(np.argmax(h))] = True
    if cfg.token_entropy_threshold is not None:
        keep |= h >= cfg.token_entropy_threshold
    if cfg.token_top_fraction is not None:
        keep[np.argsort(-h, kind="stable")[:math.ceil(cfg.token_top_fraction * h.size)]] = True
    return np.flatnonzero(keep)


# --- packing under the per-sample budget ----------------------------------------------------------

@dataclass(frozen=True)
class _Plan:
    n_visual: int  # visual tokens shipped, most-OOD first (0 = none)
    dtype: str
    image: bool
    quality: int | None  # None: lossless; else lossy WebP quality

    def describe(self) -> str:
        vis = f"{self.n_visual} visual tokens {self.dtype}" if self.n_visual else "no visual tokens"
        # the image as the model sees it (already resized to its input size), then re-encoded
        img = "no image" if not self.image else ("model-size image, lossless" if self.quality is None
                                                 else f"model-size image, webp q{self.quality}")
        return f"{vis}, {img}"


def _plans(cfg: UTSConfig, n_vis: int, has_image: bool) -> Iterator[_Plan]:
    """Payloads from richest to smallest, in the order documented in the module docstring."""
    img = cfg.ship_image and has_image
    vis = cfg.ship_visual_tokens or not img  # without pixels the tokens are the only visual payload
    if vis and n_vis > 0:
        yield _Plan(n_vis, cfg.visual_dtype, img, None)
        if cfg.visual_dtype == "f16":
            yield _Plan(n_vis, "q8", img, None)
        n = n_vis // 2
        while n >= 1:
            yield _Plan(n, "q8", img, None)
            n //= 2
    if img or not (vis and n_vis > 0):
        yield _Plan(0, "q8", img, None)
    if img:
        for q in cfg.lossy_qualities:
            yield _Plan(0, "q8", True, q)


def _pixels(rec: ChatRecord) -> np.ndarray | None:
    if rec.image is not None:
        return np.asarray(rec.image, dtype=np.uint8)
    if rec.image_bytes is None:
        return None
    with Image.open(io.BytesIO(rec.image_bytes)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def _pack(rec: ChatRecord, cfg: UTSConfig, tok_ood: np.ndarray | None, head: dict, why: str = "") -> UTSDecision:
    """Token stage + the cheapest-degradation search under the per-sample budget.

    ``head`` holds the sample-stage numbers (score, entropy, ood_score, raw_bytes) of the decision.
    """
    n = len(rec.answer_token_ids)
    h = np.array([t.entropy for t in rec.tokens[:n]], dtype=np.float64)
    pos = select_answer_tokens(h, cfg)
    common = dict(
        sample_id=sample_id_for(rec.image_bytes, rec.prompt, rec.base_model), base_model=rec.base_model,
        prompt=rec.prompt, answer=rec.answer, answer_token_ids=[int(t) for t in rec.answer_token_ids],
        tokens=TokenStats(positions=[int(p) for p in pos], token_ids=[int(rec.answer_token_ids[p]) for p in pos],
                          entropy=[round(float(h[p]), 4) for p in pos]),
        score=head["score"], ood_score=head["ood_score"], raw_bytes=head["raw_bytes"], tag=rec.tag)
    rgb = _pixels(rec)
    order = np.zeros(0, dtype=np.int64) if tok_ood is None else np.argsort(-tok_ood, kind="stable")
    n_vis = n_visual_kept(len(order), cfg.mask_ratio)
    patch_kept: list[int] | None = None
    if rgb is not None and tok_ood is not None:
        gh, gw = rgb.shape[0] // rec.patch_size, rgb.shape[1] // rec.patch_size
        if gh * gw == len(order):  # tokens map 1:1 onto the patch grid: mask what UTS dropped
            patch_kept = sorted(int(i) for i in order[:n_vis])
            rgb = mask_image(rgb, rec.patch_size, patch_kept, cfg.mask_fill)
    images: dict[int | None, tuple[bytes, str]] = {}
    smallest = None
    for plan in _plans(cfg, n_vis, rgb is not None):
        payload: dict = {}
        if plan.image:
            if plan.quality not in images:
                images[plan.quality] = encode_image(rgb, cfg.image_format, plan.quality)
            img, fmt = images[plan.quality]
            payload.update(image=base64.b64encode(img), image_format=fmt, image_patch_kept=patch_kept)
        if plan.n_visual:
            payload["visual_tokens"] = encode_visual_tokens(rec.visual_embeddings, order[:plan.n_visual], plan.dtype)
        try:
            sample = UplinkSample(**common, **payload)
        except ValidationError as e:
            return UTSDecision(False, f"invalid sample: {e.errors()[0]['msg']}", None, shipped_bytes=0, **head)
        size = len(sample.model_dump_json())
        smallest = size if smallest is None else min(smallest, size)
        if cfg.sample_budget_bytes is None or size <= cfg.sample_budget_bytes:
            because = f"{why}; " if why else ""  # the sample stage's reason, then what is shipped
            return UTSDecision(True, f"kept: {because}ships {plan.describe()}", sample, shipped_bytes=size, **head)
    why = f"over the sample budget: smallest payload {smallest} bytes > {cfg.sample_budget_bytes}"
    return UTSDecision(False, why, None, shipped_bytes=0, **head)


# --- public entry points ------------------------------------------------------------------------

def select(rec: ChatRecord, cfg: UTSConfig, stats: FeatureStats | None = None,
           gate: SampleGate | None = None) -> UTSDecision:
    """Run both UTS stages on one answered question; ``gate`` carries adaptive-mode history."""
    if gate is None:
        if cfg.mode == "adaptive":
            raise ValueError("adaptive UTS needs a SampleGate that lives across samples")
        gate = SampleGate(cfg)
    n = len(rec.answer_token_ids)
    if len(rec.tokens) < n:
        raise ValueError(f"{len(rec.tokens)} token stats for {n} answer tokens")
    entropy = summarize(rec.tokens[:n], cfg.aggregate).score
    emb = rec.visual_embeddings
    if emb is not None and (np.ndim(emb) != 2 or len(emb) == 0):
        raise ValueError(f"visual embeddings must be [N, D] with N >= 1, got shape {np.shape(emb)}")
    if stats is not None and emb is not None and not stats.fits(emb):
        stats = None  # stats of another model (or grid): OOD is not measured, chat goes on
    tok_ood = None if emb is None else token_ood(emb, stats)
    ood = float(tok_ood.mean()) if (tok_ood is not None and stats is not None) else None
    keep, score, why = gate(entropy, ood, rec.vocab_size)
    head = dict(score=score, entropy=entropy, ood_score=ood or 0.0, raw_bytes=raw_bytes(rec))
    if not keep:
        return UTSDecision(False, f"confident: {why}", None, shipped_bytes=0, **head)
    return _pack(rec, cfg, tok_ood, head, why)


def select_round(samples: Iterable[UplinkSample], budget_bytes: int | None) -> list[UplinkSample]:
    """Highest-score samples whose serialized sizes fit the round budget together (greedy).

    A sample too big for what is left is skipped, and smaller lower-score ones may still fit.
    Ties break on ``sample_id`` so a round is reproducible.
    """
    ranked = sorted(samples, key=lambda s: (-s.score, s.sample_id))
    if budget_bytes is None:
        return ranked
    out, used = [], 0
    for s in ranked:
        size = len(s.model_dump_json())
        if used + size <= budget_bytes:
            out.append(s)
            used += size
    return out
