"""The interface every model family implements -- the only place that knows concrete model classes.

Why a seam: the cloud must train whatever pocket model the device runs.  akd, dwc, the round job
and bench ask a family five things and nothing else: rebuild the HF twin from the device's GGUF
pair (weights equal to the dequantized GGUF); say which GGUF tensor rows each HF parameter row
lands in (so DWC patches the right bytes); name the LoRA targets by part; turn (image, question
[, answer]) into model inputs exactly as the device lays them out; greedy-generate.  Adding a
family is adding one file that subclasses :class:`Family` and registers it (``families/__init__``).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

PARTS = ("language", "connector", "vision")  # the paper's language adapters, query adapters, and the encoder


@dataclass(frozen=True)
class RowMap:
    """GGUF tensor ``gguf_name`` (in file ``role``) = HF parameter ``hf_name``, rows reordered by
    ``row_order`` (GGUF row i holds HF row ``row_order[i]``; the Llama Q/K RoPE permutation) plus
    ``offset`` (Gemma stores norm weights as ``w + 1``).  Shapes are numpy order, as
    ``gguf.quants.dequantize(...).reshape(reversed(tensor.shape))`` gives them."""

    gguf_name: str
    role: str
    hf_name: str
    row_order: np.ndarray | None = None
    offset: float = 0.0

    def to_gguf(self, hf: np.ndarray, values: bool = True) -> np.ndarray:
        """HF-layout array -> GGUF layout.  ``values=False`` reorders only (for gradients, Fisher)."""
        out = hf if self.row_order is None else hf[self.row_order]
        return out + np.float32(self.offset) if values and self.offset else out


@dataclass
class Example:
    """One model input as the device sees it; ``labels`` is -100 except on answer tokens."""

    input_ids: list[int]
    pixel_values: np.ndarray | None = None  # [n_tiles, 3, S, S]
    labels: list[int] | None = None
    answer_start: int = 0  # index of the first answer token in input_ids (== len(prompt ids))


@dataclass
class Twin:
    """The cloud's copy of a device model: an HF ``nn.Module`` whose weights equal the GGUF's."""

    family: "Family"
    model: torch.nn.Module
    files: dict[str, Path]
    tokenizer: Any  # HF tokenizer, for decoding
    vocab: Any  # what tokenizes exactly like the device (llama.cpp's own vocabulary)
    meta: dict = field(default_factory=dict)  # family-specific: geometry, image token id, eos ids


class FamilyError(ValueError):
    """A model this family cannot rebuild; the message is one line naming what and why."""


class Family(ABC):
    name: ClassVar[str]
    architectures: ClassVar[tuple[str, ...]] = ()  # general.architecture of the text GGUF
    projector_types: ClassVar[tuple[str, ...]] = ()  # clip.projector_type of the mmproj; () = text-only

    @abstractmethod
    def load_twin(self, model_gguf: Path, mmproj_gguf: Path | None = None, parsed=None) -> Twin:
        """The HF twin with weights bit-equal to ``gguf.quants.dequantize`` of the device files.
        ``parsed``: those files' :class:`~cloud.families.DeviceFiles` when the caller already
        parsed them (a round does, once); the twin keeps its row maps in ``meta["row_maps"]``."""

    @abstractmethod
    def row_maps(self, twin: Twin) -> list[RowMap]:
        """Every GGUF tensor of the pair and the HF parameter (and rows) it comes from
        (``twin.meta["row_maps"]``, built with the twin, when it is there)."""

    @abstractmethod
    def lora_targets(self, model: torch.nn.Module, parts: Sequence[str] = PARTS) -> list[str]:
        """Full module names of the linear layers to adapt, for the requested parts."""

    @abstractmethod
    def example(self, twin: Twin, question: str, image: np.ndarray | None, answer: str | None = None) -> Example:
        """(image, question[, answer]) -> ids + pixels exactly as the device feeds its model."""

    def gguf_state(self, twin: Twin, model: torch.nn.Module | None = None) -> dict[str, tuple[str, np.ndarray]]:
        """``{gguf_name: (role, float32 array in GGUF layout)}`` of ``model`` (default: the twin)."""
        sd = (model or twin.model).state_dict()
        return {m.gguf_name: (m.role, m.to_gguf(sd[m.hf_name].detach().float().cpu().numpy()))
                for m in self.row_maps(twin)}

    def forward(self, model: torch.nn.Module, batch: dict) -> Any:
        """HF forward on a :func:`collate` batch; returns the HF output (``.logits``, hidden states)."""
        return model(**batch, output_hidden_states=True)

    @torch.no_grad()
    def generate(self, twin: Twin, ex: Example, max_new_tokens: int = 16, model: torch.nn.Module | None = None) -> list[int]:
        """Greedy answer ids (without the prompt), through HF ``generate()``."""
        m = model or twin.model
        b = collate([ex])
        b.pop("labels", None)
        eos = twin.meta.get("eos_ids") or None
        out = m.generate(**b, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                         pad_token_id=twin.meta.get("pad_id", 0))
        ids = out[0, b["input_ids"].shape[1]:].tolist()
        for i, t in enumerate(ids):
            if eos and t in eos:
                return ids[:i]
        return ids

    def decode(self, twin: Twin, ids: list[int]) -> str:
        return twin.tokenizer.decode(ids, skip_special_tokens=True).strip()


def collate(exs: Sequence[Example], pad_id: int = 0) -> dict:
    """Right-pad a list of examples into HF kwargs; images padded with all-zero tiles (HF drops them)."""
    n = max(len(e.input_ids) for e in exs)
    ids = torch.full((len(exs), n), pad_id, dtype=torch.long)
    att = torch.zeros((len(exs), n), dtype=torch.long)
    lab = torch.full((len(exs), n), -100, dtype=torch.long)
    for i, e in enumerate(exs):
        ids[i, :len(e.input_ids)] = torch.tensor(e.input_ids)
        att[i, :len(e.input_ids)] = 1
        if e.labels is not None:
            lab[i, :len(e.labels)] = torch.tensor(e.labels)
    out = {"input_ids": ids, "attention_mask": att}
    if any(e.labels is not None for e in exs):
        out["labels"] = lab
    if any(e.pixel_values is not None for e in exs):
        t = max(e.pixel_values.shape[0] for e in exs if e.pixel_values is not None)
        shape = next(e.pixel_values.shape[1:] for e in exs if e.pixel_values is not None)
        pix = torch.zeros((len(exs), t, *shape), dtype=torch.float32)
        for i, e in enumerate(exs):
            if e.pixel_values is not None:
                pix[i, :e.pixel_values.shape[0]] = torch.from_numpy(e.pixel_values)
        out["pixel_values"] = pix
    return out


def load_teacher(path: str | Path, dtype=torch.float32):
    """Any Hugging Face checkpoint dir (``save_pretrained`` layout) via the Auto classes:
    image-text-to-text first, causal LM otherwise.  Returns (model, tokenizer or processor's tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FamilyError(f"{path}: not a Hugging Face checkpoint (no config.json)")
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
    except (ValueError, KeyError):  # not an image-text model: a causal LM teacher
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.eval(), AutoTokenizer.from_pretrained(path)
