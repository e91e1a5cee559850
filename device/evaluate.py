"""Accuracy of the device model itself (llama.cpp) on a held-out LLaVA-format set.

This is what the user's laptop actually answers -- the number that `cdcca sync` reports before
and after a patch, beside the cloud's torch evaluation of the same weights."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from device.contracts.dataset import QA, read_llava
from device.contracts.image import load_image
from device.contracts.metrics import exact, token_f1, wilson
from device.runtime import Runtime


def load_eval_set(path: Path, limit_per_domain: int | None = None) -> list[QA]:
    qas = read_llava(path)
    if limit_per_domain is None:
        return qas
    seen: dict[str, int] = defaultdict(int)
    out = []
    for q in qas:
        d = str(q.meta.get("domain", "all"))
        if seen[d] < limit_per_domain:
            out.append(q)
            seen[d] += 1
    return out


def evaluate(rt: Runtime, qas: list[QA], max_tokens: int = 16) -> dict:
    """{"vqa": mean, "domains": {d: {"vqa", "vqa_n", "vqa_ci" (95 % Wilson), "caption_f1", "n",
    "scores" (0/1 per VQA question, in eval-file order: two evaluations of one set pair up)}},
    "answers": [...]}"""
    acc, cap = defaultdict(list), defaultdict(list)
    answers = []
    for q in qas:
        img = load_image(q.image, rt.image_size) if q.image is not None and rt.has_vision else None
        pred = rt.generate(q.question, img, max_tokens).text
        answers.append(pred)
        d = str(q.meta.get("domain", "all"))
        if q.meta.get("task") == "caption":
            cap[d].append(token_f1(pred, q.answer))
        else:
            acc[d].append(exact(pred, q.answer))
    mean = lambda xs: float(np.mean(xs)) if xs else float("nan")
    doms = {d: {"vqa": mean(acc[d]), "vqa_n": len(acc[d]), "vqa_ci": list(wilson(sum(acc[d]), len(acc[d]))),
                "caption_f1": mean(cap[d]), "n": len(acc[d]) + len(cap[d]), "scores": [int(x) for x in acc[d]]}
            for d in sorted(set(acc) | set(cap))}
    return {"vqa": mean([x for v in acc.values() for x in v]), "domains": doms, "answers": answers}
