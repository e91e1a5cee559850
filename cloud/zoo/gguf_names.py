"""The one map between TinyLlava parameter names and GGUF tensor names.

Returns ``{gguf_name: (file_role, torch_name)}`` where ``file_role`` is ``"model"`` (the llama
text GGUF) or ``"mmproj"`` (the CLIP/projector GGUF). Export and load both use it.
"""
from __future__ import annotations

from .model import TinyLlavaConfig


def tensor_map(cfg: TinyLlavaConfig) -> dict[str, tuple[str, str]]:
    m: dict[str, tuple[str, str]] = {
        "token_embd.weight": ("model", "text.embed.weight"),
        "output_norm.weight": ("model", "text.norm.weight"),
        "output.weight": ("model", "text.lm_head.weight"),
    }
    for i in range(cfg.text.layers):
        t, b = f"text.layers.{i}", f"blk.{i}"
        for g, p in (("attn_norm", "attn_norm"), ("ffn_norm", "ffn_norm"), ("attn_q", "q_proj"), ("attn_k", "k_proj"),
                     ("attn_v", "v_proj"), ("attn_output", "o_proj"), ("ffn_gate", "gate_proj"),
                     ("ffn_up", "up_proj"), ("ffn_down", "down_proj")):
            m[f"{b}.{g}.weight"] = ("model", f"{t}.{p}.weight")
    v = "vision"
    m.update({
        "v.patch_embd.weight": ("mmproj", f"{v}.patch.weight"), "v.patch_embd.bias": ("mmproj", f"{v}.patch.bias"),
        "v.position_embd.weight": ("mmproj", f"{v}.pos"),
        "mm.0.weight": ("mmproj", f"{v}.mm0.weight"), "mm.0.bias": ("mmproj", f"{v}.mm0.bias"),
        "mm.2.weight": ("mmproj", f"{v}.mm2.weight"), "mm.2.bias": ("mmproj", f"{v}.mm2.bias"),
    })
    for ln in ("pre_ln", "post_ln"):
        for wb in ("weight", "bias"):
            m[f"v.{ln}.{wb}"] = ("mmproj", f"{v}.{ln}.{wb}")
    for i in range(cfg.vision.layers):
        t, b = f"{v}.blocks.{i}", f"v.blk.{i}"
        for g, p in (("attn_q", "q"), ("attn_k", "k"), ("attn_v", "v"), ("attn_out", "o"), ("ln1", "ln1"),
                     ("ln2", "ln2"), ("ffn_up", "up"), ("ffn_down", "down")):
            for wb in ("weight", "bias"):
                m[f"{b}.{g}.{wb}"] = ("mmproj", f"{t}.{p}.{wb}")
    return m
