"""A dataset held in memory (images + question/answer text + domain/task labels), independent of
any model class, so the world, the builders and the rounds share one container."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from device.contracts.dataset import QA
from device.contracts.image import load_image

from .scenes import Sample


@dataclass
class Split:
    """Images uint8 [N, H, W, 3] plus text, with domain/task labels."""

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


def from_samples(samples: list[Sample]) -> Split:
    return Split(np.stack([s.image for s in samples]), [s.question for s in samples], [s.answer for s in samples],
                 [s.domain for s in samples], [s.task for s in samples])


def from_llava(qas: list[QA], image_size: int) -> Split:
    """A LLaVA dataset; images are loaded and resized exactly as the device does."""
    with_img = [q for q in qas if q.image is not None]
    if not with_img:
        raise ValueError("dataset has no records with images")
    imgs = np.stack([load_image(Path(q.image), image_size) for q in with_img])
    return Split(imgs, [q.question for q in with_img], [q.answer for q in with_img],
                 [str(q.meta.get("domain", "user")) for q in with_img], [str(q.meta.get("task", "qa")) for q in with_img])
