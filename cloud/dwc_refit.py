"""DWC refit: re-fit the rows the downlink budget can carry, with every other row held at the device's.

Why: AKD's merged update is dense (LoRA touches every row of its targets), and a 48 KiB patch
carries only a few hundred of the device's rows, so the device gets a truncated update, which on
the embedded default kept a fraction of the every-row gain.  Here the rows DWC selected start from
the merged update and are trained on, while every row outside the selection stays frozen at the
device's weights; the loss is the round's (CE on the teacher's answers + source replay), so the
selected rows learn to make up for the rows that are not shipped.  The patch then ships exactly the
model that was trained, not a cut of it.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .akd import _ce
from .dwc import DWCConfig, DWCResult, compress
from .families import DeviceFiles, Example, Twin, collate


STEPS = 100  # what a refit runs when asked for (DWCConfig.refit_steps; the benchmark's refit row)


def row_masks(twin: Twin, chosen_rows: dict[str, list[tuple[int, int]]], types) -> dict[str, torch.Tensor]:
    """{HF parameter name: 0/1 mask in HF layout} of the GGUF rows DWC selected
    (``chosen_rows``: ``{"role:gguf_name": [(row_start, row_count), ...]}``)."""
    params = dict(twin.model.named_parameters())
    out = {}
    by_name = {k.split(":", 1)[1]: v for k, v in chosen_rows.items()}
    for m in twin.family.row_maps(twin):
        if m.gguf_name not in by_name or m.hf_name not in params:
            continue
        p = params[m.hf_name]
        ne0 = types[m.gguf_name][1][0]
        g = np.zeros(p.numel() // ne0, np.float32)
        for s, c in by_name[m.gguf_name]:
            g[s:s + c] = 1.0
        g = np.repeat(g[:, None], ne0, 1).reshape(p.shape)  # GGUF layout (rows reordered)
        if m.row_order is not None:
            g = g[np.argsort(m.row_order)]
        out[m.hf_name] = torch.from_numpy(np.ascontiguousarray(g))
    return out


def refit(twin: Twin, merged: torch.nn.Module, masks: dict[str, torch.Tensor], data: Sequence[Example],
          replay: Sequence[Example], steps: int, lr: float, seed: int = 0, batch_size: int = 48,
          replay_fraction: float = 0.5) -> torch.nn.Module:
    """The twin with the masked rows set to ``merged``'s and trained ``steps`` more; the rest frozen."""
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 7])
    model = copy.deepcopy(twin.model)
    base, new = dict(model.named_parameters()), dict(merged.named_parameters())
    train = []
    with torch.no_grad():
        for n, p in base.items():
            p.requires_grad_(n in masks)
            if n in masks:
                mk = masks[n].to(p.dtype)
                p.copy_(p * (1 - mk) + new[n].detach().to(p.dtype) * mk)
                p.register_hook(lambda g, mk=mk: g * mk)
                train.append(p)
    if not train or steps <= 0:
        return model.eval()
    opt = torch.optim.AdamW(train, lr=lr, weight_decay=0.0)
    pad = twin.meta.get("pad_id", 0)
    n_rep = int(round(batch_size * replay_fraction)) if replay else 0
    n_new = max(1, min(batch_size - n_rep, len(data)))
    model.train()
    for _ in range(steps):
        ex = [data[i] for i in rng.integers(0, len(data), n_new)]
        b = {k: v for k, v in collate(ex, pad).items() if k != "labels"}
        loss = _ce(model(**b).logits, ex)[0]
        if n_rep:
            rex = [replay[i] for i in rng.integers(0, len(replay), n_rep)]
            rb = {k: v for k, v in collate(rex, pad).items() if k != "labels"}
            loss = loss + _ce(model(**rb).logits, rex)[0] * n_rep / n_new
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()  # AdamW's step is zero where the gradient was masked to zero (no weight decay)
    for p in train:
        p.requires_grad_(False)
    return model.eval()


def compress_refit(merged: torch.nn.Module, twin: Twin, parsed: DeviceFiles, out_path: Path, cfg: DWCConfig,
                   round_id: str, fisher: dict | None, data: Sequence[Example], replay: Sequence[Example],
                   seed: int = 0) -> tuple[DWCResult, torch.nn.Module]:
    """DWC's patch of ``merged``; then, with ``cfg.refit_steps``, the rows it chose refit and the
    patch rebuilt from the refit model (the same rows, so the same budget).  Returns the patch and
    the model it carries."""
    res = compress(merged, twin, parsed, out_path, cfg, round_id, "", fisher)
    if not cfg.refit_steps or res.patch_path is None or cfg.budget_bytes is None:
        return res, merged
    masks = row_masks(twin, res.rows, parsed.types())
    model = refit(twin, merged, masks, data, replay, cfg.refit_steps, cfg.refit_lr, seed,
                  replay_fraction=cfg.refit_replay_fraction)
    return compress(model, twin, parsed, out_path, cfg, round_id, "", fisher), model
