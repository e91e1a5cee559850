"""Samples -> Idefics3 model inputs laid out exactly as libmtmd lays them out on the device.

libmtmd's ``idefics3`` path (tools/mtmd/mtmd.cpp + mtmd-image.cpp), for a 32x32 image when the
mmproj's longest edge equals its tile size: one tile, then the overview (a same-size copy), as

    <fake_token_around_image><row_1_col_1> [tile x n] \\n\\n <fake_token_around_image><global-img>
    [overview x n] <fake_token_around_image>

spliced where the prompt has the media marker.  Training in this layout is what makes the shipped
GGUF answer on the device as the torch model does (the HF processor's layout differs).  The
family seam (cloud/families/idefics3.py) owns the general layout for any image size; this module
is the training-time batcher for the embedded default's fixed 32x32 case.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from device.contracts import prompt

from .hf_model import IMAGE_MEAN, IMAGE_STD

TILE_START = ("<fake_token_around_image>", "<row_1_col_1>")
OVERVIEW_START = ("\n\n", "<fake_token_around_image>", "<global-img>")
OVERVIEW_END = ("<fake_token_around_image>",)


@dataclass
class Layout:
    """Token ids of the fixed prompt pieces for one tokenizer and image-token count."""

    tok: object
    n_image: int  # LM tokens per image (tile and overview each)

    def __post_init__(self):
        t = self.tok
        ids = t.convert_tokens_to_ids
        self.bos, self.eos, self.pad = ids(t.bos_token), ids(t.eos_token), ids(t.pad_token)
        self.image_id = ids("<image>")
        block = (list(ids(list(TILE_START))) + [self.image_id] * self.n_image + list(ids(list(OVERVIEW_START)))
                 + [self.image_id] * self.n_image + list(ids(list(OVERVIEW_END))))
        self.prefix = [self.bos] + self._enc(prompt.PREFIX) + block
        cols = [i for i, x in enumerate(self.prefix) if x == self.image_id]
        self.image_cols = torch.tensor(cols)  # tile columns then overview columns
        self._cache: dict[str, list[int]] = {}

    def _enc(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def enc(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = self._cache[text] = self._enc(text)
        return ids

    def suffix(self, question: str) -> list[int]:
        return self.enc(prompt.suffix(question))

    def answer(self, answer: str) -> list[int]:
        return self.enc(prompt.answer_text(answer)) + [self.eos]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([i for i in ids if i not in (self.bos, self.eos, self.pad)]).strip()


def pixel_values(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> normalised float [B, 3, H, W], as libmtmd normalises with the mmproj's mean/std."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0).permute(0, 3, 1, 2)
    mean, std = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def image_features(model, images: np.ndarray) -> torch.Tensor:
    """[B, n, D] projected visual tokens of one 32x32 image each (the connector's output)."""
    out = model.get_image_features(pixel_values=pixel_values(images)[:, None], return_dict=True)
    return torch.stack(list(out.pooler_output))


def embed(model, lay: Layout, ids: torch.Tensor, images: np.ndarray | None) -> torch.Tensor:
    """Token embeddings with the image columns replaced by [tile features, overview features]."""
    emb = model.get_input_embeddings()(ids)
    if images is not None:
        f = image_features(model, images)
        emb = emb.clone()
        emb[:, lay.image_cols] = torch.cat([f, f], 1).to(emb.dtype)
    return emb


@dataclass
class Batch:
    ids: torch.Tensor  # [B, T] right-padded
    labels: torch.Tensor  # [B, T], -100 outside the answer
    mask: torch.Tensor  # [B, T]
    images: np.ndarray


def make_batch(lay: Layout, images: np.ndarray, questions: list[str], answers: list[str]) -> Batch:
    rows = [lay.prefix + lay.suffix(q) for q in questions]
    ans = [lay.answer(a) for a in answers]
    width = max(len(r) + len(a) for r, a in zip(rows, ans))
    ids = torch.full((len(rows), width), lay.pad, dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, a) in enumerate(zip(rows, ans)):
        n = len(r) + len(a)
        ids[i, :n] = torch.tensor(r + a)
        lab[i, len(r):n] = torch.tensor(a)
        mask[i, :n] = 1
    return Batch(ids, lab, mask, images)


def loss(model, lay: Layout, b: Batch) -> torch.Tensor:
    emb = embed(model, lay, b.ids, b.images)
    return model(inputs_embeds=emb, attention_mask=b.mask, labels=b.labels).loss
