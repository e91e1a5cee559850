"""Build the embedded default as Hugging Face Idefics3 models: world -> SentencePiece tokenizer ->
student (source only) + teacher (curriculum: source, then every domain) trained in parallel
processes -> ``save_pretrained`` checkpoints -> llama.cpp's official converter (text GGUF +
``idefics3`` mmproj) -> the wheel's llama-quantize for the device types -> torch and device
accuracy with Wilson intervals -> replay/eval sets as LLaVA JSON + PNG -> manifest.

Trained roles are cached by a hash of their config and of the code that shapes their weights
(``~/.cache/cdcca/zoo``), so a long teacher run is done once and a rebuild reuses it; with an
empty cache the build reproduces the same bytes (seeded, one thread, deterministic ops).
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .scenes import DOMAINS, TARGET_DOMAINS

ZOO_DIR = Path(__file__).parent
# the files whose code decides a role's weights (the export/eval half of this file does not)
TRAINING_CODE = ("scenes.py", "split.py", "spm_tokenizer.py", "hf_model.py", "hf_data.py", "hf_train.py")
from .hf_assets import (DEFAULT_QUANT, QUANTS, _accuracy_table, agreement, device_answers, export_student,
                        parity, sha256_file, torch_answers, write_datasets, write_feature_stats)


@dataclass
class RoleConfig:
    spec: dict
    steps: int
    lr: float = 2e-3
    batch_size: int = 128
    curriculum_steps: int = 0  # first train on source only (teacher)
    warmup: int = 60
    # a second, low-lr pass on the full mixture, warm-started from the role trained without it
    # (so a longer teacher reuses the cached shorter run and stays reproducible from scratch)
    polish_steps: int = 0
    polish_lr: float = 5e-4
    # further passes, each warm-started from the role trained without it and run on its own fresh
    # mixture: ({"steps", "lr", "n_train", "data_seed"}, ...).  Why fresh data: a longer run on the
    # first mixture gains nothing once the model has seen it; new scenes keep it generalising.
    more_polish: tuple = ()

    def key(self) -> dict:
        """The fields that name a cache entry; the polish fields only when a polish pass is asked
        for, so entries cached before the pass existed keep their names."""
        d = asdict(self)
        if not self.polish_steps:
            d.pop("polish_steps"), d.pop("polish_lr")
        if not self.more_polish:
            d.pop("more_polish")
        else:
            d["more_polish"] = [dict(p) for p in self.more_polish]
        return d

    def without_last_pass(self) -> "RoleConfig":
        if self.more_polish:
            return replace(self, more_polish=self.more_polish[:-1])
        return replace(self, polish_steps=0)

    def last_pass_steps(self) -> int:
        return self.more_polish[-1]["steps"] if self.more_polish else self.polish_steps or self.steps


@dataclass
class HFBuildConfig:
    preset: str
    student: RoleConfig
    teacher: RoleConfig
    n_train: int = 20000
    eval_n: int = 360  # per domain; 5 of 6 tasks are VQA -> 300 VQA samples per domain
    replay_n: int = 300  # source samples shipped as the cloud's replay set
    vocab_size: int = 512
    seed: int = 0
    teacher_mix: dict = field(default_factory=lambda: {"source": 0.2, "texture": 0.2, "noise": 0.2,
                                                       "combo": 0.2, "rotate": 0.2})


_TINY = dict(vision_dim=32, vision_layers=1, vision_heads=2, vision_mlp=64, patch=8, text_dim=64, text_layers=1,
             text_heads=2, text_kv_heads=2, text_ffn=128)
PRESETS = {
    "tiny": HFBuildConfig("tiny", RoleConfig(_TINY, steps=30, warmup=5), RoleConfig(_TINY, steps=30, warmup=5),
                          n_train=1200, eval_n=24, replay_n=24),
    "default": HFBuildConfig(
        "default",
        RoleConfig(dict(vision_dim=64, vision_layers=2, vision_heads=2, vision_mlp=256, patch=8, text_dim=96,
                        text_layers=2, text_heads=4, text_kv_heads=4, text_ffn=256), steps=1500),
        # the teacher: wider (~1.5x params), same 8-px patches and 4 LM tokens per image (one per
        # quadrant of the 2x2 scene grid), trained on every domain with a source-first curriculum.
        # A 4-px-patch teacher (16 tokens per image) learned far slower (0.61-0.67 after 1,500 steps).
        RoleConfig(dict(vision_dim=96, vision_layers=2, vision_heads=3, vision_mlp=384, patch=8, text_dim=128,
                        text_layers=2, text_heads=4, text_kv_heads=4, text_ffn=384),
                   steps=1500, curriculum_steps=250, polish_steps=1000, polish_lr=1.5e-3,
                   # v4: 3,000 more steps on 40,000 fresh scenes; the cosine tail is where it gains
                   # (development probe, scenes seed 7000: 0.846 -> 0.888 at step 2,000 -> 0.961)
                   more_polish=({"steps": 3000, "lr": 1e-3, "n_train": 40000, "data_seed": 31},))),
}


def cache_root() -> Path:
    env = os.environ.get("CDCCA_ZOO_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "cdcca" / "zoo"


def _sha(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else p.encode())
    return h.hexdigest()[:16]


def code_version(files=TRAINING_CODE) -> str:
    return _sha(*[n.encode() + (ZOO_DIR / n).read_bytes() for n in files])


def config_hash(cfg: HFBuildConfig) -> str:
    return _sha(json.dumps(asdict(cfg), sort_keys=True), code_version(), code_version(("hf_build.py",)))


def _atomic_dir(final: Path, make) -> Path:
    """Run ``make(tmp)`` then rename tmp -> final, so a killed run never leaves a half cache entry."""
    if final.is_dir():
        return final
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    make(tmp)
    try:
        tmp.rename(final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same entry first
    return final


# ---------------------------------------------------------------- data
def tokenizer_texts(cfg: HFBuildConfig) -> list[str]:
    from . import scenes
    from device.contracts import prompt

    texts = [prompt.PREFIX, "\nASSISTANT:"]
    for d in DOMAINS:
        texts += [t for s in scenes.generate(d, 600, cfg.seed + 7, teacher=True) for t in (s.question, s.answer)]
    return texts


def tokenizer_dir(cfg: HFBuildConfig, cache: Path) -> Path:
    from .spm_tokenizer import build_tokenizer

    key = _sha(str(cfg.vocab_size), str(cfg.seed), code_version(("scenes.py", "spm_tokenizer.py")))
    return _atomic_dir(cache / f"tokenizer-{key}", lambda d: build_tokenizer(tokenizer_texts(cfg), d, cfg.vocab_size))


def stages(cfg: HFBuildConfig, role: str):
    """[(Split, steps)]: the student sees only the source (seen colour/shape pairs); the teacher
    sees the source with every pair first, then the mixture of all domains."""
    from . import scenes
    from .split import from_samples

    rc: RoleConfig = getattr(cfg, role)
    if role == "student":
        return [(from_samples(scenes.generate("source", cfg.n_train, cfg.seed)), rc.steps)]
    mix = from_samples(scenes.generate_mix(cfg.n_train * 2, cfg.seed + 1, cfg.teacher_mix, teacher=True))
    if not rc.curriculum_steps:
        return [(mix, rc.steps)]
    src = from_samples(scenes.generate("source", cfg.n_train, cfg.seed + 2, teacher=True))
    return [(src, rc.curriculum_steps), (mix, rc.steps - rc.curriculum_steps)]


def eval_split(cfg: HFBuildConfig, n: int | None = None, seed_offset: int = 1000):
    from . import scenes
    from .split import from_samples

    return from_samples([s for d in DOMAINS for s in scenes.generate(d, n or cfg.eval_n, cfg.seed + seed_offset)])


# ---------------------------------------------------------------- training
def role_dir(cfg: HFBuildConfig, role: str, cache: Path) -> Path:
    tok = tokenizer_dir(cfg, cache)
    key = _sha(role, json.dumps(getattr(cfg, role).key(), sort_keys=True), str(cfg.n_train), str(cfg.seed),
               json.dumps(cfg.teacher_mix, sort_keys=True), (tok / "tokenizer.model").read_bytes(), code_version())
    return cache / f"{role}-{key}"


def train_role(role: str, cfg: HFBuildConfig, cache: Path, report=None, log: Path | None = None,
               probe=None, probe_every: int = 400) -> Path:
    """Train one role (or reuse its cache entry); returns its ``save_pretrained`` directory.
    ``probe(model, layout, step)`` (optional, e.g. a quick accuracy check for long runs) runs every
    ``probe_every`` steps; it must not touch random state (greedy evaluation does not)."""
    import torch

    from . import hf_train
    from .hf_data import Layout
    from .hf_model import ModelSpec, load_model, new_model, save_checkpoint
    from .spm_tokenizer import load_tokenizer

    final = role_dir(cfg, role, cache)
    if final.is_dir():
        return final
    torch.set_num_threads(1)
    tok_dir = tokenizer_dir(cfg, cache)
    tok, rc = load_tokenizer(tok_dir), getattr(cfg, role)
    spec = ModelSpec.from_dict(rc.spec)
    lay = Layout(tok, spec.tokens_per_image())
    if rc.more_polish or rc.polish_steps:
        base = train_role(role, replace(cfg, **{role: rc.without_last_pass()}), cache, report, log, probe, probe_every)
        model = load_model(base)
        if rc.more_polish:
            from . import scenes
            from .split import from_samples

            p = rc.more_polish[-1]
            data = from_samples(scenes.generate_mix(p["n_train"], p["data_seed"], cfg.teacher_mix, teacher=role == "teacher"))
            plan = [data, p["steps"]]
            tc = hf_train.TrainConfig(steps=p["steps"], batch_size=rc.batch_size, lr=p["lr"], seed=p["data_seed"], warmup=20)
        else:
            plan = [stages(cfg, role)[-1][0], rc.polish_steps]
            tc = hf_train.TrainConfig(steps=rc.polish_steps, batch_size=rc.batch_size, lr=rc.polish_lr,
                                      seed=cfg.seed + 1, warmup=20)
    else:
        model, plan = new_model(spec, tok, cfg.seed), None
        tc = hf_train.TrainConfig(steps=rc.steps, batch_size=rc.batch_size, lr=rc.lr, seed=cfg.seed, warmup=rc.warmup)
    t0 = time.time()

    def on_step(step: int, loss: float) -> None:
        if report is not None:
            report(step, loss)
        if log is not None and step % 50 == 0:
            with open(log, "a") as f:
                f.write(f"{role} step {step} loss {loss:.4f} t={time.time() - t0:.0f}s\n")
        if probe is not None and step and step % probe_every == 0:
            probe(model, lay, step)
            model.train()

    hf_train.train(model, lay, [tuple(plan)] if plan else stages(cfg, role), tc, on_step)
    return _atomic_dir(final, lambda d: save_checkpoint(model, tok_dir, spec, d))


def steps_to_train(cfg: HFBuildConfig, role: str, cache: Path) -> int:
    """Optimizer steps of the passes of ``role`` that are not cached yet (for the progress bar)."""
    rc, n = getattr(cfg, role), 0
    while not role_dir(cfg, role, cache).is_dir():
        n += rc.last_pass_steps()
        if not (rc.more_polish or rc.polish_steps):
            break
        rc = rc.without_last_pass()
        cfg = replace(cfg, **{role: rc})
    return n


def _worker(role: str, cfg: HFBuildConfig, cache: Path, q) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a spawned trainer's checkpoint-load bar broke the build's bar
    train_role(role, cfg, cache, report=lambda s, l: q.put((role, 1, l)))
    q.put((role, 0, None))


def train_both(cfg: HFBuildConfig, cache: Path, progress: bool) -> dict[str, Path]:
    """Student and teacher in two spawned processes, one thread each, with one progress bar."""
    from tqdm import tqdm

    todo = [r for r in ("student", "teacher") if not role_dir(cfg, r, cache).is_dir()]
    total = sum(steps_to_train(cfg, r, cache) for r in todo)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, cfg, cache, q)) for r in todo]
    for p in procs:
        p.start()
    done, losses = 0, {}
    with tqdm(total=total, desc="training " + "+".join(todo) if todo else "cached",
              unit="step", disable=not progress, mininterval=1.0) as bar:
        while done < len(todo):
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
    return {r: role_dir(cfg, r, cache) for r in ("student", "teacher")}


# ---------------------------------------------------------------- build
def build(preset: str | HFBuildConfig = "default", out: Path | str = "assets/default", progress: bool = True,
          force: bool = False, cache: Path | None = None) -> Path:
    """Build (or reuse) the HF default pair into ``out``; returns ``out`` (holding ``manifest.json``)."""
    from . import scenes
    from .hf_model import ModelSpec, load_model, num_params
    from .split import from_samples

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per tiny checkpoint load would drown the build's own
    cfg = PRESETS[preset] if isinstance(preset, str) else preset
    h, out, cache = config_hash(cfg), Path(out), Path(cache or cache_root())
    man = out / "manifest.json"
    if not force and man.is_file() and json.loads(man.read_text()).get("config_hash") == h:
        return out
    t0 = time.time()
    roles = train_both(cfg, cache, progress)
    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for r, d in roles.items():
        shutil.copytree(d, tmp / r)
    quick = cfg.preset == "tiny"
    sizes = export_student(tmp / "student", tmp, ("f32", DEFAULT_QUANT) if quick else QUANTS, ("f32",))
    write_feature_stats(tmp / "student", tmp, stages(cfg, "student")[0][0])
    data_files = write_datasets(tmp, cfg)
    ev = from_samples([s for d in DOMAINS for s in scenes.generate(d, cfg.eval_n, cfg.seed + 1000)])
    from .scoring import score

    probe = from_samples([s for d in DOMAINS for s in scenes.generate(d, min(cfg.eval_n, 60), cfg.seed + 1000)])
    fidelity = {q: parity(tmp / "student", tmp / f"student-{q}.gguf", tmp / "mmproj-f32.gguf", probe)
                for q in (("f32", DEFAULT_QUANT) if quick else QUANTS)}
    answers = {r: torch_answers(tmp / r, ev) for r in ("student", "teacher")}
    dev = device_answers(tmp / f"student-{DEFAULT_QUANT}.gguf", tmp / "mmproj-f32.gguf", ev)
    acc = {"student": score(answers["student"], ev), "teacher": score(answers["teacher"], ev),
           f"student_device_{DEFAULT_QUANT}": score(dev, ev)}
    manifest = {
        "preset": cfg.preset, "family": "idefics3", "config_hash": h, "code_version": code_version(), "seed": cfg.seed,
        "build_config": asdict(cfg), "data": data_files, "default_quant": DEFAULT_QUANT,
        "build_seconds": round(time.time() - t0, 1),
        "params": {r: num_params(load_model(tmp / r)) for r in ("student", "teacher")},
        "image_tokens": {r: ModelSpec.from_dict(getattr(cfg, r).spec).tokens_per_image() for r in roles},
        "gguf_bytes": sizes, "accuracy": acc,
        "device_vs_torch_agreement": {DEFAULT_QUANT: agreement(dev, answers["student"])},
        "device_vs_torch_probe": fidelity,  # per quant type, mmproj f32, 60 per domain
        "teacher_beats_student_by": {d: acc["teacher"]["domains"][d]["vqa"] - acc["student"]["domains"][d]["vqa"]
                                     for d in TARGET_DOMAINS},
        "files": {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*"))
                  if p.is_file() and p.parent.name != "images" and p.name != "manifest.json"},
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    if progress:
        print(_accuracy_table(acc))
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="build the HF Idefics3 default (student + teacher) into a folder")
    ap.add_argument("--preset", default="default", choices=sorted(PRESETS))
    ap.add_argument("--out", default="assets/default")
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    print(build(a.preset, a.out, force=a.force))


if __name__ == "__main__":
    main()
