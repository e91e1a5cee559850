"""LEGACY (deleted with TinyLlava at the default switch): the round on the hand-written TinyLlava.

One adaptation round on the cloud: the device's uplinked samples in, a DWC patch out.

load device twin (from its GGUF) -> teacher pseudo-labels -> AKD (LoRA, merged) -> Fisher ->
DWC patch -> apply to a scratch copy -> evaluate before / after / teacher -> register new version.
Each arrow is one function call; nothing is read back that an earlier step could pass on.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from device.contracts.image import decode_image
from device.contracts.wire import UplinkSample

from .akd_tinyllava import AKDConfig, DistillSet, distil, pseudo_label
from .dwc_tinyllava import DWCConfig, compress, fisher_diag, patched_twin
from .registry import ModelRegistry
from .zoo import build as zoo_build
from .zoo.data import Codec, Split
from .zoo.evaluate import evaluate
from .zoo.gguf_load import load_gguf_pair


@dataclass
class CloudAssets:
    """What the cloud brings to a round: the teacher, replay data and a held-out evaluation set."""

    teacher_path: Path
    replay: Split | None
    eval_set: Split | None

    @classmethod
    def embedded(cls, model_dir: Path, eval_n: int = 100, replay_n: int = 4000) -> "CloudAssets":
        import json

        man = json.loads((model_dir / "manifest.json").read_text())
        cfg = zoo_build.PRESETS.get(man["preset"], zoo_build.PRESETS["default"])
        cfg = zoo_build.BuildConfig(**{**cfg.__dict__, "eval_n": eval_n, "n_train": replay_n})
        return cls(model_dir / "teacher.pt", zoo_build.training_split(cfg, "student", None),
                   zoo_build.eval_split(cfg, None, seed_offset=2000))


def distill_set(samples: list[UplinkSample], image_size: int) -> DistillSet:
    """Decode the uplinked (UTS-masked) images; samples without pixels cannot be pseudo-labelled."""
    imgs, qs, unc = [], [], []
    for s in samples:
        if s.image is None:
            continue
        imgs.append(decode_image(bytes(s.image), image_size, f"sample {s.sample_id}"))
        qs.append(s.prompt)
        unc.append(list(s.tokens.positions))
    if not imgs:
        raise ValueError("no uplinked sample carries an image; nothing to distil")
    return DistillSet(np.stack(imgs), qs, [], unc)


def _acc(res: dict) -> dict:
    return {"vqa": res["vqa"], "caption_f1": res["caption_f1"],
            "domains": {d: {"vqa": v["vqa"], "caption_f1": v["caption_f1"]} for d, v in res["domains"].items()}}


def run_round(ctx, registry: ModelRegistry, assets: CloudAssets, akd: AKDConfig | None = None,
              threads: int = 2) -> dict:
    """The RoundRunner: see module docstring. ``ctx`` is a cloud.rounds.RoundContext."""
    torch.set_num_threads(threads)
    t0 = time.time()
    files = registry.get(ctx.base_model)
    if files is None:
        raise ValueError(f"the cloud has no copy of device model {ctx.base_model}; upload it first")
    ctx.progress("load", 0.02, "rebuilding the device model from its GGUF")
    twin, tok = load_gguf_pair(files["model"], files["mmproj"])
    codec = Codec(tok)
    teacher = zoo_build.load_pt(assets.teacher_path)
    samples = ctx.samples[: ctx.options.max_samples] if ctx.options.max_samples else ctx.samples
    dset = distill_set(samples, twin.cfg.vision.image_size)
    ctx.progress("label", 0.05, f"teacher labels {len(dset)} samples")
    dset.labels = pseudo_label(teacher, codec, dset.images, dset.questions)
    opts = ctx.options
    cfg = akd or AKDConfig()
    cfg = AKDConfig(**{**cfg.__dict__, "steps": opts.steps, "lr": opts.learning_rate, "seed": opts.seed})
    steps = cfg.steps

    def on_step(i, _terms):
        if i % 5 == 0:
            ctx.progress("distil", 0.05 + 0.7 * i / steps, f"step {i}/{steps}")

    merged, akd_stats = distil(twin, teacher, codec, dset, assets.replay, cfg, on_step, ctx.cancelled)
    ctx.progress("compress", 0.78, "ranking and re-quantizing weight updates")
    round_data = Split(dset.images, dset.questions, dset.labels, ["uplink"] * len(dset), ["qa"] * len(dset))
    fisher = fisher_diag(merged, codec, round_data, DWCConfig().fisher_batches)
    res = compress(merged, twin, files, ctx.patch_path, DWCConfig(budget_bytes=opts.downlink_budget_bytes),
                   ctx.round_id, "", fisher)  # parent_version = a device version id (unknown here)
    ctx.progress("evaluate", 0.88, "evaluating before / after / teacher")
    patched, pfiles, scratch = patched_twin(files, res.patch_path)
    try:
        new_id = registry.put(pfiles)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    metrics = {
        "samples": len(dset), "akd": akd_stats, "new_model": new_id,
        "dwc": {"patch_bytes": res.patch_bytes, "tensors_patched": res.tensors_patched,
                "rows_patched": res.rows_patched, "rows_unchanged_after_quant": res.rows_unchanged_after_quant,
                "importance_kept": res.selected_importance_frac, "full_fp16_delta_bytes": res.full_fp16_delta_bytes,
                "full_gguf_bytes": sum(p.stat().st_size for p in files.values()), "skipped": res.skipped},
    }
    if assets.eval_set is not None:
        metrics["accuracy"] = {"before": _acc(evaluate(twin, codec, assets.eval_set)),
                               "after": _acc(evaluate(patched, codec, assets.eval_set)),
                               "after_full_precision": _acc(evaluate(merged, codec, assets.eval_set)),
                               "teacher": _acc(evaluate(teacher, codec, assets.eval_set))}
    metrics["seconds"] = round(time.time() - t0, 2)
    ctx.progress("done", 1.0, "patch ready")
    return metrics


def make_runner(settings, model_dir=None):
    """The default RoundRunner: the embedded teacher + generated replay/eval data."""
    from device.contracts.config import DEFAULT_MODEL_DIR
    registry = ModelRegistry(settings.cloud_dir / "models")
    assets = CloudAssets.embedded(Path(model_dir or DEFAULT_MODEL_DIR))
    return lambda ctx: run_round(ctx, registry, assets)
