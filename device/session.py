"""One chat turn on the device: image + question -> streamed answer with exact per-token
uncertainty -> UTS decision -> durable queue.  The CLI and the TUI both drive this; no UI code.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from device.contracts.image import decode_image, read_image_bytes
from device.models import DeviceModel
from device.queue import Queue
from device.runtime import Generation, Runtime, RuntimeConfig
from device.uncertainty import TokenUncertainty, UncertaintyRecorder
from device.uts import ChatRecord, SampleGate, UTSConfig, UTSDecision, select


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def looks_like_path(text: str) -> bool:
    """A question that is one word ending in an image suffix (or naming an existing file) was
    almost surely meant for the image field; answering it would waste a turn and queue garbage."""
    t = text.strip().strip("'\"")
    if not t or any(c.isspace() for c in t):
        return False
    return t.lower().endswith(IMAGE_SUFFIXES) or ("/" in t and Path(t).expanduser().is_file())


def check_question(question: str, has_vision: bool, has_image: bool) -> str:
    """Refuse, in one line and before any work, what a vision model cannot answer well: an empty
    question, an image path typed as the question, or a question without its image (the model
    would answer from the words alone and UTS would queue that answer for the cloud)."""
    q = question.strip()
    if not q:
        raise ValueError("empty question")
    if looks_like_path(q):
        raise ValueError(f"{q!r} looks like an image path, not a question: give it as the image "
                         "(--image PATH, /image PATH, or the image field)")
    if has_vision and not has_image:
        raise ValueError("this model answers questions about an image: give one first "
                         "(--image PATH, /image PATH, or the image field)")
    return q


@dataclass
class Turn:
    question: str
    answer: str
    pieces: list[str]
    tokens: list[TokenUncertainty]
    decision: UTSDecision | None
    queued: bool
    generation: Generation
    image_path: Path | None = None
    duplicate: bool = False  # UTS kept it, but the queue already held this image + question
    truncated: bool = False  # the answer hit max_tokens before the model ended it

    @property
    def mean_entropy(self) -> float:
        n = len(self.pieces)
        return float(np.mean([t.entropy for t in self.tokens[:n]])) if n else 0.0


@dataclass
class ChatSession:
    model: DeviceModel
    runtime: Runtime
    queue: Queue | None = None
    uts: UTSConfig = field(default_factory=UTSConfig)
    max_tokens: int = 16
    tag: str | None = None

    def __post_init__(self):
        self.gate = SampleGate(self.uts)
        if self.queue is not None:  # adaptive UTS continues its running quantile from earlier runs
            for h, o in self.queue.recent_scores(self.uts.window, self.model.lineage):
                self.gate(h, o)

    @classmethod
    def open(cls, model: DeviceModel, threads: int = 2, n_ctx: int = 512, queue: Queue | None = None,
             uts: UTSConfig | None = None, max_tokens: int = 16) -> "ChatSession":
        rt = Runtime(RuntimeConfig(model.model, model.mmproj, n_threads=threads, n_ctx=n_ctx))
        return cls(model, rt, queue, uts or UTSConfig(), max_tokens)

    def load_image(self, path: str | Path) -> tuple[bytes, np.ndarray]:
        """Read and validate an image BEFORE any work, so a bad file costs nothing."""
        if not self.runtime.has_vision:
            raise ValueError("this model has no mmproj (text-only); start it with --mmproj to ask about images")
        data = read_image_bytes(path)
        return data, decode_image(data, self.runtime.image_size, str(path))

    def ask(self, question: str, image: str | Path | None = None,
            on_token: Callable[[str, TokenUncertainty], None] | None = None,
            image_data: tuple[bytes, np.ndarray] | None = None) -> Turn:
        question = check_question(question, self.runtime.has_vision, image is not None or image_data is not None)
        img_bytes, rgb = image_data if image_data is not None else (self.load_image(image) if image else (None, None))
        rec = UncertaintyRecorder()
        cb = (lambda tok, piece: on_token(piece, rec.tokens[-1])) if on_token else None
        gen = self.runtime.generate(question, rgb, self.max_tokens, logits_hook=rec, on_token=cb)
        toks = list(rec.tokens)
        decision, queued, duplicate = None, False, False
        if self.queue is not None:
            chat = ChatRecord(question, gen.text, gen.token_ids, toks, self.runtime.n_vocab, self.model.id,
                              img_bytes, rgb, self.runtime.patch_size if rgb is not None else 8,
                              gen.visual_embeddings, self.tag)
            decision = select(chat, self.uts, self.model.stats, self.gate)
            ood = decision.ood_score if (self.model.stats is not None and gen.visual_embeddings is not None) else None
            self.queue.note_seen(decision.raw_bytes, decision.entropy, ood, self.model.lineage)
            if decision.kept and decision.sample is not None:
                # INSERT OR IGNORE: False when this image + question is already in the queue
                queued = self.queue.add(decision.sample, decision.shipped_bytes)
                duplicate = not queued
        observe = getattr(self.model, "observe", None)  # this model's OOD stats, learned from its first chats
        if observe is not None:
            observe(gen.visual_embeddings)
        truncated = getattr(gen, "truncated", None)
        if truncated is None:  # runtimes without the flag: a full-length answer counts as cut off
            truncated = len(gen.token_ids) >= self.max_tokens
        return Turn(question, gen.text, gen.pieces, toks, decision, queued, gen, Path(image) if image else None,
                    duplicate, bool(truncated))

    def reload(self, model: DeviceModel) -> float:
        self.model = model
        return self.runtime.reload(model.model, model.mmproj)

    def close(self) -> None:
        self.runtime.close()
