"""Supervised training of a TinyLlava on a Split (answer tokens only), plain torch on CPU."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .data import Codec, Split
from .model import TinyLlava, lm_loss


@dataclass
class TrainConfig:
    steps: int = 1500
    batch_size: int = 128
    lr: float = 2e-3
    min_lr_frac: float = 0.05
    warmup: int = 60
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def train(model: TinyLlava, split: Split, codec: Codec, cfg: TrainConfig,
          on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Train in place; returns the loss per step. Deterministic for a given seed and thread count."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    model.train()
    losses = []
    n_img = model.cfg.vision.n_patches
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        batch = split.batch(codec, rng.integers(0, len(split), cfg.batch_size))
        loss = lm_loss(model(batch), batch.full_labels(n_img))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(loss.item())
        if on_step:
            on_step(step, losses[-1])
    model.eval()
    return losses
