"""cloud.launch: a worker trains a round under ``accelerate launch`` (issue 13, item 3).

The real-round test runs the shipped default (assets/default) through the worker code path
(Store -> Worker.run_once -> run_round -> cloud.launch.train) twice: in the worker's own process,
and with ``train_processes=2`` (two gloo ranks on CPU, the DDP path GPUs take).  By construction
the two differ: each rank draws its own batches (its rng is seeded per rank) and DDP averages the
two ranks' gradients, so the 2-process round trains on twice the samples per step and its merged
weights, patch and answers are not the 1-process round's.  So the test checks that both learn
(rank 0's CE falls over the round), both ship a patch that changes the device's answers, and
their final losses agree within 25 % (as tests/cloud/test_akd_multiprocess.py does for AKD alone).

FSDP needs GPUs: here only the command line is checked, parsed by accelerate's own launcher parser.
"""
from __future__ import annotations

import base64
import time
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from cloud.launch import LaunchOptions, launch_command
from device.contracts.config import ASSETS_DIR, load_settings

DEFAULT = ASSETS_DIR / "default"


def _parse(cmd: list[str]):
    from accelerate.commands.launch import launch_command_parser

    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    return launch_command_parser().parse_args(cmd[3:])


def test_the_launch_flags_reach_accelerates_launcher(tmp_path: Path) -> None:
    ddp = _parse(launch_command(LaunchOptions(processes=2), tmp_path, port=29611))
    assert ddp.num_processes == 2 and ddp.multi_gpu and not ddp.use_fsdp
    assert ddp.module and ddp.training_script == "cloud.launch" and ddp.training_script_args == [str(tmp_path)]
    assert ddp.main_process_port == 29611
    fsdp = _parse(launch_command(LaunchOptions(processes=4, fsdp=True), tmp_path))
    assert fsdp.use_fsdp and fsdp.num_processes == 4 and fsdp.fsdp_sharding_strategy == "FULL_SHARD"
    assert fsdp.fsdp_use_orig_params == "true" and fsdp.fsdp_state_dict_type == "FULL_STATE_DICT"
    cfg = tmp_path / "accelerate.yaml"
    cfg.write_text("distributed_type: FSDP\n")
    own = _parse(launch_command(LaunchOptions(config_file=cfg), tmp_path))
    assert own.config_file == str(cfg) and own.num_processes is None  # the file says how many
    assert LaunchOptions().in_process and not LaunchOptions(config_file=cfg).in_process


def test_worker_flags_become_the_runners_launch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`cdcca cloud worker --train-processes 2 --fsdp --accelerate-config F` -> the runner's
    LaunchOptions (no worker loop runs: run_worker is captured, run_round stubbed)."""
    import cloud.round_job as round_job
    import cloud.worker as worker
    from cdcca_cli.main import app

    captured: dict = {}
    monkeypatch.setattr(worker, "run_worker", lambda settings, runner, stop: captured.update(runner=runner))
    monkeypatch.setattr(round_job, "run_round", lambda ctx, registry, assets, akd, launch: captured.update(launch=launch))
    cfg = tmp_path / "acc.yaml"
    cfg.write_text("distributed_type: FSDP\n")
    res = CliRunner().invoke(app, ["cloud", "worker", "--train-processes", "2", "--fsdp",
                                   "--accelerate-config", str(cfg)])
    assert res.exit_code == 0, res.output
    captured["runner"](object())
    assert captured["launch"] == LaunchOptions(processes=2, config_file=cfg, fsdp=True)
    monkeypatch.setenv("CDCCA_TRAIN_PROCESSES", "3")  # the same knob from the environment
    assert LaunchOptions.from_settings(load_settings()).processes == 3


def _round(home: Path, processes: int, steps: int = 16) -> tuple[dict, dict, float]:
    """One real round on the shipped default through Worker.run_once; returns the round's
    metrics, the base and new model files, and its wall time."""
    from cloud.registry import ModelRegistry
    from cloud.round_job import HFAssets, run_round
    from cloud.store import Store
    from cloud.worker import Worker
    from device.contracts.dataset import read_llava
    from device.contracts.image import encode_png, load_image
    from device.contracts.wire import RoundOptions, RoundRequest, TokenStats, UplinkSample

    settings = load_settings(home=home, train_processes=processes)
    registry = ModelRegistry(settings.cloud_dir / "models")
    mid = registry.put({"model": DEFAULT / "student-q4_0.gguf", "mmproj": DEFAULT / "mmproj-f32.gguf"})
    drift = [q for q in read_llava(DEFAULT / "data" / "eval.json") if q.meta.get("domain") == "noise"][:16]
    store = Store(settings)
    try:
        store.add_device("lap")
        store.add_samples("lap", [UplinkSample(
            sample_id=f"{i:016x}", base_model=mid, prompt=q.question, answer="",
            image=base64.b64encode(encode_png(load_image(q.image, 32))), image_format="png",
            tokens=TokenStats(positions=[0], token_ids=[1], entropy=[1.0]), score=0.5, raw_bytes=10)
            for i, q in enumerate(drift)])
        rid = store.create_round("lap", RoundRequest(base_model=mid, options=RoundOptions(seed=0, steps=steps))).round_id
        assets = HFAssets(DEFAULT / "teacher", DEFAULT / "data" / "replay.json", DEFAULT / "data" / "eval.json",
                          eval_limit=8, replay_limit=256, probe_n=4)
        launch = LaunchOptions.from_settings(settings)
        t0 = time.time()
        assert Worker(store, lambda ctx: run_round(ctx, registry, assets, launch=launch), settings).run_once() == rid
        seconds = time.time() - t0
        done = store.get_round(rid)
        assert done.state == "done", done.message
        return done.metrics, {"base": registry.get(mid), "new": registry.get(done.metrics["new_model"])}, seconds
    finally:
        store.close()


def _answers(files: dict[str, Path], n: int = 16) -> list[str]:
    from device.contracts.dataset import read_llava
    from device.evaluate import evaluate
    from device.runtime import Runtime, RuntimeConfig

    qas = [q for q in read_llava(DEFAULT / "data" / "eval.json") if q.meta.get("domain") == "noise"][:n]
    with Runtime(RuntimeConfig(files["model"], files.get("mmproj"), n_threads=1)) as rt:
        return evaluate(rt, qas)["answers"]


@pytest.mark.timeout(900)
def test_a_round_trains_on_two_gloo_processes_like_on_one(tmp_path: Path, assets) -> None:
    one, files1, t1 = _round(tmp_path / "one", 1)
    two, files2, t2 = _round(tmp_path / "two", 2)
    a1, a2 = one["akd"], two["akd"]
    print(f"1 process: loss {a1['loss']:.4f}, CE {a1['ce_first']:.4f} -> {a1['ce_last']:.4f}, training "
          f"{a1['train_seconds']:.1f} s, round {t1:.1f} s, patch {one['dwc']['patch_file_bytes']} B; "
          f"2 processes: loss {a2['loss']:.4f}, CE {a2['ce_first']:.4f} -> {a2['ce_last']:.4f}, training "
          f"{a2['train_seconds']:.1f} s, round {t2:.1f} s, patch {two['dwc']['patch_file_bytes']} B")
    assert a1["processes"] == 1 and a2["processes"] == 2
    for m in (one, two):
        assert m["akd"]["ce_last"] < m["akd"]["ce_first"], "the adapters did not learn"
        assert m["dwc"]["rows_patched"] > 0 and m["new_model"] != files1["base"]["model"].parent.name
    assert abs(a2["loss"] - a1["loss"]) <= 0.25 * a1["loss"]
    base = _answers(files1["base"])
    for files in (files1, files2):
        assert _answers(files["new"]) != base, "the patch did not change what the device answers"
    assert files1["new"]["model"].read_bytes() != files2["new"]["model"].read_bytes()  # per-rank batches


@pytest.mark.timeout(300)
def test_cancel_kills_every_rank(tmp_path: Path, assets) -> None:
    """A cancel seen while the launch runs ends the launcher and both ranks (the worker's
    heartbeat sets the flag; here the first relayed step does)."""
    import numpy as np

    from cloud.akd import AKDConfig, DistillSet
    from cloud.families import family_for
    from cloud.families.teacher import Teacher
    from cloud.launch import train

    files = {"model": DEFAULT / "student-q4_0.gguf", "mmproj": DEFAULT / "mmproj-f32.gguf"}
    twin = family_for(files["model"], files["mmproj"]).load_twin(files["model"], files["mmproj"])
    img = load_image_default()
    dset = DistillSet(np.stack([img] * 4), ["what colour is the shape?"] * 4, ["red"] * 4, [[0]] * 4)
    steps: list[int] = []
    # processes this test process already had (e.g. multiprocessing's resource tracker, started by an
    # earlier test in the same worker) are not the launch's
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(InterruptedError):
        train(twin, files, Teacher(DEFAULT / "teacher"), dset, None, AKDConfig(steps=500, batch_size=4),
              lambda i, _t: steps.append(i), lambda: bool(steps), tmp_path, LaunchOptions(processes=2))
    assert steps, "no step was relayed before the cancel"
    time.sleep(0.5)
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before and p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"still running after cancel: {[p.cmdline()[:4] for p in left]}"
    assert not (tmp_path / "train" / "merged.pt").exists()


def load_image_default():
    from device.contracts.dataset import read_llava
    from device.contracts.image import load_image

    return load_image(read_llava(DEFAULT / "data" / "eval.json")[0].image, 32)


@pytest.mark.timeout(300)
def test_a_failed_launch_says_why_in_one_line(tmp_path: Path, assets) -> None:
    """A rank that dies (here: the teacher checkpoint is gone) fails the round with the rank's
    own exception, not the launcher's summary."""
    import numpy as np

    from cloud.akd import AKDConfig, DistillSet
    from cloud.launch import train

    class Gone:
        path = tmp_path / "no-teacher"

    files = {"model": DEFAULT / "student-q4_0.gguf", "mmproj": DEFAULT / "mmproj-f32.gguf"}
    dset = DistillSet(np.stack([load_image_default()] * 2), ["q"] * 2, ["a"] * 2, [[0]] * 2)
    with pytest.raises(RuntimeError, match=r"accelerate launch exited 1: .*(Error|Exception).*no-teacher") as err:
        train(None, files, Gone(), dset, None, AKDConfig(steps=2), None, None, tmp_path, LaunchOptions(processes=2))
    assert "\n" not in str(err.value) and "ChildFailedError" not in str(err.value)
