"""Accuracy of a cloud-side model (the merged twin, the teacher) on a LLaVA-JSON set, scored the
way ``device.evaluate`` scores the device, so the round can put "full precision" and "teacher"
beside the device-measured before/after (DWC's kept share of the gain needs the first; the
distillation's headroom, the second).  The device's numbers stay the product's numbers."""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Sequence

import numpy as np

from device.contracts.dataset import QA
from device.contracts.metrics import exact, token_f1


def score(answers: Sequence[str], qas: Sequence[QA]) -> dict:
    """``{"vqa", "domains": {d: {"vqa", "caption_f1", "n"}}}`` -- device.evaluate's shape."""
    acc, cap = defaultdict(list), defaultdict(list)
    for pred, q in zip(answers, qas):
        d = str(q.meta.get("domain", "all"))
        (cap[d].append(token_f1(pred, q.answer)) if q.meta.get("task") == "caption"
         else acc[d].append(exact(pred, q.answer)))
    mean = lambda xs: float(np.mean(xs)) if xs else float("nan")  # noqa: E731
    doms = {d: {"vqa": mean(acc[d]), "caption_f1": mean(cap[d]), "n": len(acc[d]) + len(cap[d])}
            for d in sorted(set(acc) | set(cap))}
    return {"vqa": mean([x for v in acc.values() for x in v]), "domains": doms}


def evaluate(answer: Callable[[np.ndarray | None, str], str], images: Sequence[np.ndarray | None],
             qas: Sequence[QA]) -> dict:
    return score([answer(im, q.question) for im, q in zip(images, qas)], qas)
