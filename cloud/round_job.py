"""One adaptation round on the cloud: the device's uplinked samples in, a DWC patch out.

family rebuilds the HF twin from the device GGUF -> HF teacher pseudo-labels -> AKD (LoRA on the
family's targets, merged) -> Fisher -> DWC patch -> apply to a copy written where the new version
will be registered (the device's own verification path) -> device-measured evaluation (llama.cpp)
before / after + twin fidelity, one load per version -> register the new version (a rename).  Each
arrow is one function call; nothing is read back that an earlier step could pass on: each device
file is parsed once (``DeviceFiles``), and the patched twin is the base twin with the verified
patch rows written in, not a reload.  The cloud is *given* its data: the teacher is an HF
checkpoint dir, replay and evaluation sets are LLaVA-JSON files (``cdcca cloud serve --teacher
--replay --eval``); the embedded default is one such build folder (assets/default).
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from device.contracts.dataset import QA, read_llava
from device.contracts.image import decode_image, load_image
from device.contracts.wire import UplinkSample

from .akd import AKDConfig, DistillSet, ReplaySet
from .dwc import DWCConfig, apply_patch, fisher_diag, patched_twin
from .dwc_refit import compress_refit
from .families import DeviceFiles, FamilyError, Twin, family_of
from .families.teacher import Teacher, check_compatible
from .fidelity import fidelity
from .launch import LaunchOptions, train
from . import twin_eval
from .registry import ModelRegistry


@dataclass
class HFAssets:
    """What the cloud brings to a round on the family seam: an HF teacher checkpoint, and the
    replay / evaluation sets as LLaVA-JSON files (None = no replay / no evaluation)."""

    teacher_dir: Path
    replay_path: Path | None = None
    eval_path: Path | None = None
    eval_limit: int | None = 100  # records read from the eval file (device-measured: each is a llama.cpp chat)
    replay_limit: int | None = 2000
    probe_n: int = 16  # fidelity probes

    def __post_init__(self):
        self._teacher: Teacher | None = None

    @classmethod
    def embedded(cls, model_dir: Path) -> "HFAssets":
        """An HF default build folder (``cdcca models build --hf``): ``teacher/`` and the data files
        its manifest names (``data/replay.json``, ``data/eval.json``)."""
        import json

        data = json.loads((model_dir / "manifest.json").read_text()).get("data", {})
        path = lambda k: (model_dir / data[k]) if k in data and (model_dir / data[k]).is_file() else None  # noqa: E731
        return cls(model_dir / "teacher", path("replay"), path("eval"))

    def teacher(self) -> Teacher:
        if self._teacher is None:
            self._teacher = Teacher(self.teacher_dir)
        return self._teacher


def _image_size(twin: Twin) -> int | None:
    geo = twin.meta.get("geometry")
    return geo.image_size if geo is not None else None


def distill_set(samples: list[UplinkSample], image_size: int | None) -> DistillSet:
    """Decode the uplinked (UTS-masked) images exactly as the device resized them."""
    imgs, qs, unc = [], [], []
    for s in samples:
        if image_size is not None and s.image is None:
            continue  # a vision model's sample without pixels cannot be pseudo-labelled
        imgs.append(decode_image(bytes(s.image), image_size, f"sample {s.sample_id}") if image_size else None)
        qs.append(s.prompt)
        unc.append(list(s.tokens.positions))
    if not qs:
        raise ValueError("no uplinked sample carries an image; nothing to distil")
    if image_size is not None:
        imgs = np.stack(imgs)
    return DistillSet(imgs, qs, [], unc)


def _images(qas: list[QA], image_size: int | None) -> list[np.ndarray | None]:
    return [load_image(q.image, image_size) if (q.image is not None and image_size) else None for q in qas]


def read_replay(path: Path | None, image_size: int | None, limit: int | None) -> ReplaySet | None:
    if path is None:
        return None
    qas = read_llava(path)[:limit]
    return ReplaySet(_images(qas, image_size), [q.question for q in qas], [q.answer for q in qas])


def _on_device(twin: Twin, files: dict[str, Path], probes, qas: list[QA], threads: int) -> tuple[dict, dict | None]:
    """(twin fidelity, device-measured accuracy or None) of ``files`` on ONE llama.cpp load:
    both run the device's default configuration, and every generation starts from cleared memory."""
    from device.evaluate import evaluate
    from device.runtime import Runtime, RuntimeConfig

    with Runtime(RuntimeConfig(Path(files["model"]), files.get("mmproj"), n_threads=threads)) as rt:
        fid = _fid(fidelity(twin, files, probes, runtime=rt))
        res = evaluate(rt, qas) if qas else None
    return fid, res and {"vqa": res["vqa"], "domains": res["domains"]}


def spread(qas: list, limit: int | None) -> list:
    """The first ``limit`` records taken round-robin across domains (``meta["domain"]``).

    Why: eval files are usually sorted by domain, so a plain ``[:limit]`` measured only the first
    domain (source) and a round's before/after figure said nothing about the drifted ones."""
    if limit is None or limit >= len(qas):
        return list(qas)
    groups: dict[str, list] = {}
    for qa in qas:
        groups.setdefault(str(qa.meta.get("domain", "")), []).append(qa)
    out, i = [], 0
    while len(out) < limit:
        for g in groups.values():
            if i < len(g) and len(out) < limit:
                out.append(g[i])
        i += 1
    return out


def run_round(ctx, registry: ModelRegistry, assets, akd: AKDConfig | None = None, threads: int = 2,
              launch: LaunchOptions | None = None) -> dict:
    """The RoundRunner: see module docstring. ``ctx`` is a cloud.rounds.RoundContext; ``launch``
    says whether AKD trains in this process or under ``accelerate launch`` (cloud/launch.py)."""
    files = registry.get(ctx.base_model)
    if files is None:
        raise ValueError(f"the cloud has no copy of device model {ctx.base_model}; upload it first")
    torch.set_num_threads(threads)
    t0 = time.time()
    ctx.progress("load", 0.02, "rebuilding the device model from its GGUF")
    parsed = DeviceFiles.open(files)  # each device file parsed once; every step below shares the parse
    fam = family_of(parsed)
    twin = fam.load_twin(files["model"], files.get("mmproj"), parsed=parsed)
    teacher = assets.teacher()
    size = _image_size(twin)
    check_compatible(teacher, size is not None)
    samples = ctx.samples[: ctx.options.max_samples] if ctx.options.max_samples else ctx.samples
    dset = distill_set(samples, size)
    ctx.progress("label", 0.05, f"teacher labels {len(dset)} samples")
    dset.labels = teacher.answer(dset.images, dset.questions)
    opts = ctx.options
    cfg = akd or AKDConfig()
    cfg = AKDConfig(**{**cfg.__dict__, "steps": opts.steps, "lr": opts.learning_rate, "seed": opts.seed})

    def on_step(i, _terms):  # i counts from 0: report steps done, every 5th and the last
        done = i + 1
        if done % 5 == 0 or done == cfg.steps:
            ctx.progress("distil", 0.05 + 0.7 * done / cfg.steps, f"step {done}/{cfg.steps}")

    replay = read_replay(assets.replay_path, size, assets.replay_limit)
    merged, akd_stats = train(twin, files, teacher, dset, replay, cfg, on_step, ctx.cancelled, ctx.work_dir,
                              launch, threads)
    ctx.progress("compress", 0.78, "ranking, refitting and re-quantizing weight updates")
    round_ex = [fam.example(twin, q, im, a) for im, q, a in zip(dset.images, dset.questions, dset.labels)]
    dcfg = DWCConfig(budget_bytes=opts.downlink_budget_bytes)
    fisher = fisher_diag(merged, twin, round_ex, dcfg.fisher_batches) if dcfg.fisher else None
    # parent_version would name a device version id, which the cloud does not know; the patch's
    # base tensor hashes bind it to the exact bytes it was built for
    rex = [fam.example(twin, q, im, a) for im, q, a in zip(replay.images, replay.questions, replay.answers)] \
        if replay is not None and dcfg.refit_steps else []
    res, _shipped = compress_refit(merged, twin, parsed, ctx.patch_path, dcfg, ctx.round_id, fisher, round_ex, rex,
                                 opts.seed)
    ctx.progress("evaluate", 0.88, "device-measured evaluation before / after, twin fidelity")
    # the new version is written once, where it will be registered; no patch = the base itself
    draft = registry.draft() if res.patch_path is not None else None
    try:
        pfiles, patch = apply_patch(files, res.patch_path, draft) if draft else (files, None)
        patched = patched_twin(twin, patch, pfiles)
        eval_qas = spread(read_llava(assets.eval_path), assets.eval_limit) if assets.eval_path else []
        probes = [(im, q.question) for im, q in zip(_images(eval_qas[:assets.probe_n], size), eval_qas)] or \
            [(dset.images[i], dset.questions[i]) for i in range(min(assets.probe_n, len(dset)))]
        metrics = {
            "samples": len(dset), "family": fam.name, "teacher": str(assets.teacher_dir), "akd": akd_stats,
            "dwc": {"patch_file_bytes": res.patch_bytes, "tensors_patched": res.tensors_patched,
                    "rows_patched": res.rows_patched, "rows_unchanged_after_quant": res.rows_unchanged_after_quant,
                    "importance_kept": res.selected_importance_frac, "full_fp16_delta_bytes": res.full_fp16_delta_bytes,
                    "full_gguf_bytes": sum(p.stat().st_size for p in files.values()), "skipped": res.skipped},
        }
        fid_base, before = _on_device(twin, files, probes, eval_qas, threads)
        # no patch: the same bytes, already measured
        fid_new, after = _on_device(patched, pfiles, probes, eval_qas, threads) if patch else (fid_base, before)
        metrics["fidelity"] = {"base": fid_base, "patched": fid_new}
        if eval_qas:
            ev_imgs = _images(eval_qas, size)

            def merged_answer(im, q):
                return fam.decode(twin, fam.generate(twin, fam.example(twin, q, im), model=merged))

            metrics["accuracy"] = {"before": before, "after": after, "measured_on": "device",
                                   "after_full_precision": twin_eval.evaluate(merged_answer, ev_imgs, eval_qas),
                                   "teacher": twin_eval.score(teacher.answer(ev_imgs, [q.question for q in eval_qas]),
                                                              eval_qas)}
        metrics["new_model"] = registry.adopt(draft, pfiles) if draft else ctx.base_model
        draft = None
    finally:
        if draft is not None:  # the round failed or was cancelled: its new version goes
            shutil.rmtree(draft, ignore_errors=True)
    metrics["seconds"] = round(time.time() - t0, 2)
    ctx.progress("done", 1.0, "patch ready")
    return metrics


def _fid(f: dict) -> dict:
    return {k: f[k] for k in ("n", "greedy_agreement", "max_logit_gap")}


def make_runner(settings, model_dir=None, teacher: Path | None = None, replay: Path | None = None,
                eval_set: Path | None = None):
    """The RoundRunner.  With ``teacher`` (an HF checkpoint dir): the family seam with the given
    replay / eval files.  Without: the embedded default build folder (``model_dir``, default
    assets/default: its ``teacher/`` and the ``data/`` files its manifest names)."""
    from device.contracts.config import DEFAULT_MODEL_DIR

    from .zoo.hf_assets import is_build_folder

    registry = ModelRegistry.from_settings(settings)  # the API's registry: same folder, same blob URL
    launch = LaunchOptions.from_settings(settings)
    akd = AKDConfig(kd=settings.akd_kd, feat=settings.akd_feature)
    if teacher is not None:
        if not (Path(teacher) / "config.json").is_file():
            raise FamilyError(f"--teacher {teacher}: not a Hugging Face checkpoint dir (no config.json)")
        for p in (replay, eval_set):
            if p is not None:
                read_llava(p)  # a malformed file fails here, in one line, not in the first round
        assets = HFAssets(Path(teacher), Path(replay) if replay else None, Path(eval_set) if eval_set else None)
        return lambda ctx: run_round(ctx, registry, assets, akd=akd, launch=launch)
    model_dir = Path(model_dir or DEFAULT_MODEL_DIR)
    if not is_build_folder(model_dir):
        raise FamilyError(f"{model_dir}: not a cdcca build folder (no teacher/config.json + manifest.json); "
                          "pass --teacher DIR or run `cdcca models build`")
    assets = HFAssets.embedded(model_dir)
    return lambda ctx: run_round(ctx, registry, assets, akd=akd, launch=launch)

