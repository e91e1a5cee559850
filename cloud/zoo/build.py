"""Build the embedded default pair: data -> tokenizer -> student + teacher (trained in parallel
processes, one thread each) -> GGUF export -> accuracy report -> manifest.

Builds are cached by a content hash of the build config and the zoo's source code, so a rebuild
happens only when something that affects the weights changed.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from device.contracts.model_id import file_sha256 as sha256_file  # the one file hash

from .model import TextConfig, TinyLlavaConfig, VisionConfig
from .scenes import DOMAINS

ZOO_DIR = Path(__file__).parent
STUDENT_QUANTS = ("f32", "f16", "q8_0", "q4_0")
DEVICE_EVAL_PER_DOMAIN = 60  # held-out images shipped with the model for on-device evaluation


@dataclass
class RoleConfig:
    vision: dict
    text: dict
    steps: int
    lr: float = 2e-3
    batch_size: int = 128
    curriculum_steps: int = 0  # teacher: first train on source only (big models stall otherwise)


@dataclass
class BuildConfig:
    preset: str
    student: RoleConfig
    teacher: RoleConfig
    n_train: int = 20000
    eval_n: int = 300
    vocab_size: int = 384
    seed: int = 0
    teacher_mix: dict = field(default_factory=lambda: {"source": 0.4, "texture": 0.15, "noise": 0.15,
                                                       "combo": 0.15, "rotate": 0.15})


PRESETS = {
    "tiny": BuildConfig("tiny",
                        RoleConfig(dict(dim=32, layers=1, heads=1, mlp=64), dict(dim=64, layers=1, heads=2, kv_heads=2, ffn=128), steps=40),
                        RoleConfig(dict(dim=32, layers=1, heads=1, mlp=64), dict(dim=64, layers=1, heads=2, kv_heads=2, ffn=128), steps=40),
                        n_train=1500, eval_n=40),
    "default": BuildConfig("default",
                           RoleConfig(dict(dim=64, layers=2, heads=2, mlp=256), dict(dim=96, layers=2, heads=4, kv_heads=4, ffn=256), steps=1500),
                           RoleConfig(dict(dim=96, layers=2, heads=3, mlp=384), dict(dim=128, layers=2, heads=4, kv_heads=4, ffn=384),
                                      steps=1500, curriculum_steps=300)),
}


def code_version() -> str:
    h = hashlib.sha256()
    for p in sorted(ZOO_DIR.glob("*.py")):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()[:16]


def config_hash(cfg: BuildConfig, data_path: Path | None = None) -> str:
    blob = json.dumps(asdict(cfg), sort_keys=True) + code_version()
    if data_path is not None:
        blob += hashlib.sha256(Path(data_path).read_bytes()).hexdigest()
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def model_config(role: RoleConfig, vocab: int, codec) -> TinyLlavaConfig:
    return TinyLlavaConfig(VisionConfig(**role.vision), TextConfig(vocab_size=vocab, **role.text),
                           bos_id=codec.bos, eos_id=codec.eos, pad_id=codec.pad)


# ---------------------------------------------------------------- data
def training_split(cfg: BuildConfig, role: str, data_path: Path | None):
    from . import data, scenes

    if data_path is not None:
        return user_splits(cfg, data_path)[0]
    if role == "student":
        return data.from_samples(scenes.generate("source", cfg.n_train, cfg.seed))
    return data.from_samples(scenes.generate_mix(cfg.n_train * 2, cfg.seed + 1, cfg.teacher_mix, teacher=True))


def eval_split(cfg: BuildConfig, data_path: Path | None = None, seed_offset: int = 1000):
    """Held-out evaluation set: ``eval_n`` per domain (or the user's held-out 10%)."""
    from . import data, scenes

    if data_path is not None:
        return user_splits(cfg, data_path)[1]
    return data.from_samples([s for d in DOMAINS for s in scenes.generate(d, cfg.eval_n, cfg.seed + seed_offset)])


def user_splits(cfg: BuildConfig, data_path: Path):
    import numpy as np

    from device.contracts.dataset import read_llava

    from . import data

    full = data.from_llava(read_llava(data_path), cfg.student.vision.get("image_size", 32))
    idx = np.random.default_rng(cfg.seed).permutation(len(full))
    n_eval = max(1, len(full) // 10)
    return full.subset(idx[n_eval:]), full.subset(idx[:n_eval])


# ---------------------------------------------------------------- training workers
def _train_role(role: str, cfg: BuildConfig, out: Path, data_path: Path | None, q) -> None:
    import torch

    from . import data, train
    from .model import TinyLlava
    from .tokenizer import load_tokenizer

    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    codec = data.Codec(load_tokenizer(out / "tokenizer.json"))
    rc: RoleConfig = getattr(cfg, role)
    model = TinyLlava(model_config(rc, codec.tok.get_vocab_size(), codec))
    split = training_split(cfg, role, data_path)
    report = (lambda s, l: q.put((role, 1, l))) if q is not None else None
    tc = train.TrainConfig(steps=rc.steps, batch_size=rc.batch_size, lr=rc.lr, seed=cfg.seed)
    if rc.curriculum_steps and data_path is None:
        src = training_split(cfg, "student", None)
        train.train(model, src, codec, replace(tc, steps=rc.curriculum_steps), report)
        tc = replace(tc, steps=rc.steps - rc.curriculum_steps)
    train.train(model, split, codec, tc, report)
    torch.save({"config": model.cfg.to_dict(), "state": model.state_dict()}, out / f"{role}.pt")
    if q is not None:
        q.put((role, 0, None))


def _train_both(cfg: BuildConfig, out: Path, data_path: Path | None, progress: bool) -> None:
    from tqdm import tqdm

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_train_role, args=(r, cfg, out, data_path, q)) for r in ("student", "teacher")]
    for p in procs:
        p.start()
    total = cfg.student.steps + cfg.teacher.steps
    done, losses = 0, {}
    with tqdm(total=total, desc="training student+teacher", unit="step", disable=not progress, mininterval=1.0) as bar:
        while done < 2:
            try:
                role, n, loss = q.get(timeout=5)
            except Exception:
                if any(p.exitcode not in (None, 0) for p in procs):
                    raise RuntimeError("a training process failed; see its traceback above") from None
                continue
            if n == 0:
                done += 1
                continue
            losses[role] = loss
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()})
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"training process exited with {p.exitcode}")


# ---------------------------------------------------------------- build
def load_pt(path: Path):
    import torch

    from .model import TinyLlava

    ck = torch.load(path, map_location="cpu", weights_only=True)
    m = TinyLlava(TinyLlavaConfig.from_dict(ck["config"]))
    m.load_state_dict(ck["state"])
    m.eval()
    return m


def export_student(out: Path, quants=STUDENT_QUANTS) -> dict[str, int]:
    from . import gguf_export
    from .tokenizer import load_tokenizer

    m, tok = load_pt(out / "student.pt"), load_tokenizer(out / "tokenizer.json")
    sizes = {}
    for q in quants:
        sizes[q] = gguf_export.export_text(m, tok, out / f"student-{q}.gguf", q).stat().st_size
    for q in ("f32", "f16"):
        sizes[f"mmproj-{q}"] = gguf_export.export_mmproj(m, out / f"mmproj-{q}.gguf", q).stat().st_size
    return sizes


def write_feature_stats(out: Path, cfg: BuildConfig, data_path: Path | None) -> None:
    """Per-position source statistics of the student's projected visual tokens ([N, D] mean and
    variance), which the device's UTS uses as the reference for its out-of-distribution score."""
    import torch

    from device.contracts.feature_stats import FEATURE_STATS_FILE, FeatureStats

    m = load_pt(out / "student.pt")
    split = training_split(cfg, "student", data_path)
    with torch.no_grad():
        e = m.image_embeds(torch.from_numpy(split.images[:2000])).numpy()  # [n, N, D]
    FeatureStats(e.mean(0), e.var(0) + 1e-6, int(e.shape[0])).save(out / FEATURE_STATS_FILE)


def evaluate_pair(out: Path, cfg: BuildConfig, data_path: Path | None) -> dict:
    import torch

    from . import data, evaluate
    from .tokenizer import load_tokenizer

    torch.set_num_threads(2)
    codec = data.Codec(load_tokenizer(out / "tokenizer.json"))
    ev = eval_split(cfg, data_path)
    return {r: evaluate.evaluate(load_pt(out / f"{r}.pt"), codec, ev) for r in ("student", "teacher")}


def build(preset: str | BuildConfig = "default", out: Path | None = None, data_path: Path | None = None,
          progress: bool = True, force: bool = False, zoo_dir: Path | None = None) -> Path:
    """Build (or reuse) a model pair; returns its directory (holding ``manifest.json``)."""
    from . import scenes
    from .tokenizer import train_tokenizer

    cfg = PRESETS[preset] if isinstance(preset, str) else preset
    h = config_hash(cfg, data_path)
    if out is None:
        out = Path(zoo_dir or ".") / f"{cfg.preset}-{h}"
    out = Path(out)
    man = out / "manifest.json"
    if not force and man.is_file() and json.loads(man.read_text()).get("config_hash") == h:
        return out
    t0 = time.time()
    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    texts = []
    if data_path is None:
        for d in DOMAINS:
            texts += [t for s in scenes.generate(d, 600, cfg.seed + 7, teacher=True) for t in (s.question, " " + s.answer)]
    else:
        sp = user_splits(cfg, data_path)[0]
        texts = sp.questions + [" " + a for a in sp.answers]
    train_tokenizer(texts, cfg.vocab_size).save(str(tmp / "tokenizer.json"))
    _train_both(cfg, tmp, data_path, progress)
    sizes = export_student(tmp)
    write_feature_stats(tmp, cfg, data_path)
    if data_path is None:
        from .llava_io import write_eval_set

        write_eval_set(tmp / "eval", DEVICE_EVAL_PER_DOMAIN, cfg.seed + 3000)
    acc = evaluate_pair(tmp, cfg, data_path)
    manifest = {
        "preset": cfg.preset, "config_hash": h, "code_version": code_version(), "seed": cfg.seed,
        "build_config": asdict(cfg), "data": str(data_path) if data_path else "generated",
        "build_seconds": round(time.time() - t0, 1),
        "params": {r: load_pt(tmp / f"{r}.pt").num_params() for r in ("student", "teacher")},
        "gguf_bytes": sizes, "accuracy": acc,
        "files": {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*"))
                  if p.is_file() and p.parent.name != "images"},
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
