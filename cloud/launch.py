"""A round's AKD training under ``accelerate launch`` (issue 13, item 3).

Why a subprocess: DDP and FSDP need one process per GPU, started by accelerate's launcher
(torchrun underneath), while the worker must stay one process that heartbeats, honours cancel
and owns the round.  So the worker hands only the *training* to ``accelerate launch``:

1. :func:`train` writes the round's training inputs into a scratch folder: ``job.json`` (the
   twin's source GGUF files, the teacher checkpoint dir, the AKDConfig) and ``data.npz`` +
   ``data.json`` (the teacher-labelled distil set, the replay set);
2. it runs ``python -m accelerate.commands.launch --num_processes N ... -m cloud.launch DIR``
   (:func:`launch_command`) in its own process group; every rank rebuilds the twin from the
   same GGUF and calls the same :func:`cloud.akd.distil_twin` as the in-process path;
3. rank 0 appends each step's loss terms to ``progress.jsonl`` (relayed to the round's progress
   while the worker waits) and at the end writes the merged tensors that differ from the twin
   (``merged.pt``) and the stats (``stats.json``);
4. the worker loads those tensors into its own copy of the twin and goes on with Fisher / DWC /
   evaluation exactly as after an in-process run.

A cancel, a lost lease or the wall-time cap (the worker's heartbeat thread sees them) kills the
launcher's whole process group.  ``processes == 1`` without an accelerate config or FSDP runs
in-process, as before.  On a CPU-only machine N processes talk gloo; on GPUs, NCCL DDP.
"""
from __future__ import annotations

import copy
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .akd import AKDConfig, DistillSet, ReplaySet, distil_twin

_EXC = re.compile(r"^(\[rank\d+\]: )?[A-Za-z_.]*(Error|Exception|Interrupt)\b.*:")
_LAUNCHER_ERRORS = ("ChildFailedError", "CalledProcessError")  # the launcher's, after the rank's own
POLL_S = 0.25  # how often the waiting worker relays progress and checks for cancel
# FSDP over the twin (+ adapters): full sharding, one unit per decoder / vision layer, and the
# original parameters kept (PEFT freezes most of them; FSDP needs that to mix frozen and trained)
FSDP_FLAGS = ("--use_fsdp", "--fsdp_sharding_strategy", "FULL_SHARD", "--fsdp_auto_wrap_policy",
              "TRANSFORMER_BASED_WRAP", "--fsdp_use_orig_params", "true", "--fsdp_state_dict_type",
              "FULL_STATE_DICT", "--fsdp_sync_module_states", "true")


@dataclass(frozen=True)
class LaunchOptions:
    """How a worker runs a round's training: ``processes`` ranks (``--train-processes``),
    optionally an accelerate config file (``--accelerate-config``: FSDP, DeepSpeed, GPU ids...)
    and/or FSDP with cdcca's defaults (``--fsdp``)."""

    processes: int = 1
    config_file: Path | None = None
    fsdp: bool = False

    @classmethod
    def from_settings(cls, settings) -> "LaunchOptions":
        return cls(settings.train_processes, settings.accelerate_config, settings.train_fsdp)

    @property
    def in_process(self) -> bool:
        return self.processes <= 1 and self.config_file is None and not self.fsdp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(opts: LaunchOptions, job_dir: Path, port: int | None = None) -> list[str]:
    """The ``accelerate launch`` command line for one round's training (tested as built: the
    flags must reach accelerate's launcher).  ``--multi_gpu`` is accelerate's name for "one
    process per rank through torchrun"; without a GPU the ranks fall back to CPU and gloo."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if opts.config_file is not None:
        cmd += ["--config_file", str(opts.config_file)]
    else:  # no config file: say everything, so accelerate neither guesses nor warns
        cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if opts.processes > 1 or opts.config_file is None:
        cmd += ["--num_processes", str(max(1, opts.processes))]
    if opts.fsdp:
        cmd += list(FSDP_FLAGS)
    elif opts.processes > 1 and opts.config_file is None:
        cmd += ["--multi_gpu"]
    # a fixed port would make two workers on one machine collide
    cmd += ["--main_process_port", str(port or _free_port()), "-m", "cloud.launch", str(job_dir)]
    return cmd


# --- the worker's side ----------------------------------------------------------------------------
def train(twin, files: dict[str, Path], teacher, dset: DistillSet, replay: ReplaySet | None, cfg: AKDConfig,
          on_step: Callable[[int, dict], None] | None, cancelled: Callable[[], bool] | None,
          work_dir: Path, opts: LaunchOptions | None = None, threads: int = 2) -> tuple[torch.nn.Module, dict]:
    """``distil_twin``'s contract (merged model, stats), in-process or under ``accelerate
    launch``.  The stats gain ``processes``, ``train_seconds`` and the CE curve's ends
    (``ce_first`` / ``ce_last``: mean of the first / last 3 steps on rank 0's batches)."""
    opts = opts or LaunchOptions()
    curve: list[float] = []

    def step(i: int, terms: dict) -> None:
        if "ce" in terms:
            curve.append(float(terms["ce"]))
        if on_step is not None:
            on_step(i, terms)

    t0 = time.time()
    if opts.in_process:
        merged, stats = distil_twin(twin, teacher, dset, replay, cfg, step, cancelled)
        stats["processes"] = 1
    else:
        job, per_rank = Path(work_dir) / "train", max(1, threads // max(1, opts.processes))
        write_job(job, files, teacher.path, dset, replay, cfg, per_rank)
        result = _run(launch_command(opts, job), job, step, cancelled, per_rank)
        stats = result["stats"]
        merged = copy.deepcopy(twin.model)
        missing = set(result["changed_tensors"]) - set(merged.state_dict())
        if missing:
            raise RuntimeError(f"launched training returned tensors the twin lacks: {sorted(missing)[:3]}")
        merged.load_state_dict(torch.load(job / "merged.pt", weights_only=True), strict=False)
        merged.eval()
    stats["train_seconds"] = round(time.time() - t0, 2)
    if curve:
        stats.update(ce_first=float(np.mean(curve[:3])), ce_last=float(np.mean(curve[-3:])))
    return merged, stats


def write_job(job: Path, files: dict[str, Path], teacher_dir: Path, dset: DistillSet, replay: ReplaySet | None,
              cfg: AKDConfig, threads: int) -> None:
    """The scratch folder every rank reads: inputs only, so a rank needs nothing from the worker."""
    job.mkdir(parents=True, exist_ok=True, mode=0o700)
    arrays: dict[str, np.ndarray] = {}
    meta = {"distil": _pack(dset.images, arrays, "distil")}
    meta.update(questions=dset.questions, labels=dset.labels, uncertain=dset.uncertain_positions)
    if replay is not None:
        meta["replay"] = {"images": _pack(replay.images, arrays, "replay"), "questions": replay.questions,
                          "answers": replay.answers}
    np.savez(job / "data.npz", **arrays)
    (job / "data.json").write_text(json.dumps(meta))
    (job / "job.json").write_text(json.dumps({
        "model": str(files["model"]), "mmproj": str(files["mmproj"]) if files.get("mmproj") else None,
        "teacher": str(teacher_dir), "cfg": asdict(cfg), "threads": threads}))


def _pack(images, arrays: dict, name: str) -> bool:
    """Stores a vision set's images as one array; a text-only set has none (False)."""
    if len(images) == 0 or images[0] is None:
        return False
    arrays[name] = np.stack(images)
    return True


def _run(cmd: list[str], job: Path, on_step, cancelled, threads: int) -> dict:
    """Run the launch to its end (or kill it on cancel); rank 0's ``stats.json``."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                          os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    seen = 0
    with open(job / "launch.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            while True:
                done = proc.poll() is not None
                seen = _relay(job / "progress.jsonl", seen, on_step)
                if done:
                    break
                if cancelled is not None and cancelled():
                    raise InterruptedError("round cancelled")
                time.sleep(POLL_S)
        finally:
            if proc.poll() is None:
                _kill(proc)
    if proc.returncode != 0 or not (job / "merged.pt").is_file():
        raise RuntimeError(f"accelerate launch exited {proc.returncode}: {_reason(job / 'launch.log')}")
    return json.loads((job / "stats.json").read_text())  # {"stats", "changed_tensors"}


def _reason(log: Path) -> str:
    """The rank's own exception line, not torchrun's summary banner that follows it."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if _EXC.match(ln) and not any(w in ln for w in _LAUNCHER_ERRORS):
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


def _relay(path: Path, seen: int, on_step) -> int:
    """Hands the steps rank 0 appended since the last look to ``on_step`` (which may raise to
    stop the round: the caller then kills the launch).  Only whole lines count."""
    if not path.is_file():
        return seen
    with open(path, "rb") as f:
        f.seek(seen)
        chunk = f.read()
    end = chunk.rfind(b"\n") + 1
    for line in chunk[:end].splitlines():
        rec = json.loads(line)
        if on_step is not None:
            on_step(rec["step"], rec["terms"])
    return seen + end


def _kill(proc: subprocess.Popen) -> None:
    """The launcher and every rank it started share its process group: end them all."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue


# --- every rank's side ----------------------------------------------------------------------------
def read_job(job: Path) -> tuple[dict, DistillSet, ReplaySet | None]:
    spec = json.loads((job / "job.json").read_text())
    meta = json.loads((job / "data.json").read_text())
    arrays = np.load(job / "data.npz")
    imgs = lambda name, has, n: arrays[name] if has else [None] * n  # noqa: E731
    dset = DistillSet(imgs("distil", meta["distil"], len(meta["questions"])), meta["questions"],
                      meta["labels"], meta["uncertain"])
    r = meta.get("replay")
    replay = ReplaySet(imgs("replay", r["images"], len(r["questions"])), r["questions"], r["answers"]) if r else None
    return spec, dset, replay


def main(job: Path) -> None:
    from accelerate import PartialState

    from .families import family_for
    from .families.teacher import Teacher

    spec, dset, replay = read_job(job)
    torch.set_num_threads(int(spec["threads"]))
    model, mmproj = Path(spec["model"]), Path(spec["mmproj"]) if spec["mmproj"] else None
    twin = family_for(model, mmproj).load_twin(model, mmproj)
    # the same device choice as distil_twin's Accelerator: the state is shared, and a plain
    # PartialState() on a CPU-only machine would settle for one non-distributed process
    state = PartialState(cpu=not torch.cuda.is_available())
    log = open(job / "progress.jsonl", "a") if state.is_main_process else None

    def on_step(i: int, terms: dict) -> None:
        if log is not None:
            log.write(json.dumps({"step": i, "terms": terms}) + "\n")
            log.flush()

    merged, stats = distil_twin(twin, Teacher(spec["teacher"]), dset, replay, AKDConfig(**spec["cfg"]), on_step)
    if state.is_main_process:
        log.close()
        base = twin.model.state_dict()
        changed = {k: v.detach().cpu().contiguous() for k, v in merged.state_dict().items()
                   if k not in base or not torch.equal(v, base[k])}
        (job / "stats.json").write_text(json.dumps({"stats": {**stats, "processes": state.num_processes},
                                                    "changed_tensors": sorted(changed)}))
        torch.save(changed, job / "merged.tmp")
        os.replace(job / "merged.tmp", job / "merged.pt")  # last: its presence means "finished"
    state.wait_for_everyone()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
