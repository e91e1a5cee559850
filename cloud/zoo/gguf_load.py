"""GGUF -> torch: rebuild the exact (dequantized) TinyLlava the device runs.

The cloud trains this twin, so after dequantization its weights equal llama.cpp's bit for bit.
The config comes from the standard ``llama.*`` / ``clip.vision.*`` keys and the tokenizer from
the GGUF's own vocabulary and merges, so any Llama-family GGUF with a LLaVA-style mlp mmproj of
this layout loads -- not only files cdcca wrote.
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from .gguf_names import tensor_map
from .model import TextConfig, TinyLlava, TinyLlavaConfig, VisionConfig


class GGUFLoadError(ValueError):
    pass


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    path = Path(path)
    if not path.is_file():
        raise GGUFLoadError(f"{path}: no such GGUF file")
    try:
        return gguf.GGUFReader(str(path), "r")
    except Exception as e:  # gguf-py raises ValueError/struct errors/IndexError on bad files
        raise GGUFLoadError(f"{path}: not a valid GGUF file ({type(e).__name__}: {e})") from None


def field(r: gguf.GGUFReader, key: str, default=None):
    f = r.get_field(key)
    if f is None:
        return default
    v = f.contents()
    return v


def dequantize(t) -> np.ndarray:
    """A reader tensor as float32 in numpy (torch) order."""
    arr = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
    return np.asarray(arr, dtype=np.float32).reshape(tuple(int(x) for x in reversed(t.shape)))


def config_from(text: gguf.GGUFReader, mmproj: gguf.GGUFReader, path: Path) -> TinyLlavaConfig:
    arch = field(text, "general.architecture")
    if arch != "llama":
        raise GGUFLoadError(f"{path}: architecture {arch!r} is not supported (need 'llama')")
    a = "llama."
    vocab = len(field(text, "tokenizer.ggml.tokens", []))
    tc = TextConfig(vocab_size=int(field(text, a + "vocab_size", vocab)), dim=int(field(text, a + "embedding_length")),
                    layers=int(field(text, a + "block_count")), heads=int(field(text, a + "attention.head_count")),
                    kv_heads=int(field(text, a + "attention.head_count_kv")), ffn=int(field(text, a + "feed_forward_length")),
                    eps=float(field(text, a + "attention.layer_norm_rms_epsilon")),
                    rope_theta=float(field(text, a + "rope.freq_base", 10000.0)), max_seq=int(field(text, a + "context_length")))
    v = "clip.vision."
    vc = VisionConfig(image_size=int(field(mmproj, v + "image_size")), patch_size=int(field(mmproj, v + "patch_size")),
                      dim=int(field(mmproj, v + "embedding_length")), layers=int(field(mmproj, v + "block_count")),
                      heads=int(field(mmproj, v + "attention.head_count")), mlp=int(field(mmproj, v + "feed_forward_length")),
                      eps=float(field(mmproj, v + "attention.layer_norm_epsilon")))
    return TinyLlavaConfig(vc, tc, tuple(field(mmproj, v + "image_mean")), tuple(field(mmproj, v + "image_std")),
                           bos_id=int(field(text, "tokenizer.ggml.bos_token_id")),
                           eos_id=int(field(text, "tokenizer.ggml.eos_token_id")),
                           pad_id=int(field(text, "tokenizer.ggml.padding_token_id", 0)))


def tokenizer_from(text: gguf.GGUFReader) -> Tokenizer:
    if field(text, "tokenizer.ggml.model") != "gpt2":
        raise GGUFLoadError("only byte-level BPE ('gpt2') GGUF tokenizers are supported")
    tokens = list(field(text, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in field(text, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    types = list(field(text, "tokenizer.ggml.token_type"))
    tok.add_special_tokens([t for t, ty in zip(tokens, types) if ty == gguf.TokenType.CONTROL])
    return tok


def load_gguf_pair(model_path: str | Path, mmproj_path: str | Path) -> tuple[TinyLlava, Tokenizer]:
    """The torch twin of a device model (dequantized weights) and its tokenizer."""
    model_path, mmproj_path = Path(model_path), Path(mmproj_path)
    text, mm = open_gguf(model_path), open_gguf(mmproj_path)
    if field(mm, "general.architecture") != "clip" or field(mm, "clip.projector_type") != "mlp":
        raise GGUFLoadError(f"{mmproj_path}: not an mmproj with an 'mlp' projector")
    cfg = config_from(text, mm, model_path)
    model = TinyLlava(cfg)
    tensors = {t.name: (model_path, t) for t in text.tensors} | {t.name: (mmproj_path, t) for t in mm.tensors}
    state = model.state_dict()
    for g, (_, tname) in tensor_map(cfg).items():
        if g not in tensors:
            raise GGUFLoadError(f"{tensors and model_path}: tensor {g!r} missing")
        arr = dequantize(tensors[g][1])
        if tuple(arr.shape) != tuple(state[tname].shape):
            raise GGUFLoadError(f"{tensors[g][0]}: tensor {g} has shape {arr.shape}, expected {tuple(state[tname].shape)}")
        state[tname] = torch.from_numpy(arr.copy())
    if cfg.text.dim != cfg.vision.dim and int(field(mm, "clip.vision.projection_dim", cfg.text.dim)) != cfg.text.dim:
        raise GGUFLoadError(f"{mmproj_path}: projection_dim does not match the text model's embedding size")
    model.load_state_dict(state)
    model.eval()
    return model, tokenizer_from(text)
