"""A teacher is any Hugging Face checkpoint directory (``save_pretrained`` layout).

Why its own inputs: a teacher has its own tokenizer, chat template and image geometry; it answers
(pseudo-labels) and, when it shares the student's tokenizer, gives full-vocabulary logits on the
same answer tokens.  An Idefics3 teacher is fed in the same libmtmd layout as the student (with
its own geometry), so what it sees is what the device sees; a text-only teacher sees the question.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .base import Example, FamilyError, collate, load_teacher
from .idefics3_layout import HFVocab, layout


class Teacher:
    def __init__(self, path: str | Path, max_new_tokens: int = 16):
        from device.chat_prompt import ChatPrompt

        self.path = Path(path)
        self.model, self.tokenizer = load_teacher(self.path)
        self.max_new_tokens = max_new_tokens
        tok = self.tokenizer
        bos = tok.bos_token_id
        add_bos = bos is not None and tok.encode("a", add_special_tokens=True)[:1] == [bos]
        self.vocab = HFVocab(tok, add_bos)
        self.chat = ChatPrompt(tok.chat_template, tok.bos_token or "", tok.eos_token or "", model_name=self.path.name)
        cfg = self.model.config
        self.vision = getattr(cfg, "model_type", "") == "idefics3"
        if self.vision:
            from .idefics3 import teacher_geometry

            self.geometry, self.image_token_id = teacher_geometry(self.path, cfg), cfg.image_token_id
        eos = getattr(self.model.generation_config, "eos_token_id", None) or tok.eos_token_id
        self.eos_ids = sorted({int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None})
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    @property
    def hidden_size(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "text_config", cfg).hidden_size)

    def example(self, question: str, image: np.ndarray | None, answer: str | None = None, vocab=None) -> Example:
        """The teacher's input; ``vocab``: tokenize with this (the device's) instead of its own."""
        v = vocab or self.vocab
        r = self.chat.render(question.strip(), image is not None and self.vision)
        if image is not None and self.vision:
            lay = layout(v, self.geometry, r.text, image, self.image_token_id, r.add_special)
            ex = Example(lay.input_ids, lay.pixel_values)
        else:
            ex = Example(([v.bos_id] if r.add_special and v.add_bos else []) + v.tokenize(r.text))
        ex.answer_start = len(ex.input_ids)
        if answer is not None:
            ans = v.tokenize(" " + answer.strip()) + self.eos_ids[:1]
            ex.labels = [-100] * len(ex.input_ids) + ans
            ex.input_ids = ex.input_ids + ans
        return ex

    @torch.no_grad()
    def answer(self, images: Sequence[np.ndarray | None], questions: Sequence[str]) -> list[str]:
        """Greedy answers through HF ``generate()`` (the round's pseudo-labels)."""
        out = []
        for img, q in zip(images, questions):
            b = collate([self.example(q, img)], self.pad_id)
            g = self.model.generate(**b, max_new_tokens=self.max_new_tokens, do_sample=False,
                                    eos_token_id=self.eos_ids or None, pad_token_id=self.pad_id)
            ids = g[0, b["input_ids"].shape[1]:].tolist()
            ids = ids[:next((i for i, t in enumerate(ids) if t in self.eos_ids), len(ids))]
            out.append(self.tokenizer.decode(ids, skip_special_tokens=True).strip())
        return out

    def same_tokenizer(self, twin) -> bool:
        """True when the teacher's vocabulary is the device's, token for token (and image token):
        then their logits line up and full-vocabulary logit KD is meaningful.  The teacher is then
        fed the device's own token ids (``example(..., vocab=twin.vocab)``): llama.cpp's tokenizer
        can split text differently from HF's over the same vocabulary (measured on SPM-scored BPE
        vocabularies), and logit KD needs both models on identical sequences."""
        if self.tokenizer.get_vocab() != twin.tokenizer.get_vocab():
            return False
        return not self.vision or self.image_token_id == twin.meta.get("image_token_id")


def check_compatible(teacher: Teacher, needs_vision: bool) -> None:
    if needs_vision and not teacher.vision:
        raise FamilyError(f"{teacher.path}: a text-only teacher cannot label image questions; give an image-text model")
