"""Export a TinyLlava to llama.cpp: a ``llama`` text GGUF (with tokenizer and chat template) and a
CLIP ``mmproj`` GGUF (projector type ``mlp``), written with gguf-py's GGUFWriter.

Quantized text types go through ``gguf.quants.quantize`` -- the same code the cloud's DWC uses to
re-quantize patches, so device bytes and cloud bytes agree exactly.  1-D tensors (norms, biases)
stay F32 as llama.cpp expects; the mmproj is F32 or F16.
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from tokenizers import Tokenizer

from device.contracts.prompt import CHAT_TEMPLATE, SPECIAL_TOKENS

from .gguf_names import tensor_map
from .model import TinyLlava

QTYPES = {
    "f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0, "q5_0": gguf.GGMLQuantizationType.Q5_0,
    "q4_1": gguf.GGMLQuantizationType.Q4_1, "q4_0": gguf.GGMLQuantizationType.Q4_0,
}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
              "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}


def _add(w: gguf.GGUFWriter, name: str, arr: np.ndarray, qtype: str) -> None:
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    t = QTYPES[qtype]
    block = gguf.GGML_QUANT_SIZES[t][0]
    if arr.ndim < 2 or arr.shape[-1] % block or name == "v.position_embd.weight":
        t = gguf.GGMLQuantizationType.F32  # norms, biases, rows that do not fill whole blocks
    if name == "v.patch_embd.weight" and t not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        t = gguf.GGMLQuantizationType.F16  # the conv kernel must be F16/F32
    if t == gguf.GGMLQuantizationType.F32:
        w.add_tensor(name, arr)
    elif t == gguf.GGMLQuantizationType.F16:
        w.add_tensor(name, arr.astype(np.float16))
    else:
        w.add_tensor(name, gguf.quants.quantize(arr, t), raw_dtype=t)


def _tokenizer_kv(w: gguf.GGUFWriter, tok: Tokenizer, pad: int, bos: int, eos: int) -> None:
    vocab = tok.get_vocab()
    tokens = [None] * len(vocab)
    for s, i in vocab.items():
        tokens[i] = s
    spec = json.loads(tok.to_str())
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    types = [gguf.TokenType.CONTROL if t in SPECIAL_TOKENS else gguf.TokenType.NORMAL for t in tokens]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    w.add_pad_token_id(pad)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)


def _state(model: TinyLlava) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()}


def export_text(model: TinyLlava, tok: Tokenizer, path: Path, qtype: str = "f32", name: str = "cdcca-student") -> Path:
    c = model.cfg
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_context_length(c.text.max_seq)
    w.add_embedding_length(c.text.dim)
    w.add_block_count(c.text.layers)
    w.add_feed_forward_length(c.text.ffn)
    w.add_head_count(c.text.heads)
    w.add_head_count_kv(c.text.kv_heads)
    w.add_rope_dimension_count(c.text.dim // c.text.heads)
    w.add_rope_freq_base(c.text.rope_theta)
    w.add_layer_norm_rms_eps(c.text.eps)
    w.add_vocab_size(c.text.vocab_size)
    w.add_file_type(FILE_TYPES[qtype])
    w.add_string("cdcca.model_config", json.dumps(c.to_dict()))
    _tokenizer_kv(w, tok, c.pad_id, c.bos_id, c.eos_id)
    state = _state(model)
    for g, (role, t) in tensor_map(c).items():
        if role == "model":
            _add(w, g, state[t], qtype)
    _finish(w)
    return path


def export_mmproj(model: TinyLlava, path: Path, qtype: str = "f32") -> Path:
    if qtype not in ("f32", "f16"):
        raise ValueError("the mmproj is exported as f32 or f16")
    v = model.cfg.vision
    w = gguf.GGUFWriter(str(path), "clip")
    w.add_name("cdcca-student-mmproj")
    w.add_file_type(FILE_TYPES[qtype])
    w.add_string("clip.projector_type", "mlp")  # gguf-py's projector enum has no "mlp" entry
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_text_encoder", False)
    w.add_bool("clip.has_llava_projector", True)
    w.add_bool("clip.use_gelu", True)
    w.add_uint32("clip.vision.image_size", v.image_size)
    w.add_uint32("clip.vision.patch_size", v.patch_size)
    w.add_uint32("clip.vision.embedding_length", v.dim)
    w.add_uint32("clip.vision.feed_forward_length", v.mlp)
    w.add_uint32("clip.vision.projection_dim", model.cfg.text.dim)
    w.add_uint32("clip.vision.attention.head_count", v.heads)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", v.eps)
    w.add_uint32("clip.vision.block_count", v.layers)
    # run every encoder block (llama.cpp's LLaVA default would stop one block early)
    w.add_array("clip.vision.feature_layer", [v.layers])
    w.add_array("clip.vision.image_mean", list(model.cfg.image_mean))
    w.add_array("clip.vision.image_std", list(model.cfg.image_std))
    state = _state(model)
    for g, (role, t) in tensor_map(model.cfg).items():
        if role == "mmproj":
            _add(w, g, state[t], qtype)
    _finish(w)
    return path


def _finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
