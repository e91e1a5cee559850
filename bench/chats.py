"""The chat stream: generated images + questions answered by the REAL device (llama.cpp through
``ChatSession`` with a durable ``Queue`` in a private CDCCA_HOME), so UTS decides exactly as in the
product.  We keep each chat's ``ChatRecord`` too, so baselines and sweeps can re-pack the very same
chats differently (every chat, a random subset, another mask ratio) without re-running the model.
"""
from __future__ import annotations

import io
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from device.contracts.config import Settings, load_settings
from device.contracts.image import decode_image
from device.contracts.metrics import exact
from device.contracts.wire import UplinkSample
from device.models import DeviceModel, open_device_model
from device.queue import Queue
from device.session import ChatSession
from device.uts import ChatRecord, UTSConfig, select

DEVICE_QUANT = Settings.model_fields["device_quant"].default  # what the device installs by default
TARGETS = ("texture", "noise", "combo", "rotate")
DOMAINS = ("source",) + TARGETS


@dataclass
class Chat:
    domain: str
    task: str
    question: str
    truth: str
    answer: str
    kept: bool  # the product's UTS decision
    score: float
    entropy: float
    ood: float
    raw_bytes: int
    shipped_bytes: int
    record: ChatRecord = field(repr=False)

    @property
    def correct(self) -> bool:
        return bool(exact(self.answer, self.truth))


@dataclass
class ChatStream:
    seed: int
    chats: list[Chat]
    kept_samples: list[UplinkSample]  # the queue's pending rows, in queue order (what sync uploads)
    stats: object  # device.queue.QueueStats
    model_id: str
    seconds: float
    feature_stats: object = None  # the device model's source feature statistics (UTS OOD score)

    @property
    def kept_index(self) -> list[int]:
        return [i for i, c in enumerate(self.chats) if c.kept]

    def repack(self, index: Sequence[int], cfg: UTSConfig | None = None) -> list[UplinkSample]:
        """The chats at ``index`` packed by the UTS token stage under ``cfg``, with NO sample-stage
        selection (a baseline or sweep decides which chats; the packing is the product's)."""
        cfg = cfg or UTSConfig()
        out = []
        for i in index:
            d = select(self.chats[i].record, cfg, self.feature_stats, gate=KeepAll())
            if d.sample is None:
                raise RuntimeError(f"chat {i} could not be packed: {d.reason}")
            out.append(d.sample)
        return out

    def truths(self, samples: Sequence[UplinkSample]) -> list[str]:
        by_id = {sample_key(c.record): c.truth for c in self.chats}
        return [by_id[s.sample_id] for s in samples]


class KeepAll:
    """A sample-stage gate that keeps every chat: the 'no selection' baselines."""

    def __call__(self, entropy: float, ood: float | None, vocab_size: int | None = None) -> tuple[bool, float, str]:
        return True, max(entropy, ood or 0.0), "kept: no selection (baseline)"


def sample_key(rec: ChatRecord) -> str:
    from device.uts import sample_id_for

    return sample_id_for(rec.image_bytes, rec.prompt, rec.base_model)


def png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def run_chats(samples, home: Path | None = None, model: DeviceModel | None = None, threads: int = 1,
              uts: UTSConfig | None = None, seed: int = 0) -> ChatStream:
    """Answer every sample on the device; UTS queues what it keeps.  ``home`` is a fresh
    CDCCA_HOME (a temporary one by default), so nothing touches the user's data."""
    import time

    home = Path(home or tempfile.mkdtemp(prefix="cdcca-bench-chat-"))
    settings = load_settings(home=home)
    dm = model or open_device_model(settings, quant=DEVICE_QUANT)
    t0 = time.perf_counter()
    chats = []
    with Queue(settings.device_dir / "queue.sqlite") as q:
        sess = ChatSession.open(dm, threads, settings.n_ctx, q, uts)
        try:
            for s in samples:
                data = png_bytes(s.image)
                rgb = decode_image(data, sess.runtime.image_size, "generated")
                sess.tag = s.domain
                turn = sess.ask(s.question, image_data=(data, rgb))
                g = turn.generation
                rec = ChatRecord(s.question, g.text, g.token_ids, turn.tokens, sess.runtime.n_vocab, dm.id, data, rgb,
                                 sess.runtime.patch_size, g.visual_embeddings, s.domain)
                dec = turn.decision
                chats.append(Chat(s.domain, s.task, s.question, s.answer, turn.answer, turn.queued, dec.score,
                                  dec.entropy, dec.ood_score, dec.raw_bytes, dec.shipped_bytes, rec))
        finally:
            sess.close()
        kept = [r.sample() for r in q.pending()]
        stats = q.stats()
    return ChatStream(seed, chats, kept, stats, dm.id, time.perf_counter() - t0, dm.stats)
