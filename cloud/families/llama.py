"""Text-only causal LMs that transformers' GGUF loader rebuilds: Llama (and SmolLM2), Gemma 3.

Why transformers' loader: it dequantizes with gguf-py (bit-exact), undoes the converter's Llama
Q/K RoPE permutation and Gemma's stored ``w + 1`` norms, and its tokenizer matches llama.cpp's.
What it does not give is the inverse -- which GGUF rows an HF row lands in -- and that is
:func:`text_row_maps`, shared with the Idefics3 family (its language model is one of these).
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Sequence

import gguf
import numpy as np
import torch

from . import register
from .base import PARTS, Example, Family, FamilyError, RowMap, Twin
from .idefics3_layout import LlamaVocab

PERMUTE_QK = {"llama": True, "gemma3": False}  # the converter permutes Q/K rows for llama's RoPE only
NORM_OFFSET = {"gemma3": 1.0}  # Gemma stores norm weights as w + 1
LANGUAGE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def field(reader: gguf.GGUFReader, key: str, default=None):
    f = reader.get_field(key)
    return default if f is None else f.contents()


def qk_rows(n_rows: int, n_head: int) -> np.ndarray:
    """GGUF row i of a permuted Q/K weight holds HF row ``qk_rows(...)[i]`` (the converter's
    ``reshape(n_head, 2, d/n_head/2).swapaxes(1, 2)`` applied to row indices)."""
    hd = n_rows // n_head
    return np.arange(n_rows).reshape(n_head, 2, hd // 2).swapaxes(1, 2).reshape(-1)


def text_row_maps(reader: gguf.GGUFReader, hf_names: Sequence[str], text_cfg, prefix: str = "") -> list[RowMap]:
    """RowMaps of every tensor in a text GGUF.  ``prefix`` is where the language model sits in the
    HF module tree (``model.text_model.`` for Idefics3); names are matched through gguf-py's own
    HF->GGUF table so every architecture it knows maps without a hand-written list."""
    arch = str(field(reader, "general.architecture"))
    n_blocks = int(field(reader, f"{arch}.block_count"))
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_blocks)
    by_gguf: dict[str, str] = {}
    for n in hf_names:
        key = n[len(prefix):] if prefix and n.startswith(prefix) else n
        if prefix and n.startswith(prefix):
            key = "model." + key
        elif prefix and n != "lm_head.weight":
            continue
        g = tmap.get_name(key, try_suffixes=(".weight", ".bias"))
        if g is not None:
            by_gguf.setdefault(g, n)
    out = []
    for t in reader.tensors:
        if t.name not in by_gguf:
            raise FamilyError(f"GGUF tensor {t.name} has no counterpart in the HF {arch} model")
        order = None
        if PERMUTE_QK.get(arch, False) and t.name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = text_cfg.num_attention_heads if "attn_q" in t.name else text_cfg.num_key_value_heads
            order = qk_rows(int(t.shape[-1]), heads)
        off = NORM_OFFSET.get(arch, 0.0) if t.name.endswith("norm.weight") else 0.0
        out.append(RowMap(t.name, "model", by_gguf[t.name], order, off))
    return out


def eos_ids(reader: gguf.GGUFReader) -> list[int]:
    ids = [field(reader, "tokenizer.ggml.eos_token_id"), field(reader, "tokenizer.ggml.eot_token_id")]
    return sorted({int(i) for i in ids if i is not None})


def load_causal_lm(model_gguf: Path):
    """(HF causal LM, HF tokenizer) through transformers' GGUF loader, float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_gguf = Path(model_gguf)
    try:
        # the GGUF loader draws its own tqdm bar on stderr on every load (a round loads the twin and
        # each patched twin); the round reports progress through RoundStatus, so it is swallowed
        with contextlib.redirect_stderr(io.StringIO()):
            model = AutoModelForCausalLM.from_pretrained(model_gguf.parent, gguf_file=model_gguf.name,
                                                         dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(model_gguf.parent, gguf_file=model_gguf.name)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise FamilyError(f"{model_gguf.name}: transformers' GGUF loader refused it ({str(e).splitlines()[0]})") from None
    return model.eval(), tok


def language_targets(model: torch.nn.Module, under: str = "") -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(under)
            and n.rsplit(".", 1)[-1] in LANGUAGE]


@register
class CausalLM(Family):
    """A text-only device model (no mmproj): the twin is the HF causal LM itself."""

    name = "causal-lm"
    architectures = ("llama", "gemma3")

    def load_twin(self, model_gguf: Path, mmproj_gguf: Path | None = None, parsed=None) -> Twin:
        if mmproj_gguf is not None:
            raise FamilyError(f"{Path(model_gguf).name}: text-only family given an mmproj")
        reader = parsed.readers["model"] if parsed is not None else gguf.GGUFReader(str(model_gguf), "r")
        model, tok = load_causal_lm(Path(model_gguf))
        meta = {"eos_ids": eos_ids(reader), "pad_id": int(field(reader, "tokenizer.ggml.padding_token_id", 0)),
                "chat_template": field(reader, "tokenizer.chat_template"), "arch": str(field(reader, "general.architecture"))}
        twin = Twin(self, model, {"model": Path(model_gguf)}, tok, LlamaVocab(str(model_gguf)), meta)
        meta["row_maps"] = text_row_maps(reader, list(model.state_dict()), model.config)
        return twin

    def row_maps(self, twin: Twin) -> list[RowMap]:
        if "row_maps" in twin.meta:
            return twin.meta["row_maps"]
        reader = gguf.GGUFReader(str(twin.files["model"]), "r")
        return text_row_maps(reader, list(twin.model.state_dict()), twin.model.config)

    def lora_targets(self, model: torch.nn.Module, parts: Sequence[str] = PARTS) -> list[str]:
        return language_targets(model) if "language" in parts else []

    def example(self, twin: Twin, question: str, image: np.ndarray | None, answer: str | None = None) -> Example:
        if image is not None:
            raise FamilyError("a text-only model was given an image")
        from .prompting import render

        r = render(twin, question, False)
        ids = ([twin.vocab.bos_id] if r.add_special and twin.vocab.add_bos else []) + twin.vocab.tokenize(r.text)
        return with_answer(twin, Example(ids), answer)


def with_answer(twin: Twin, ex: Example, answer: str | None) -> Example:
    """Append the answer the way the device would generate it: its tokens, then end-of-turn."""
    ex.answer_start = len(ex.input_ids)
    if answer is None:
        return ex
    ans = twin.vocab.tokenize(" " + answer.strip()) + twin.meta["eos_ids"][:1]
    ex.labels = [-100] * len(ex.input_ids) + ans
    ex.input_ids = ex.input_ids + ans
    return ex
