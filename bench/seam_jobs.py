"""The benchmark's chat streams and training jobs on the family seam (an HF build folder such as
the shipped assets/default), per docs/bench/README.md "Benchmark design (fixed before tuning)".

Every accuracy is measured on the device: llama.cpp on the GGUF pair the row would ship (the
trained update written into a copy of the device files by DWC and the device's own patch path;
"unlimited" = every changed row, re-quantized to the device's type), scored per question so two
rows can be compared *paired*.  The teacher is an HF checkpoint, never a device model: its row is
torch-measured (it is an upper bound, not a product number).
"""
from __future__ import annotations

import itertools
import os
import shutil
import time
from pathlib import Path

import numpy as np

from cloud.dwc_refit import STEPS as REFIT_STEPS

from .pool import JobPool
from .chats import DEVICE_QUANT, TARGETS

PAIRS = tuple(itertools.combinations(TARGETS, 2))  # the two drifted domains of a round
CHAT_SEED_BASE = 5000  # scenes: student/teacher training use build seed + 0..7, eval + 1000, replay + 4000
FULL_FT_SEED = 6000  # the capacity ceiling's ground-truth training scenes

_W: dict = {}


def drifted_pair(seed: int) -> tuple[str, str]:
    """Seed s drifts the (s-1)-th pair: the seeds cycle through the pairs, none chosen by hand."""
    return PAIRS[(seed - 1) % len(PAIRS)]


def chat_seed(seed: int) -> int:
    return CHAT_SEED_BASE + seed


def stream_samples(kind: str, seed: int, n: int, drifted: tuple[str, ...] | None = None):
    """``n`` generated chats of one stream (cloud.zoo.streams, the demo's and e2e test's too):
    ``drift`` = 70 % source + 30 % split over the drifted domains (default: the seed's pair);
    ``all-target`` = every chat from them."""
    from cloud.zoo.streams import DRIFT_SOURCE_FRACTION, drift_stream

    return drift_stream(n, drifted or drifted_pair(seed), chat_seed(seed),
                        DRIFT_SOURCE_FRACTION if kind == "drift" else 0.0, 0 if kind == "drift" else 50)


def device_model(model_dir: Path):
    """The shipped device pair of the build as a DeviceModel (its own feature statistics for UTS)."""
    from device.contracts.feature_stats import FEATURE_STATS_FILE, FeatureStats
    from device.contracts.model_id import model_id
    from device.models import DeviceModel, bundled_files

    m, p = bundled_files(DEVICE_QUANT, Path(model_dir))
    sp = Path(model_dir) / FEATURE_STATS_FILE
    return DeviceModel(m, p, model_id({"model": m, "mmproj": p}), FeatureStats.load(sp) if sp.is_file() else None,
                       None, None)


def equal_bytes_index(sizes: list[int], budget: int, seed: int) -> list[int]:
    """Random chats (seeded) added while the uplink stays within ``budget`` bytes: the random
    baseline ships as many bytes as UTS did, not as many samples."""
    order = np.random.default_rng(10_000 + seed).permutation(len(sizes))
    out, used = [], 0
    for i in order:
        if used + sizes[i] <= budget:
            out.append(int(i))
            used += sizes[i]
    return sorted(out)


# ---------------------------------------------------------------- worker side
def eval_set(path: Path, per_domain: int | None):
    """The build's held-out eval file, VQA records only (captions are not in the drifted mean),
    the first ``per_domain`` of each domain."""
    from device.contracts.dataset import read_llava

    seen: dict[str, int] = {}
    out = []
    for q in read_llava(path):
        d = str(q.meta.get("domain"))
        if q.meta.get("task") != "caption" and seen.get(d, 0) < (per_domain or 10 ** 9):
            out.append(q)
            seen[d] = seen.get(d, 0) + 1
    return out


def init_worker(model_dir: str, eval_n: int, replay_n: int, threads: int = 1) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from cloud.families import family_for
    from cloud.round_job import HFAssets, read_replay
    from device.models import bundled_files

    torch.set_num_threads(threads)
    m, p = bundled_files(DEVICE_QUANT, Path(model_dir))
    files = {"model": m, "mmproj": p}
    fam = family_for(m, p)
    twin = fam.load_twin(m, p)
    assets = HFAssets.embedded(Path(model_dir))
    size = twin.meta["geometry"].image_size
    qas = eval_set(assets.eval_path, eval_n)
    from device.contracts.image import load_image

    _W.update(model_dir=Path(model_dir), assets=assets, files=files, fam=fam, twin=twin, teacher=assets.teacher(), size=size, threads=threads, qas=qas,
              images=[load_image(q.image, size) for q in qas], replay=read_replay(assets.replay_path, size, replay_n))


def device_correct(files: dict[str, Path]) -> list[float]:
    """Per-question exact match of llama.cpp on ``files`` (device.evaluate, the product's scorer)."""
    from device.contracts.metrics import exact
    from device.evaluate import evaluate
    from device.runtime import Runtime, RuntimeConfig

    qas = _W["qas"]
    with Runtime(RuntimeConfig(Path(files["model"]), files.get("mmproj"), n_threads=_W["threads"])) as rt:
        answers = evaluate(rt, qas)["answers"]
    return [exact(a, q.answer) for a, q in zip(answers, qas)]


def _base(spec: dict) -> dict:
    from device.contracts.metrics import exact

    qas = _W["qas"]
    t_ans = _W["teacher"].answer(_W["images"], [q.question for q in qas])
    return {"student": device_correct(_W["files"]), "teacher": [exact(a, q.answer) for a, q in zip(t_ans, qas)],
            "domains": [str(q.meta.get("domain")) for q in qas],
            "gguf_pair_bytes": sum(Path(p).stat().st_size for p in _W["files"].values())}


def _train(spec: dict) -> dict:
    """Labels (teacher answers, or ground truth for the oracle) -> AKD on the seam -> for each
    downlink budget a DWC patch applied to a copy of the device files -> device-measured accuracy."""
    from cloud.akd import AKDConfig, distil_twin
    from cloud.dwc import DWCConfig, fisher_diag
    from cloud.round_job import distill_set
    from device.contracts.metrics import exact

    fam, twin, teacher, files = _W["fam"], _W["twin"], _W["teacher"], _W["files"]
    dset = distill_set(spec["samples"], _W["size"])
    if spec["labels"] == "truth":
        if len(spec["truths"]) != len(dset):
            raise ValueError("oracle: ground truths do not line up with the distilled samples")
        dset.labels = list(spec["truths"])
    else:
        dset.labels = teacher.answer(dset.images, dset.questions)
    t = time.perf_counter()
    merged, stats = distil_twin(twin, teacher, dset, _W["replay"], AKDConfig(**spec["akd"]))
    out = {"akd": stats, "distil_seconds": time.perf_counter() - t, "n_samples": len(dset), "patches": {},
           "labels": list(dset.labels)}
    fisher, ex = None, []
    if any(b is not None for b in spec["budgets"]):
        ex = [fam.example(twin, q, im, a) for im, q, a in zip(dset.images, dset.questions, dset.labels)]
        fisher = fisher_diag(merged, twin, ex, DWCConfig().fisher_batches)
    fit = (ex, spec["akd"].get("seed", 0))  # what DWC's refit trains on: the round's examples (+ replay)
    work = Path(spec["work"])
    if spec.get("delta_blob"):  # transmission's baseline downlink: the fp16 delta of every changed tensor
        from cloud.dwc import weight_updates

        ups = weight_updates(merged, twin)
        out["delta_blob"] = str(work / f"{spec['name']}-fp16-delta.bin")
        with open(out["delta_blob"], "wb") as f:
            for g in sorted(ups):
                f.write(ups[g][2].astype(np.float16).tobytes())
    for b in spec["budgets"]:
        out["patches"][_bkey(b)] = _patch_eval(spec["name"], merged, b, fisher if b is not None else None, work, fit)
    if spec.get("nofisher_budget"):  # DWC ablations: the same budget ranked by relative update norm,
        b = spec["nofisher_budget"]  # and the same rows refit with the rest frozen (cloud/dwc_refit.py)
        out["patches"][f"{b}-nofisher"] = _patch_eval(spec["name"] + "-nf", merged, b, None, work, fit)
        out["patches"][f"{b}-refit"] = _patch_eval(spec["name"] + "-rf", merged, b, fisher, work, fit, REFIT_STEPS)
    if spec.get("full_precision"):  # the merged update in torch: what the patch's "gain kept" is measured against
        qas = _W["qas"]
        ans = [fam.decode(twin, fam.generate(twin, fam.example(twin, q.question, im), model=merged))
               for im, q in zip(_W["images"], qas)]
        out["full_precision"] = [exact(a, q.answer) for a, q in zip(ans, qas)]
    return out


def _bkey(budget: int | None) -> str:
    return "unlimited" if budget is None else str(budget)


def _replay_examples() -> list:
    if "replay_ex" not in _W:  # built once per worker process
        fam, twin, rp = _W["fam"], _W["twin"], _W["replay"]
        _W["replay_ex"] = [fam.example(twin, q, im, a) for im, q, a in zip(rp.images, rp.questions, rp.answers)] \
            if rp else []
    return _W["replay_ex"]


def _patch_eval(name: str, merged, budget: int | None, fisher, work: Path, fit: tuple | None = None,
                refit_steps: int | None = None) -> dict:
    """DWC patch of ``merged`` under ``budget`` with the product's DWC settings (``refit_steps``
    overrides the refit; ``fit`` = (round examples, seed) it trains on, with the replay set), applied
    to a copy of the device files through the device's own patch path, measured there by llama.cpp."""
    from cloud.dwc import DWCConfig, apply_to_copy
    from cloud.dwc_refit import compress_refit
    from cloud.families import DeviceFiles

    cfg = DWCConfig(budget_bytes=budget)
    if refit_steps is not None:
        cfg = DWCConfig(budget_bytes=budget, refit_steps=refit_steps)
    data, seed = fit or ([], 0)
    replay = _replay_examples() if cfg.refit_steps and cfg.budget_bytes is not None else []
    res, _ = compress_refit(merged, _W["twin"], DeviceFiles.open(_W["files"]), work / f"{name}-{_bkey(budget)}.gguf",
                            cfg, f"bench-{name}", fisher, data, replay, seed)
    pfiles, scratch = apply_to_copy(_W["files"], res.patch_path)
    try:
        return {"bytes": res.patch_bytes, "path": str(res.patch_path) if res.patch_path else None, "rows": res.rows_patched, "importance_kept": res.selected_importance_frac,
                "correct": device_correct(pfiles)}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _full_ft(spec: dict) -> dict:
    """A ceiling (seam.full_ft_jobs): every weight of the student fine-tuned (CE, cosine schedule)
    on ground truth of fresh scenes of all domains, shipped in full (every changed row, q4_0),
    measured on the device."""
    import copy

    import torch

    from cloud.families import collate
    from cloud.zoo import scenes
    from cloud.zoo.hf_train import TrainConfig, lr_at
    from device.contracts.image import decode_image

    from .chats import DOMAINS, png_bytes

    fam, twin = _W["fam"], _W["twin"]
    data = [s for d in DOMAINS for s in scenes.generate(d, spec["n_per_domain"], spec["scene_seed"])]
    ex = [fam.example(twin, s.question, decode_image(png_bytes(s.image), _W["size"], "scene"), s.answer) for s in data]
    torch.manual_seed(spec["seed"])
    rng = np.random.default_rng(spec["seed"])
    model = copy.deepcopy(twin.model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=0.0)
    sched = TrainConfig(steps=spec["steps"], lr=spec["lr"], warmup=max(1, min(50, spec["steps"] // 10)))
    t = time.perf_counter()
    for step in range(spec["steps"]):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, sched)
        b = collate([ex[i] for i in rng.integers(0, len(ex), spec["batch_size"])], twin.meta.get("pad_id", 0))
        loss = model(**b).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    return {"train_seconds": time.perf_counter() - t, "final_loss": float(loss.item()), "n_train": len(ex),
            "steps": spec["steps"], "patches": {"unlimited": _patch_eval(spec["name"], model, None, None, Path(spec["work"]))}}


def run_job(spec: dict) -> dict:
    t0 = time.perf_counter()
    if spec["kind"] == "continual":
        from .seam_continual import run_rounds as fn
    else:
        fn = {"base": _base, "train": _train, "full_ft": _full_ft}[spec["kind"]]
    out = fn(spec)
    out.update(name=spec["name"], seconds=time.perf_counter() - t0)
    return out


def Runner(model_dir: Path, eval_n: int, replay_n: int, workers: int = 2) -> JobPool:
    """``with Runner(...) as r: results = r.run(jobs)``: this module's jobs on the shared pool."""
    return JobPool(init_worker, run_job, (str(model_dir), eval_n, replay_n, 1), workers)
