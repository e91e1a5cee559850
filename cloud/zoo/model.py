"""A tiny LLaVA in plain torch: ViT encoder -> MLP projector -> Llama decoder.

Every operation mirrors what llama.cpp computes for the exported GGUFs, so the torch twin and the
device agree to float precision: the ViT is llama.cpp's LLaVA CLIP graph (pre/post LayerNorm,
biased attention, tanh-GELU MLP because the mmproj sets ``clip.use_gelu``, no class token), the
projector is ``mm.0 -> gelu -> mm.2``, and the decoder is the ``llama`` architecture with RoPE in
llama.cpp's "normal" (adjacent-pair) layout -- so Q/K need no permutation on export or load.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class VisionConfig:
    image_size: int = 32
    patch_size: int = 8
    dim: int = 64
    layers: int = 2
    heads: int = 2
    mlp: int = 256
    eps: float = 1e-5

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class TextConfig:
    vocab_size: int = 384
    dim: int = 96
    layers: int = 2
    heads: int = 4
    kv_heads: int = 4
    ffn: int = 256
    eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq: int = 256


@dataclass
class TinyLlavaConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TinyLlavaConfig":
        return cls(VisionConfig(**d["vision"]), TextConfig(**d["text"]), tuple(d["image_mean"]),
                   tuple(d["image_std"]), d["bos_id"], d["eos_id"], d["pad_id"])


def gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")  # ggml_gelu (llama.cpp reads it from an fp16 table)


# ------------------------------------------------------------------ vision
class VisionBlock(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.heads = c.heads
        self.ln1, self.ln2 = nn.LayerNorm(c.dim, eps=c.eps), nn.LayerNorm(c.dim, eps=c.eps)
        self.q, self.k, self.v, self.o = (nn.Linear(c.dim, c.dim) for _ in range(4))
        self.up, self.down = nn.Linear(c.dim, c.mlp), nn.Linear(c.mlp, c.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        h = self.ln1(x)
        q, k, v = (p(h).view(B, N, self.heads, D // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D)
        x = x + self.o(a)
        return x + self.down(gelu(self.up(self.ln2(x))))


class VisionTower(nn.Module):
    def __init__(self, c: VisionConfig, text_dim: int):
        super().__init__()
        self.patch = nn.Conv2d(3, c.dim, c.patch_size, stride=c.patch_size)
        self.pos = nn.Parameter(torch.randn(c.n_patches, c.dim) * 0.02)
        self.pre_ln, self.post_ln = nn.LayerNorm(c.dim, eps=c.eps), nn.LayerNorm(c.dim, eps=c.eps)
        self.blocks = nn.ModuleList(VisionBlock(c) for _ in range(c.layers))
        self.mm0, self.mm2 = nn.Linear(c.dim, text_dim), nn.Linear(text_dim, text_dim)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch(pixels).flatten(2).transpose(1, 2) + self.pos  # [B, N, D], row-major patches
        x = self.pre_ln(x)
        for b in self.blocks:
            x = b(x)
        return self.post_ln(x)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Projected image embeddings [B, n_patches, text_dim] (what libmtmd feeds the decoder)."""
        return self.mm2(gelu(self.mm0(self.features(pixels))))


# ------------------------------------------------------------------ text
def rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """llama.cpp "normal" RoPE: rotate adjacent pairs (x[2i], x[2i+1]). x: [B, H, T, hd]."""
    hd = x.shape[-1]
    inv = theta ** (-torch.arange(0, hd, 2, dtype=torch.float32, device=x.device) / hd)
    ang = pos.float()[:, None] * inv[None, :]  # [T, hd/2]
    cos, sin = ang.cos(), ang.sin()
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), -1).flatten(-2)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class TextBlock(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        hd = c.dim // c.heads
        self.c, self.hd = c, hd
        self.attn_norm, self.ffn_norm = RMSNorm(c.dim, c.eps), RMSNorm(c.dim, c.eps)
        self.q_proj = nn.Linear(c.dim, c.heads * hd, bias=False)
        self.k_proj = nn.Linear(c.dim, c.kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(c.dim, c.kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(c.heads * hd, c.dim, bias=False)
        self.gate_proj = nn.Linear(c.dim, c.ffn, bias=False)
        self.up_proj = nn.Linear(c.dim, c.ffn, bias=False)
        self.down_proj = nn.Linear(c.ffn, c.dim, bias=False)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        c, hd = self.c, self.hd
        h = self.attn_norm(x)
        q = rope(self.q_proj(h).view(B, T, c.heads, hd).transpose(1, 2), pos, c.rope_theta)
        k = rope(self.k_proj(h).view(B, T, c.kv_heads, hd).transpose(1, 2), pos, c.rope_theta)
        v = self.v_proj(h).view(B, T, c.kv_heads, hd).transpose(1, 2)
        if c.kv_heads != c.heads:
            k, v = (t.repeat_interleave(c.heads // c.kv_heads, 1) for t in (k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, -1)
        x = x + self.o_proj(a)
        h = self.ffn_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class TextDecoder(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.embed = nn.Embedding(c.vocab_size, c.dim)
        self.layers = nn.ModuleList(TextBlock(c) for _ in range(c.layers))
        self.norm = RMSNorm(c.dim, c.eps)
        self.lm_head = nn.Linear(c.dim, c.vocab_size, bias=False)

    def forward(self, embeds: torch.Tensor, output_hidden: bool = False):
        pos = torch.arange(embeds.shape[1], device=embeds.device)
        x, hidden = embeds, []
        for layer in self.layers:
            x = layer(x, pos)
            hidden.append(x)
        logits = self.lm_head(self.norm(x))
        return (logits, hidden) if output_hidden else logits


class TinyLlava(nn.Module):
    def __init__(self, cfg: TinyLlavaConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTower(cfg.vision, cfg.text.dim)
        self.text = TextDecoder(cfg.text)
        self.register_buffer("mean", torch.tensor(cfg.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.image_std).view(1, 3, 1, 1), persistent=False)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def pixels(self, images_u8: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> normalised float [B, 3, H, W], exactly as libmtmd normalises."""
        x = images_u8.permute(0, 3, 1, 2).float() / 255.0
        return (x - self.mean) / self.std

    def image_embeds(self, images_u8: torch.Tensor) -> torch.Tensor:
        return self.vision(self.pixels(images_u8))

    def forward(self, batch: "Batch", output_hidden: bool = False):
        return self.text(self.embed(batch), output_hidden=output_hidden)

    def embed(self, batch: "Batch") -> torch.Tensor:
        """Sequence embeddings: prefix tokens, image embeddings (if any), then the text tokens."""
        pre = self.text.embed(batch.prefix_ids)
        parts = [pre]
        if batch.images is not None:
            parts.append(self.image_embeds(batch.images))
        parts.append(self.text.embed(batch.text_ids))
        return torch.cat(parts, 1)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


@dataclass
class Batch:
    """A right-padded batch in the shared prompt layout (see device.contracts.prompt).

    prefix_ids [B, Lp] is ``<bos>USER: `` (identical for all rows), images uint8 [B, H, W, 3] or None,
    text_ids [B, Lt] is suffix + answer + eos + padding, labels [B, Lt] (-100 = not trained).
    """

    prefix_ids: torch.Tensor
    images: torch.Tensor | None
    text_ids: torch.Tensor
    labels: torch.Tensor
    answer_start: torch.Tensor  # [B] index in text_ids of the first answer token

    def full_labels(self, n_image: int) -> torch.Tensor:
        """Labels aligned to the whole sequence and shifted for next-token prediction."""
        B = self.text_ids.shape[0]
        ignore = torch.full((B, self.prefix_ids.shape[1] + n_image), -100, dtype=torch.long)
        return torch.cat([ignore, self.labels], 1)

    def select(self, idx) -> "Batch":
        return Batch(self.prefix_ids[idx], None if self.images is None else self.images[idx],
                     self.text_ids[idx], self.labels[idx], self.answer_start[idx])


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy; ``labels`` aligned with the sequence (label at t predicted at t-1)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def n_image_tokens(model: TinyLlava, batch: Batch) -> int:
    return 0 if batch.images is None else model.cfg.vision.n_patches


def param_count_str(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"

