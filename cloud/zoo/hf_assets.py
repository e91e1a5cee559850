"""What a built HF default ships besides its checkpoints: the device GGUFs (official converter +
the wheel's llama-quantize), device-vs-torch parity per quant type, the source feature statistics
for UTS, and the replay/eval sets as LLaVA JSON + PNG (the data is an input, never regenerated at
serve time)."""
from __future__ import annotations

import json
from pathlib import Path

from device.contracts.config import DEFAULT_QUANT, EMBEDDED_QUANTS as QUANTS  # one table, hf_build reads it here
from device.contracts.model_id import file_sha256 as sha256_file  # the one file hash

from .scenes import DOMAINS


def is_build_folder(model_dir: str | Path) -> bool:
    """A folder `cdcca models build` wrote: the HF teacher checkpoint and the manifest that names
    the device files and data sets.  The one test the round runner and the bench both apply."""
    d = Path(model_dir)
    return (d / "teacher" / "config.json").is_file() and (d / "manifest.json").is_file()



# ---------------------------------------------------------------- export
_FTYPES = {"f16": "LLAMA_FTYPE_MOSTLY_F16", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
           "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}


def quantize_gguf(src: Path, dst: Path, qtype: str) -> Path:
    """The wheel's llama-quantize (``llama_model_quantize``) on the converter's f32 output: the
    bytes a user's own ``llama-quantize`` run would give (its per-tensor type choices included)."""
    import ctypes

    import llama_cpp

    from device.llama_setup import silence_llama_logs

    silence_llama_logs()
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, _FTYPES[qtype])
    p.nthread = 1
    tmp = dst.with_name(f".{dst.name}.part")
    if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(p)) != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize failed: {src} -> {qtype}")
    tmp.replace(dst)
    return dst


def export_student(ckpt: Path, out: Path, quants=QUANTS, mmproj_quants=("f32", "f16")) -> dict[str, int]:
    """``student-{q}.gguf`` for each device type and ``mmproj-{q}.gguf``; returns their sizes."""
    from cloud.converter import convert

    f32 = convert(ckpt, out / "student-f32.gguf", "f32")
    for q in quants:
        if q != "f32":
            quantize_gguf(f32, out / f"student-{q}.gguf", q)
    for q in mmproj_quants:
        convert(ckpt, out / f"mmproj-{q}.gguf", q, mmproj=True)
    if "f32" not in quants:
        f32.unlink()
    return {p.stem: p.stat().st_size for p in sorted(out.glob("*.gguf"))}


# ---------------------------------------------------------------- evaluation and data
def torch_answers(ckpt: Path, split) -> list[str]:
    import torch
    from transformers.utils import logging as hf_logging

    from . import hf_evaluate
    from .hf_data import Layout
    from .hf_model import ModelSpec, load_model
    from .spm_tokenizer import load_tokenizer

    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()  # one bar per tiny load would drown the build's own output
    spec = ModelSpec.from_dict(json.loads((ckpt / "cdcca_spec.json").read_text()))
    return hf_evaluate.generate(load_model(ckpt), Layout(load_tokenizer(ckpt), spec.tokens_per_image()),
                                split.images, split.questions)


def device_answers(model_gguf: Path, mmproj_gguf: Path, split) -> list[str]:
    """Greedy answers from llama.cpp + libmtmd, exactly as the device runs the files."""
    from device.runtime import Runtime, RuntimeConfig

    with Runtime(RuntimeConfig(model_gguf, mmproj_gguf, n_threads=1)) as rt:
        return [rt.generate(q, img, max_tokens=16).text for q, img in zip(split.questions, split.images)]


def agreement(a: list[str], b: list[str]) -> float:
    return sum(x == y for x, y in zip(a, b)) / max(1, len(a))


def parity(ckpt: Path, model_gguf: Path, mmproj_gguf: Path, split) -> dict:
    """Device vs torch on ``split``: greedy answer agreement and the max |logit gap| at the first
    answer step (the prompt is identical on both sides; a test asserts that)."""
    import numpy as np
    import torch

    from device.runtime import Runtime, RuntimeConfig

    from .hf_data import Layout, embed
    from .hf_model import ModelSpec, load_model
    from .spm_tokenizer import load_tokenizer

    model = load_model(ckpt)
    lay = Layout(load_tokenizer(ckpt), ModelSpec.from_dict(json.loads((ckpt / "cdcca_spec.json").read_text())).tokens_per_image())
    ref = torch_answers(ckpt, split)
    gaps, dev = [], []
    with Runtime(RuntimeConfig(model_gguf, mmproj_gguf, n_threads=1)) as rt:
        for q, img in zip(split.questions, split.images):
            rt.prefill(q, img)
            lg = rt.logits().copy()
            ids = torch.tensor([lay.prefix + lay.suffix(q)])
            with torch.no_grad():
                t = model(inputs_embeds=embed(model, lay, ids, img[None])).logits[0, -1].numpy()
            gaps.append(float(np.abs(t - lg).max()))
            dev.append(rt.generate(q, img, max_tokens=16).text)
    return {"agreement": agreement(dev, ref), "max_logit_gap": max(gaps), "n": len(dev)}


def write_feature_stats(ckpt: Path, out: Path, student_split) -> None:
    """Per-position [N, D] source statistics of the student's projected visual tokens (the device's
    UTS reference for its out-of-distribution score)."""
    import torch

    from device.contracts.feature_stats import FEATURE_STATS_FILE, FeatureStats

    from .hf_data import image_features
    from .hf_model import load_model

    split = student_split
    with torch.no_grad():
        e = image_features(load_model(ckpt), split.images[:2000]).numpy()
    FeatureStats(e.mean(0), e.var(0) + 1e-6, int(e.shape[0])).save(out / FEATURE_STATS_FILE)


def write_datasets(out: Path, cfg) -> dict[str, str]:
    """The data as inputs: ``data/replay.json`` (source, what AKD replays against forgetting) and
    ``data/eval.json`` (held-out, every domain), LLaVA JSON with PNGs beside them."""
    from device.contracts.dataset import llava_record, write_llava
    from device.contracts.image import encode_png

    from . import scenes

    root = out / "data"
    (root / "images").mkdir(parents=True, exist_ok=True)

    def records(samples, tag: str) -> list[dict]:
        recs = []
        for i, s in enumerate(samples):
            rid = f"{tag}-{s.domain}-{i:05d}"
            (root / f"images/{rid}.png").write_bytes(encode_png(s.image))
            recs.append(llava_record(rid, f"images/{rid}.png", s.question, s.answer, domain=s.domain, task=s.task))
        return recs

    write_llava(root / "replay.json", records(scenes.generate("source", cfg.replay_n, cfg.seed + 4000), "replay"))
    ev = [s for d in DOMAINS for s in scenes.generate(d, cfg.eval_n, cfg.seed + 1000)]
    write_llava(root / "eval.json", records(ev, "eval"))
    return {"replay": "data/replay.json", "eval": "data/eval.json"}


def _accuracy_table(acc: dict) -> str:
    rows = []
    for who, r in acc.items():
        doms = " ".join(f"{d} {v['vqa']:.3f} [{v['vqa_ci'][0]:.3f},{v['vqa_ci'][1]:.3f}]" for d, v in r["domains"].items())
        rows.append(f"{who}: {doms}")
    return "\n".join(rows)
