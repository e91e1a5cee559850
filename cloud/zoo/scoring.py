"""Accuracy of predicted answers on a Split, per domain and task, with 95 % Wilson intervals.

VQA accuracy is exact match of the normalised answer; captions are scored separately with a
token-level F1 (order-free word overlap) because exact caption match is too strict to be useful.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from device.contracts.metrics import exact, token_f1, wilson


def score(preds: list[str], split) -> dict:
    """{"vqa", "caption_f1", "domains": {d: {"vqa", "vqa_ci", "vqa_n", "caption_f1", "n"}}, "tasks": {...}}."""
    acc, cap, task_acc = defaultdict(list), defaultdict(list), defaultdict(list)
    for p, a, d, t in zip(preds, split.answers, split.domains, split.tasks):
        if t == "caption":
            cap[d].append(token_f1(p, a))
        else:
            ok = exact(p, a)
            acc[d].append(ok)
            task_acc[t].append(ok)
    mean = lambda xs: float(np.mean(xs)) if xs else float("nan")
    doms = {d: {"vqa": mean(acc[d]), "vqa_ci": list(wilson(sum(acc[d]), len(acc[d]))), "vqa_n": len(acc[d]),
                "caption_f1": mean(cap[d]), "n": len(acc[d]) + len(cap[d])}
            for d in sorted(set(split.domains))}
    return {"vqa": mean([x for v in acc.values() for x in v]), "caption_f1": mean([x for v in cap.values() for x in v]),
            "domains": doms, "tasks": {t: mean(v) for t, v in sorted(task_acc.items())}}
