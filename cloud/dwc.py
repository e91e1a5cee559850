"""DWC -- Dynamic Weight update Compression: ship only the weight updates that matter, already
re-quantized to the device's own GGUF types, as a GGUF tensor patch.

1. The update of every device tensor is the merged (adapter-folded) weight minus the device's
   current dequantized weight; tensors the adapters did not touch have an exact zero update.
2. Importance of a row block is a second-order estimate of the loss the device would lose by not
   receiving it: sum(F * delta^2) with F the diagonal Fisher (squared gradients of the round's
   loss at the merged weights).  Without Fisher it falls back to the relative update norm
   ||delta|| / ||W||.  Blocks are whole rows (ggml quantizes along rows), so any selection is a
   contiguous byte range of the device file.
3. Selection is greedy by importance per byte under the byte budget -- a global ranking, so layers
   receive budget in proportion to how much their updates matter, not equal shares.
4. Re-quantization uses the device tensor's own type; rows whose re-quantized bytes equal the old
   bytes (an update smaller than the quantization step) are dropped, since they change nothing.

Rows are GGUF rows: the family's RowMaps put every HF parameter row where the converter put it
(Llama Q/K rows permuted, Gemma norms offset), so deltas, Fisher and patches all live in the
device file's own row order.
"""
from __future__ import annotations

import copy
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch

from device.contracts.patch_format import Patch, read_patch, row_nbytes
from device.contracts.wire import RoundOptions
from device.patch import clone_file, plan_patch, verify_written, write_placements

from . import ggml_quant
from .families import DeviceFiles, Twin, collate
from .patch_build import make_patch_from_arrays

ENTRY_OVERHEAD = 160  # JSON entry + tensor info bytes per patched range (measured, approximate)
FIT_TRIES = 8  # selections tried before a patch that overshoots its budget is an error


@dataclass
class DWCConfig:
    budget_bytes: int | None = RoundOptions.model_fields["downlink_budget_bytes"].default  # None = every changed row
    block_rows: int = 8
    fisher: bool = True
    fisher_batches: int = 6
    # cloud/dwc_refit.py: train the rows a budget patch carries, the rest frozen (0 = ship the cut).
    # Off by default: on the held-out rounds it lifted combo + rotate to +5.8 points but cost the
    # source 4 points and left noise + texture's interval across 0 (README, issue 12 findings)
    refit_steps: int = 0
    refit_lr: float = 1e-3
    refit_replay_fraction: float = 0.5  # share of each refit batch that is source replay (forgetting)


@dataclass
class Block:
    tensor: str  # "role:gguf_name"
    row_start: int
    row_count: int
    importance: float
    cost: int


@dataclass
class DWCResult:
    patch_path: Path | None
    patch_bytes: int
    tensors_patched: int
    rows_patched: int
    rows_unchanged_after_quant: int
    skipped: list[str]
    selected_importance_frac: float
    full_fp16_delta_bytes: int
    blocks_considered: int
    per_tensor: dict = field(default_factory=dict)
    rows: dict = field(default_factory=dict)  # {"role:gguf_name": [(row_start, row_count)]} shipped


def rank_blocks(updates, fisher, types, cfg: DWCConfig, old_weights) -> tuple[list[Block], list[str]]:
    blocks, skipped = [], []
    for g, (role, new, delta) in updates.items():
        qtype, shape = types[g]
        if not ggml_quant.supported(qtype):  # K-quants too (ggml's own quantizer); IQ types refused
            skipped.append(f"{g} ({qtype.name}: cdcca does not re-quantize this type; tensor not shipped)")
            continue
        d2 = delta.reshape(-1, shape[0]) ** 2
        if fisher is not None and g in fisher:
            row_imp = (fisher[g].reshape(-1, shape[0]) * d2).sum(1)
        else:
            w2 = old_weights[g].reshape(-1, shape[0]) ** 2
            row_imp = np.sqrt(d2.sum(1) / (w2.sum(1) + 1e-12))
        per_row = row_nbytes(qtype, shape)
        n = row_imp.shape[0]
        for s in range(0, n, cfg.block_rows):
            c = min(cfg.block_rows, n - s)
            blocks.append(Block(f"{role}:{g}", s, c, float(row_imp[s:s + c].sum()), c * per_row + ENTRY_OVERHEAD))
    return blocks, skipped


def select(blocks: list[Block], budget: int | None) -> list[Block]:
    """Greedy by importance per byte; skips a block that does not fit and keeps trying smaller ones."""
    order = sorted(blocks, key=lambda b: b.importance / b.cost, reverse=True)
    if budget is None:
        return [b for b in order if b.importance > 0]
    chosen, used = [], 0
    for b in order:
        if b.importance > 0 and used + b.cost <= budget:
            chosen.append(b)
            used += b.cost
    return chosen


def weight_updates(merged: torch.nn.Module, twin: Twin,
                   old: dict | None = None) -> dict[str, tuple[str, np.ndarray, np.ndarray]]:
    """{gguf_name: (role, new, delta)} in GGUF row order for every tensor whose weights changed.
    ``old``: the twin's own ``gguf_state`` when the caller has it already."""
    new, old = twin.family.gguf_state(twin, merged), old if old is not None else twin.family.gguf_state(twin)
    out = {}
    for g, (role, arr) in new.items():
        delta = arr - old[g][1]
        if np.count_nonzero(delta):
            out[g] = (role, arr, delta)
    return out


def fisher_diag(model: torch.nn.Module, twin: Twin, data, n_batches: int, batch_size: int = 32,
                seed: int = 0) -> dict[str, np.ndarray]:
    """Diagonal empirical Fisher (mean squared gradient of the answer CE) per GGUF tensor, in
    GGUF row order.  ``data``: the round's :class:`~cloud.families.Example` list (with labels)."""
    from .akd import _ce

    maps = twin.family.row_maps(twin)
    params = dict(model.named_parameters())
    acc = {m.hf_name: torch.zeros_like(params[m.hf_name]) for m in maps if m.hf_name in params}
    rng = np.random.default_rng(seed)
    model.train(False)
    for p in params.values():
        p.requires_grad_(True)
    for _ in range(n_batches):
        ex = [data[i] for i in rng.integers(0, len(data), min(batch_size, len(data)))]
        b = {k: v for k, v in collate(ex, twin.meta.get("pad_id", 0)).items() if k != "labels"}
        model.zero_grad(set_to_none=True)
        _ce(model(**b).logits, ex)[0].backward()
        for n in acc:
            if params[n].grad is not None:
                acc[n] += params[n].grad.detach() ** 2
    return {m.gguf_name: m.to_gguf((acc[m.hf_name] / n_batches).numpy(), values=False)
            for m in maps if m.hf_name in acc}


def _row_ranges(chosen: list[Block]) -> dict[str, list[tuple[int, int]]]:
    ranges: dict[str, list[tuple[int, int]]] = {}
    for b in sorted(chosen, key=lambda b: (b.tensor, b.row_start)):
        r = ranges.setdefault(b.tensor, [])
        if r and r[-1][0] + r[-1][1] == b.row_start:
            r[-1] = (r[-1][0], r[-1][1] + b.row_count)
        else:
            r.append((b.row_start, b.row_count))
    return ranges


def compress(merged: torch.nn.Module, twin: Twin, files: dict[str, Path] | DeviceFiles, out_path: Path,
             cfg: DWCConfig, round_id: str, parent_version: str = "", fisher: dict | None = None) -> DWCResult:
    """Write the patch that moves the device from ``twin`` toward ``merged`` within the budget.
    ``files``: the device's files, or (a round) their one parse, which the type table and the
    patch builder then share instead of opening the files again."""
    parsed = files if isinstance(files, DeviceFiles) else DeviceFiles.open(files)
    base_state = twin.family.gguf_state(twin)
    updates = weight_updates(merged, twin, base_state)
    types = parsed.types()
    old = {g: a for g, (_, a) in base_state.items() if g in updates}
    blocks, skipped = rank_blocks(updates, fisher, types, cfg, old)
    total_imp = sum(b.importance for b in blocks) or 1.0
    room = cfg.budget_bytes
    for _ in range(FIT_TRIES):  # the block costs are estimates: the patch file itself must fit the budget
        chosen = select(blocks, room)
        ranges = _row_ranges(chosen)
        new_tensors = {k: (updates[k.split(":", 1)[1]][1], v) for k, v in ranges.items()}
        build = make_patch_from_arrays({r: str(p) for r, p in parsed.paths.items()}, new_tensors, out_path,
                                       round_id=round_id, parent_version=parent_version, skip_unsupported=True,
                                       quantizer=ggml_quant.quantize, readers=parsed.readers)
        size = build.path.stat().st_size if build.path else 0
        if cfg.budget_bytes is None or size <= cfg.budget_bytes:
            break
        room -= size - cfg.budget_bytes + ENTRY_OVERHEAD  # over by this much: select again with less room
    else:
        raise RuntimeError(f"DWC: no patch under {cfg.budget_bytes} bytes after {FIT_TRIES} tries (last {size})")
    fp16 = sum(int(np.prod(u[2].shape)) * 2 for u in updates.values())
    per_tensor: dict[str, int] = {}
    for e in build.entries:
        per_tensor[e.tensor] = per_tensor.get(e.tensor, 0) + e.row_count
    return DWCResult(build.path, size, len(per_tensor),
                     sum(e.row_count for e in build.entries), build.unchanged_rows, skipped + list(build.skipped),
                     sum(b.importance for b in chosen) / total_imp, fp16, len(blocks), per_tensor, ranges)


def apply_patch(files: dict[str, Path], patch_path: Path | None, dest: Path) -> tuple[dict[str, Path], Patch | None]:
    """Clone the device files into ``dest`` (one copy each, a reflink where the filesystem can) and
    apply the patch through the device's own read / verify / write / re-verify path: the files
    are exactly what the device will run.  Returns ({role: patched file}, the verified patch).

    Why the device's path and not the bytes DWC just built: a patch the device would refuse
    (bad offsets, hashes, a format slip) must fail the round here, not on the laptop."""
    out = {}
    for role, p in files.items():
        out[role] = Path(dest) / Path(p).name
        clone_file(Path(p), out[role])
    if patch_path is None:
        return out, None
    patch = read_patch(patch_path)
    placements = plan_patch(patch, out)
    for role in {p.entry.role for p in placements}:
        write_placements(out[role], [p for p in placements if p.entry.role == role])
    verify_written(patch, placements, out)
    return out, patch


def apply_to_copy(files: dict[str, Path], patch_path: Path | None) -> tuple[dict[str, Path], Path]:
    """:func:`apply_patch` into a fresh scratch dir; returns (files, scratch) -- the caller removes it."""
    scratch = Path(tempfile.mkdtemp(prefix="cdcca-patched-"))
    try:
        return apply_patch(files, patch_path, scratch)[0], scratch
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def patched_twin(twin: Twin, patch: Patch | None, files: dict[str, Path]) -> Twin:
    """The twin of the patched ``files`` without reading them: a copy of ``twin`` whose rows named
    by the (verified) patch take its payload, dequantized and mapped back through the family's
    RowMaps (row order and offset inverted).  Equal, bit for bit, to ``load_twin`` of the patched
    files (tests/cloud/test_dwc.py), because a patch changes tensor bytes only -- never the
    header, the vocabulary or the layout -- and every other row already equals the base file.
    Why: rebuilding meant copying the files, parsing them, and transformers' GGUF loader again."""
    if patch is None:
        return Twin(twin.family, twin.model, dict(files), twin.tokenizer, twin.vocab, dict(twin.meta))
    maps = {(m.role, m.gguf_name): m for m in twin.family.row_maps(twin)}
    model = copy.deepcopy(twin.model)
    params = model.state_dict(keep_vars=True)  # keep_vars: the live parameters, tied names included
    with torch.no_grad():
        for e, payload in zip(patch.entries, patch.payloads):
            m = maps[(e.role, e.tensor)]
            rows = gguf.quants.dequantize(np.frombuffer(payload, np.uint8), e.ggml_type)
            rows = np.array(rows, dtype=np.float32).reshape(e.row_count, e.shape[0])  # a writable copy
            if m.offset:
                rows = rows - np.float32(m.offset)
            p = params[m.hf_name].data
            if m.row_order is None:
                p.view(-1, e.shape[0])[e.row_start:e.row_start + e.row_count] = torch.from_numpy(rows)
            else:
                p[torch.from_numpy(m.row_order[e.row_start:e.row_start + e.row_count])] = torch.from_numpy(rows)
    return Twin(twin.family, model.eval(), dict(files), twin.tokenizer, twin.vocab, dict(twin.meta))
