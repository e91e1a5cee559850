"""Samples -> token ids -> padded torch batches, in the shared prompt layout."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from device.contracts import prompt
from device.contracts.dataset import QA
from device.contracts.image import load_image

from .model import Batch
from .scenes import Sample
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


@dataclass
class Split:
    """A dataset held in memory: images uint8 [N, H, W, 3] plus text, with domain/task labels."""

    images: np.ndarray
    questions: list[str]
    answers: list[str]
    domains: list[str]
    tasks: list[str]

    def __len__(self) -> int:
        return len(self.questions)

    def subset(self, idx) -> "Split":
        idx = list(idx)
        return Split(self.images[idx], [self.questions[i] for i in idx], [self.answers[i] for i in idx],
                     [self.domains[i] for i in idx], [self.tasks[i] for i in idx])

    def batch(self, codec: Codec, idx, with_answers: bool = True) -> Batch:
        idx = list(idx)
        return make_batch(codec, self.images[idx], [self.questions[i] for i in idx],
                          [self.answers[i] for i in idx] if with_answers else None)


def from_samples(samples: list[Sample]) -> Split:
    return Split(np.stack([s.image for s in samples]), [s.question for s in samples], [s.answer for s in samples],
                 [s.domain for s in samples], [s.task for s in samples])


def from_llava(qas: list[QA], image_size: int) -> Split:
    """A user's LLaVA dataset; images are loaded and resized exactly as the device does."""
    with_img = [q for q in qas if q.image is not None]
    if not with_img:
        raise ValueError("dataset has no records with images")
    imgs = np.stack([load_image(Path(q.image), image_size) for q in with_img])
    return Split(imgs, [q.question for q in with_img], [q.answer for q in with_img],
                 [str(q.meta.get("domain", "user")) for q in with_img], [str(q.meta.get("task", "qa")) for q in with_img])
