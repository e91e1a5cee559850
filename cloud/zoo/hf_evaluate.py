"""Greedy answers and accuracy of the default's HF models (``generate()``, libmtmd layout), scored
with the zoo's one scorer (cloud/zoo/evaluate.score: exact-match VQA, caption token F1)."""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from .split import Split
from .scoring import score
from .hf_data import Layout, embed


@torch.no_grad()
def generate(model, lay: Layout, images: np.ndarray, questions: list[str], max_new: int = 16,
             batch_size: int = 256) -> list[str]:
    """Greedy answers; rows are grouped by prompt length so no row needs padding."""
    model.eval()
    out: list[str] = [""] * len(questions)
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, q in enumerate(questions):
        by_len[len(lay.suffix(q))].append(i)
    for idx_all in by_len.values():
        for s in range(0, len(idx_all), batch_size):
            idx = idx_all[s:s + batch_size]
            ids = torch.tensor([lay.prefix + lay.suffix(questions[i]) for i in idx])
            emb = embed(model, lay, ids, images[idx])
            g = model.generate(inputs_embeds=emb, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                               do_sample=False, eos_token_id=lay.eos, pad_token_id=lay.pad)
            for j, i in enumerate(idx):
                row = g[j].tolist()
                out[i] = lay.decode(row[: row.index(lay.eos)] if lay.eos in row else row)
    return out


def evaluate(model, lay: Layout, split: Split, max_new: int = 16) -> dict:
    return score(generate(model, lay, split.images, split.questions, max_new), split)
