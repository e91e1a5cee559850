"""Idefics3 / SmolVLM: SigLIP-style vision tower + pixel-shuffle connector + Llama language model.

The device holds the official converter's pair: a ``llama`` text GGUF and an ``idefics3`` mmproj.
The twin is ``Idefics3ForConditionalGeneration`` with the language model from transformers' GGUF
loader (bit-exact, Q/K permutation undone) and the vision tower + connector read straight from the
mmproj by inverting gguf-py's own MMPROJ name table (no transposes: numpy order equals torch's).
Inputs always go through ``idefics3_layout`` (libmtmd's tiles and tokens), never HF's processor.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import gguf
import numpy as np
import torch

from . import register
from .base import PARTS, Example, Family, FamilyError, RowMap, Twin
from .device_files import DeviceFiles
from .idefics3_layout import IMAGE, Geometry, HFVocab, LlamaVocab, layout
from .llama import eos_ids, field, language_targets, load_causal_lm, text_row_maps, with_answer


def _dequantize(t) -> np.ndarray:
    arr = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
    return np.asarray(arr, dtype=np.float32).reshape(tuple(int(x) for x in reversed(t.shape)))


def _mmproj_names(model: torch.nn.Module, n_blocks: int) -> dict[str, str]:
    """{gguf mmproj tensor name: HF parameter name} for the vision tower and connector."""
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, n_blocks)
    out = {}
    for n in model.state_dict():
        if ".vision_model." in n or ".connector." in n:
            g = tmap.get_name(n, try_suffixes=(".weight", ".bias"))
            if g is None:
                raise FamilyError(f"HF parameter {n} has no mmproj tensor name")
            out[g] = n
    return out


def vision_config(mm: gguf.GGUFReader) -> dict:
    v = "clip.vision."
    return dict(hidden_size=int(field(mm, v + "embedding_length")), intermediate_size=int(field(mm, v + "feed_forward_length")),
                num_hidden_layers=int(field(mm, v + "block_count")), num_attention_heads=int(field(mm, v + "attention.head_count")),
                image_size=int(field(mm, v + "image_size")), patch_size=int(field(mm, v + "patch_size")),
                layer_norm_eps=float(field(mm, v + "attention.layer_norm_epsilon", 1e-6)),
                hidden_act="gelu_pytorch_tanh")  # clip.use_gelu: ggml's tanh-approximation GELU


@register
class Idefics3(Family):
    name = "idefics3"
    architectures = ("llama",)
    projector_types = ("idefics3",)

    def load_twin(self, model_gguf: Path, mmproj_gguf: Path | None = None, parsed=None) -> Twin:
        from transformers import Idefics3Config, Idefics3ForConditionalGeneration

        if mmproj_gguf is None:
            raise FamilyError(f"{Path(model_gguf).name}: the idefics3 family needs its mmproj")
        model_gguf, mmproj_gguf = Path(model_gguf), Path(mmproj_gguf)
        text, tok = load_causal_lm(model_gguf)
        if parsed is None:
            parsed = DeviceFiles.open({"model": model_gguf, "mmproj": mmproj_gguf})
        reader, mm = parsed.readers["model"], parsed.readers["mmproj"]
        vocab = LlamaVocab(str(model_gguf))
        img_id = vocab.lookup(IMAGE)
        geo = Geometry.from_mmproj(mm)
        tcfg = text.config.to_dict()
        tied = not any(t.name == "output.weight" for t in reader.tensors)
        cfg = Idefics3Config(vision_config=vision_config(mm), text_config=tcfg, scale_factor=geo.scale_factor,
                             image_token_id=img_id, tie_word_embeddings=tied)
        cfg.text_config.tie_word_embeddings = tied
        model = Idefics3ForConditionalGeneration(cfg).eval()
        model.model.text_model.load_state_dict(text.model.state_dict())
        with torch.no_grad():
            model.lm_head.weight.copy_(text.lm_head.weight)
            params = dict(model.named_parameters())
            names = _mmproj_names(model, cfg.vision_config.num_hidden_layers)
            for t in mm.tensors:
                if t.name not in names:
                    raise FamilyError(f"{mmproj_gguf.name}: tensor {t.name} has no place in an Idefics3 model")
                p, arr = params[names[t.name]], _dequantize(t)
                if tuple(p.shape) != arr.shape:
                    raise FamilyError(f"{mmproj_gguf.name}: {t.name} has shape {arr.shape}, the model needs {tuple(p.shape)}")
                p.copy_(torch.from_numpy(arr.copy()))
        meta = {"eos_ids": eos_ids(reader), "pad_id": int(field(reader, "tokenizer.ggml.padding_token_id", 0)),
                "chat_template": field(reader, "tokenizer.chat_template"), "geometry": geo, "image_token_id": img_id,
                "mmproj_names": names}
        twin = Twin(self, model, {"model": model_gguf, "mmproj": mmproj_gguf}, tok, vocab, meta)
        meta["row_maps"] = self._row_maps(twin, reader)
        return twin

    def row_maps(self, twin: Twin) -> list[RowMap]:
        if "row_maps" in twin.meta:
            return twin.meta["row_maps"]
        return self._row_maps(twin, gguf.GGUFReader(str(twin.files["model"]), "r"))

    def _row_maps(self, twin: Twin, reader: gguf.GGUFReader) -> list[RowMap]:
        maps = text_row_maps(reader, list(twin.model.state_dict()), twin.model.config.text_config, "model.text_model.")
        return maps + [RowMap(g, "mmproj", n) for g, n in twin.meta["mmproj_names"].items()]

    def lora_targets(self, model: torch.nn.Module, parts: Sequence[str] = PARTS) -> list[str]:
        out = language_targets(model, "model.text_model.") if "language" in parts else []
        if "connector" in parts:
            out += [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".connector." in n]
        if "vision" in parts:
            out += [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".vision_model." in n]
        return out

    def example(self, twin: Twin, question: str, image: np.ndarray | None, answer: str | None = None) -> Example:
        from .prompting import render

        r = render(twin, question, image is not None)
        lay = layout(twin.vocab, twin.meta["geometry"], r.text, image, twin.meta["image_token_id"], r.add_special)
        return with_answer(twin, Example(lay.input_ids, lay.pixel_values), answer)


def teacher_geometry(ckpt: Path, config) -> Geometry:
    """The layout geometry of an HF Idefics3 teacher checkpoint (its processor config, if saved)."""
    v = config.vision_config
    longest, mean, std = v.image_size, (0.5,) * 3, (0.5,) * 3
    for name in ("processor_config.json", "preprocessor_config.json"):
        p = Path(ckpt) / name
        if p.is_file():
            d = json.loads(p.read_text())
            d = d.get("image_processor", d)
            longest = int(d.get("size", {}).get("longest_edge", longest))
            mean, std = tuple(d.get("image_mean", mean)), tuple(d.get("image_std", std))
            break
    return Geometry(v.image_size, v.patch_size, config.scale_factor, longest, mean, std)


def teacher_vocab(tokenizer, add_bos: bool) -> HFVocab:
    return HFVocab(tokenizer, add_bos)
