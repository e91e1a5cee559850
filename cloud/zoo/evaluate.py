"""Greedy generation and accuracy of a torch TinyLlava, per domain and task.

VQA accuracy is exact match of the normalised answer; captions are scored separately with a
token-level F1 (order-free word overlap) because exact caption match is too strict to be useful.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from .data import Codec, Split, make_batch
from .model import TinyLlava
from .scoring import score  # noqa: F401  (one definition, re-exported)


@torch.no_grad()
def generate(model: TinyLlava, codec: Codec, images: np.ndarray | None, questions: list[str],
             max_new: int = 16, batch_size: int = 256) -> list[str]:
    """Greedy answers. Rows are grouped by prompt length so no row needs padding."""
    model.eval()
    out: list[str] = [""] * len(questions)
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, q in enumerate(questions):
        by_len[len(codec.suffix(q))].append(i)
    for idx_all in by_len.values():
        for s in range(0, len(idx_all), batch_size):
            idx = idx_all[s:s + batch_size]
            b = make_batch(codec, None if images is None else images[idx], [questions[i] for i in idx], None)
            embeds = model.embed(b)
            done = torch.zeros(len(idx), dtype=torch.bool)
            gen = []
            for _ in range(max_new):
                nxt = model.text(embeds)[:, -1].argmax(-1)
                nxt = torch.where(done, torch.full_like(nxt, codec.eos), nxt)
                gen.append(nxt)
                done |= nxt == codec.eos
                if done.all():
                    break
                embeds = torch.cat([embeds, model.text.embed(nxt)[:, None]], 1)
            g = torch.stack(gen, 1).tolist()
            for j, i in enumerate(idx):
                ids = g[j][: g[j].index(codec.eos)] if codec.eos in g[j] else g[j]
                out[i] = codec.decode(ids)
    return out


def evaluate(model: TinyLlava, codec: Codec, split: Split, max_new: int = 16) -> dict:
    return score(generate(model, codec, split.images, split.questions, max_new), split)
