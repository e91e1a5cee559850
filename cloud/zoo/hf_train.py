"""Supervised training of the default's HF Idefics3 models on a Split (answer tokens only), in
libmtmd's input layout, plain torch on CPU, with an optional curriculum.

Why a curriculum: the field notes found bigger tiny models stuck at the question-only baseline
when trained on all domains at once; learning the source first (clean images) and then the
augmented domains gets the teacher off that plateau.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .split import Split
from .hf_data import Layout, loss, make_batch


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


def _optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))


def train(model, lay: Layout, stages: list[tuple[Split, int]], cfg: TrainConfig,
          on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Train in place on ``stages`` = [(split, steps), ...] in order (one cosine schedule over all
    of them). Deterministic for a given seed and thread count; returns the loss per step."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    total = sum(n for _, n in stages)
    sched = TrainConfig(**{**cfg.__dict__, "steps": total})
    opt = _optimizer(model, cfg)
    model.train()
    losses, step = [], 0
    for split, n in stages:
        for _ in range(n):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, sched)
            idx = rng.integers(0, len(split), cfg.batch_size)
            b = make_batch(lay, split.images[idx], [split.questions[i] for i in idx], [split.answers[i] for i in idx])
            lv = loss(model, lay, b)
            opt.zero_grad(set_to_none=True)
            lv.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            losses.append(lv.item())
            if on_step:
                on_step(step, losses[-1])
            step += 1
    model.eval()
    return losses
