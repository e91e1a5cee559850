"""Samples -> token ids -> padded torch batches, in the shared prompt layout."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tokenizers import Tokenizer

from device.contracts import prompt

from .model import Batch
from .tokenizer import encode, special_ids


@dataclass
class Codec:
    """Tokenizer plus the fixed pieces of the prompt."""

    tok: Tokenizer

    def __post_init__(self):
        ids = special_ids(self.tok)
        self.pad, self.bos, self.eos = ids["pad"], ids["bos"], ids["eos"]
        self.prefix = [self.bos] + encode(self.tok, prompt.PREFIX)

        self._cache: dict[str, list[int]] = {}

    def _enc(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = self._cache[text] = encode(self.tok, text)
        return ids

    def suffix(self, question: str) -> list[int]:
        return self._enc(prompt.suffix(question))

    def answer(self, answer: str) -> list[int]:
        return self._enc(prompt.answer_text(answer)) + [self.eos]

    def decode(self, ids: list[int]) -> str:
        ids = [i for i in ids if i not in (self.eos, self.pad, self.bos)]
        return self.tok.decode(ids).strip()


def make_batch(codec: Codec, images: np.ndarray | None, questions: list[str], answers: list[str] | None) -> Batch:
    """Right-padded batch; with ``answers=None`` the text holds only the prompt suffix."""
    rows, labels, starts = [], [], []
    for i, q in enumerate(questions):
        s = codec.suffix(q)
        a = codec.answer(answers[i]) if answers is not None else []
        rows.append(s + a)
        labels.append([-100] * len(s) + a)
        starts.append(len(s))
    width = max(len(r) for r in rows)
    text = torch.full((len(rows), width), codec.pad, dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (r, l) in enumerate(zip(rows, labels)):
        text[i, : len(r)] = torch.tensor(r)
        lab[i, : len(l)] = torch.tensor(l)
    pre = torch.tensor(codec.prefix).expand(len(rows), -1)
    imgs = None if images is None else torch.from_numpy(np.ascontiguousarray(images))
    return Batch(pre, imgs, text, lab, torch.tensor(starts))


from .split import Split, from_llava, from_samples  # noqa: E402,F401  (one definition, re-exported)
