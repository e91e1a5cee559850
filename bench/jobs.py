"""The compute-heavy work (teacher labels, AKD, Fisher, DWC, torch evaluation, continual rounds)
as independent jobs on a pool of spawned processes, one torch thread each: on a 2-core machine
two single-threaded workers beat one two-threaded process (torch's thread pool spins against
other load), and every job is seeded, so results do not depend on scheduling."""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .pool import JobPool

_W: dict = {}


def summarize_eval(res: dict) -> dict:
    return {"vqa": res["vqa"], "caption_f1": res["caption_f1"],
            "domains": {d: {"vqa": v["vqa"], "caption_f1": v["caption_f1"]} for d, v in res["domains"].items()}}


def init_worker(model_dir: str, eval_n: int, replay_n: int, threads: int = 1) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from cloud.round_job import CloudAssets
    from cloud.zoo.build import load_pt
    from cloud.zoo.data import Codec
    from cloud.zoo.gguf_load import load_gguf_pair
    from device.models import bundled_files

    from .chats import DEVICE_QUANT

    torch.set_num_threads(threads)
    model_dir = Path(model_dir)
    m, p = bundled_files(DEVICE_QUANT, model_dir)
    twin, tok = load_gguf_pair(m, p)
    _W.update(model_dir=model_dir, files={"model": m, "mmproj": p}, twin=twin, codec=Codec(tok),
              teacher=load_pt(model_dir / "teacher.pt"),
              assets=CloudAssets.embedded(model_dir, eval_n=eval_n, replay_n=replay_n), threads=threads)


def run_job(spec: dict) -> dict:
    t0 = time.perf_counter()
    out = {"base_eval": _base_eval, "distil": _distil, "continual": _continual}[spec["kind"]](spec)
    out["name"] = spec["name"]
    out["seconds"] = time.perf_counter() - t0
    return out


def _evaluate(model) -> dict:
    from cloud.zoo.evaluate import evaluate

    return summarize_eval(evaluate(model, _W["codec"], _W["assets"].eval_set))


def _base_eval(spec: dict) -> dict:
    return {"student": _evaluate(_W["twin"]), "teacher": _evaluate(_W["teacher"])}


def _distil(spec: dict) -> dict:
    """Teacher pseudo-labels -> AKD -> merged eval; optionally DWC at several budgets (each patch
    applied to a scratch copy of the device files and evaluated) and the LoRA-adapter downlink."""
    from cloud.akd import AKDConfig, DistillSet, distil, pseudo_label
    from cloud.dwc import DWCConfig, fisher_diag, weight_updates
    from cloud.zoo.data import Split

    twin, teacher, codec, assets = _W["twin"], _W["teacher"], _W["codec"], _W["assets"]
    images, qs = spec["images"], spec["questions"]
    dset = DistillSet(images, qs, [], spec["uncertain"])
    dset.labels = pseudo_label(teacher, codec, images, qs)
    cfg = AKDConfig(**spec["akd"])
    t = time.perf_counter()
    merged, stats = distil(twin, teacher, codec, dset, assets.replay, cfg)
    out = {"labels": dset.labels, "akd": stats, "distil_seconds": time.perf_counter() - t,
           "merged": _evaluate(merged), "n_samples": len(dset)}
    ups = weight_updates(merged, twin)
    out["fp16_delta_bytes"] = int(sum(u[2].size * 2 for u in ups.values()))
    patch_dir = Path(spec.get("patch_dir") or ".")
    if spec.get("delta_blob"):
        with open(patch_dir / f"{spec['name']}-fp16-delta.bin", "wb") as f:
            for g in sorted(ups):
                f.write(ups[g][2].astype(np.float16).tobytes())
        out["delta_blob"] = str(patch_dir / f"{spec['name']}-fp16-delta.bin")
    budgets = spec.get("dwc_budgets") or []
    if budgets or spec.get("lora"):
        n = len(dset)
        fisher = fisher_diag(merged, codec, Split(images, qs, dset.labels, ["uplink"] * n, ["qa"] * n),
                             DWCConfig().fisher_batches)
        out["dwc"] = {_bkey(b): _dwc(spec["name"], merged, b, fisher, patch_dir) for b in budgets}
        if spec.get("lora"):
            out["lora"] = _lora(spec, merged, cfg.lora_rank, fisher, patch_dir)
    return out


def _bkey(budget: int | None) -> str:
    return "unlimited" if budget is None else str(int(budget))


def _dwc(name: str, merged, budget: int | None, fisher: dict, patch_dir: Path) -> dict:
    from cloud.dwc import DWCConfig, compress, patched_twin

    twin, files = _W["twin"], _W["files"]
    path = patch_dir / f"{name}-dwc-{_bkey(budget)}.gguf"
    t = time.perf_counter()
    res = compress(merged, twin, files, path, DWCConfig(budget_bytes=budget), round_id=f"bench-{name}", fisher=fisher)
    secs = time.perf_counter() - t
    patched, _files, scratch = patched_twin(files, res.patch_path)
    try:
        acc = _evaluate(patched)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"patch_bytes": res.patch_bytes, "path": str(res.patch_path) if res.patch_path else None,
            "rows_patched": res.rows_patched, "tensors_patched": res.tensors_patched,
            "rows_unchanged_after_quant": res.rows_unchanged_after_quant,
            "importance_kept": res.selected_importance_frac, "compress_seconds": secs, "acc": acc}


def _lora(spec: dict, merged, rank: int, fisher: dict, patch_dir: Path) -> dict:
    """Adapter (text) alone, and adapter + a DWC patch of the mmproj update; llama.cpp loads the
    adapter through the device runtime and must agree with the torch model of the same weights."""
    from cloud.dwc import DWCConfig, compress, patched_twin

    from .lora import apply_factors, lora_factors, with_vision_from, write_adapter

    twin, files = _W["twin"], _W["files"]
    name = spec["name"]
    factors = lora_factors(merged, twin, rank)
    adapter = patch_dir / f"{name}-lora-r{rank}-f16.gguf"
    adapter_bytes = write_adapter(adapter, factors)
    out = {"adapter_bytes": adapter_bytes, "adapter_path": str(adapter), "rank": rank, "tensors": len(factors),
           "max_svd_residual": max((f[2] for f in factors.values()), default=0.0)}
    out["text_only"] = {"acc": _evaluate(apply_factors(twin, factors)), "bytes": adapter_bytes}
    out["with_mmproj_patch"] = {}
    checked = False
    for mm_budget in spec.get("lora_mm_budgets") or [None]:
        key = _bkey(mm_budget)
        mm_path = patch_dir / f"{name}-lora-mmproj-{key}.gguf"
        res = compress(with_vision_from(twin, merged), twin, files, mm_path, DWCConfig(budget_bytes=mm_budget),
                       round_id=f"bench-{name}-mm", fisher=fisher)
        patched, pfiles, scratch = patched_twin(files, res.patch_path)
        try:
            both = apply_factors(patched, factors)
            out["with_mmproj_patch"][key] = {"acc": _evaluate(both), "bytes": adapter_bytes + res.patch_bytes,
                                             "mmproj_patch_bytes": res.patch_bytes}
            if not checked:  # llama.cpp must load the adapter and agree with torch on the same weights
                out["llama_check"] = _llama_check(both, adapter, files["model"], pfiles["mmproj"], spec)
                out["llama_check"]["mmproj_budget"] = key
                checked = True
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return out


def _llama_check(both, adapter: Path, model: Path, mmproj: Path, spec: dict) -> dict:
    import torch

    from cloud.zoo.data import make_batch
    from cloud.zoo.evaluate import generate
    from device.contracts.metrics import exact
    from device.runtime import RuntimeConfig

    from .lora import LoraRuntime

    codec, ev = _W["codec"], _W["assets"].eval_set
    n = min(len(ev), int(spec.get("lora_check_n", 100)))
    torch_answers = generate(both, codec, ev.images[:n], ev.questions[:n])
    dev, base, diffs = [], [], []
    for lp, sink in ((adapter, dev), (None, base)):
        with LoraRuntime(RuntimeConfig(model, mmproj, n_threads=_W["threads"], kv_cache="f32"), lp) as rt:
            for i in range(n):
                sink.append(rt.generate(ev.questions[i], ev.images[i]).text)
            for i in range(min(n, 5) if lp is not None else 0):
                rt.prefill(ev.questions[i], ev.images[i])
                dl = np.array(rt.logits(), copy=True)
                with torch.no_grad():
                    tl = both.text(both.embed(make_batch(codec, ev.images[i:i + 1], [ev.questions[i]], None)))[0, -1]
                diffs.append(float(np.abs(dl - tl.numpy()).max()))
    vqa = [i for i in range(n) if ev.tasks[i] != "caption"]
    score = lambda answers: float(np.mean([exact(answers[i], ev.answers[i]) for i in vqa])) if vqa else 0.0
    return {"prompts": n, "agree_with_torch": float(np.mean([a == b for a, b in zip(dev, torch_answers)])) if n else 0.0,
            "answers_changed_vs_base": float(np.mean([a != b for a, b in zip(dev, base)])) if n else 0.0,
            "device_vqa_with_adapter": score(dev), "device_vqa_without_adapter": score(base),
            "max_logit_diff_vs_torch": max(diffs) if diffs else 0.0}


@dataclass
class _Ctx:
    """What ``run_round`` reads from a cloud.rounds.RoundContext (as the tests fake it)."""

    round_id: str
    base_model: str
    samples: list
    options: object
    patch_path: Path
    work_dir: Path
    log: list = field(default_factory=list)

    def progress(self, stage: str, fraction: float, message: str = "") -> None:
        self.log.append((stage, fraction))

    def cancelled(self) -> bool:
        return False


def _continual(spec: dict) -> dict:
    """Rounds with domain shifts arriving in sequence: each round the device (llama.cpp, current
    version) answers fresh chats of that round's domain plus some source chats, UTS keeps what it
    keeps (one queue for the whole run, as on a real device), and ``run_round`` -- the cloud's
    own round job -- distils, patches and evaluates (torch, on the patched weights)."""
    from cloud.registry import ModelRegistry
    from cloud.round_job import run_round
    from device.contracts.wire import RoundOptions
    from device.models import DeviceModel
    from device.queue import Queue

    from .chats import generate_samples, run_chats

    work = Path(spec["work_dir"])
    registry = ModelRegistry(work / "registry")
    mid = registry.put(_W["files"])
    stats = None
    rounds = []
    for r, domain in enumerate(spec["domains"]):
        f = registry.get(mid)
        from device.contracts.feature_stats import FEATURE_STATS_FILE, FeatureStats

        sp = _W["model_dir"] / FEATURE_STATS_FILE
        stats = stats or (FeatureStats.load(sp) if sp.is_file() else None)
        dm = DeviceModel(f["model"], f["mmproj"], mid, stats, None, None)
        n = spec["chats"]
        seed = spec["seed"] + 100 * (r + 1)
        chat_samples = generate_samples((domain,), n, seed, seed) + generate_samples(("source",), max(1, n // 4), seed, seed)
        order = np.random.default_rng(seed).permutation(len(chat_samples))
        stream = run_chats([chat_samples[i] for i in order], home=work / "device", model=dm, threads=_W["threads"])
        with Queue(work / "device" / "device" / "queue.sqlite") as q:  # the sync would acknowledge them
            q.mark_acknowledged([s.sample_id for s in stream.kept_samples])
        opts = RoundOptions(steps=spec["steps"], seed=spec["seed"], max_samples=None)
        ctx = _Ctx(f"continual-{r}", mid, stream.kept_samples, opts, work / f"round{r}.gguf", work)
        m = run_round(ctx, registry, _W["assets"], threads=_W["threads"])
        kept = {}
        for c in stream.chats:
            kept[c.domain] = kept.get(c.domain, 0) + int(c.kept)
        rounds.append({"domain": domain, "chats": len(stream.chats), "kept": kept, "samples": m["samples"],
                       "accuracy": m["accuracy"], "patch_bytes": m["dwc"]["patch_bytes"], "seconds": m["seconds"],
                       "device_correct_before": float(np.mean([c.correct for c in stream.chats]))})
        mid = m["new_model"]
    return {"rounds": rounds}


def Runner(model_dir: Path, eval_n: int, replay_n: int, workers: int = 2) -> JobPool:
    """``with Runner(...) as r: results = r.run(jobs)``: this module's jobs on the shared pool."""
    return JobPool(init_worker, run_job, (str(model_dir), eval_n, replay_n, 1), workers)
