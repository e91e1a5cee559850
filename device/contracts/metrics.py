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
