"""`cdcca sync`: one cloud round from the device's side.

upload pending queue -> make sure the cloud has this model -> request the round -> follow its
progress -> download the patch -> verify + atomic apply (new version) -> reload the runtime ->
evaluate on the device's held-out set -> report.  Each step is one call; the CLI and the TUI
both drive this function and only render its progress and report.
"""
from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from device.contracts.config import DEFAULT_MODEL_DIR, Settings
from device.contracts.wire import RoundOptions, RoundRequest
from device.evaluate import evaluate, load_eval_set
from device.models import DeviceModel, open_device_model
from device.queue import Queue
from device.runtime import Runtime, RuntimeConfig
from device.uplink import CloudClient, sync_queue

Stage = Callable[[str, float, str], None]
STAGES = ("measure", "upload", "distil", "compress", "download", "apply", "evaluate")
DEFAULT_EVAL = DEFAULT_MODEL_DIR / "eval" / "eval.json"


@dataclass
class SyncOptions:
    round: RoundOptions = field(default_factory=RoundOptions)
    evaluate: bool = True
    eval_path: Path = DEFAULT_EVAL
    eval_per_domain: int | None = 40
    timeout_s: float = 1800.0


@dataclass
class SyncReport:
    round_id: str = ""
    uploaded: int = 0
    duplicates: int = 0
    uplink_bytes: int = 0
    uplink_raw_bytes: int = 0
    downlink_bytes: int = 0
    full_gguf_bytes: int = 0
    full_fp16_delta_bytes: int = 0
    tensors_patched: int = 0
    rows_patched: int = 0
    version_before: str | None = None
    version_after: str | None = None
    apply_seconds: float = 0.0
    reload_seconds: float = 0.0
    round_seconds: float = 0.0
    accuracy_before: dict | None = None
    accuracy_after: dict | None = None
    cloud: dict = field(default_factory=dict)

    @property
    def uplink_ratio(self) -> float:
        return self.uplink_bytes / self.uplink_raw_bytes if self.uplink_raw_bytes else 0.0

    @property
    def downlink_ratio(self) -> float:
        return self.downlink_bytes / self.full_gguf_bytes if self.full_gguf_bytes else 0.0

    def to_dict(self) -> dict:
        return asdict(self) | {"uplink_ratio": self.uplink_ratio, "downlink_ratio": self.downlink_ratio}


def _check(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise InterruptedError("sync cancelled")


def _eval(model: DeviceModel, opts: SyncOptions, threads: int) -> dict | None:
    if not opts.evaluate or not Path(opts.eval_path).is_file():
        return None
    qas = load_eval_set(opts.eval_path, opts.eval_per_domain)
    with Runtime(RuntimeConfig(model.model, model.mmproj, n_threads=threads)) as rt:
        res = evaluate(rt, qas)
    res.pop("answers", None)
    return res


def run_sync(settings: Settings, client: CloudClient, opts: SyncOptions | None = None, quant: str | None = None,
             on_stage: Stage | None = None, cancel: threading.Event | None = None,
             reload: Callable[[DeviceModel], float] | None = None) -> SyncReport:
    """Run one round; ``reload`` (e.g. a live ChatSession's) is called with the new model."""
    opts = opts or SyncOptions()
    stage = on_stage or (lambda *_: None)
    rep = SyncReport()
    model = open_device_model(settings, quant=quant)
    if model.store is None:
        raise ValueError("sync needs the versioned device model (not --model files)")
    rep.version_before = model.version
    rep.full_gguf_bytes = sum(p.stat().st_size for p in model.files().values())
    stage("measure", 0.0, "measuring the current model on the held-out set")
    rep.accuracy_before = _eval(model, opts, settings.threads)
    stage("measure", 1.0, "")
    _check(cancel)

    stage("upload", 0.0, "uploading the device model if the cloud lacks it")
    client.ensure_model(model.id, model.files())
    with Queue(settings.device_dir / "queue.sqlite") as q:
        q.reset_sent_to_pending()
        sizes = {r.sample_id: (r.shipped_bytes, r.raw_bytes) for r in q.pending()}
        try:
            up = sync_queue(q, client, progress=False)
        except BaseException:
            q.reset_sent_to_pending()  # a failed upload leaves nothing marked "sent"
            raise
    acked = [i for i in up.acknowledged if i in sizes]
    rep.uploaded, rep.duplicates = len(up.accepted), len(up.duplicates)
    rep.uplink_bytes = sum(sizes[i][0] for i in acked)
    rep.uplink_raw_bytes = sum(sizes[i][1] for i in acked)
    stage("upload", 1.0, f"{rep.uploaded} new samples, {rep.duplicates} already there")

    _check(cancel)
    t0 = time.time()
    st = client.start_round(RoundRequest(base_model=model.id, options=opts.round))
    rep.round_id = st.round_id

    def progress(s):
        if cancel is not None and cancel.is_set():
            client.cancel_round(s.round_id)
            raise InterruptedError("sync cancelled")
        name = {"load": "distil", "label": "distil", "evaluate": "compress", "done": "compress"}.get(s.stage, s.stage)
        stage(name if name in STAGES else "distil", s.progress, f"[{s.round_id}] {s.message}")

    st = client.wait_round(st.round_id, on_progress=progress, timeout=opts.timeout_s)
    rep.round_seconds = time.time() - t0
    if st.state != "done":
        raise RuntimeError(f"round {st.round_id} {st.state}: {st.message}")
    rep.cloud = st.metrics
    dwc = st.metrics.get("dwc", {})
    rep.full_fp16_delta_bytes = int(dwc.get("full_fp16_delta_bytes", 0))
    rep.tensors_patched, rep.rows_patched = int(dwc.get("tensors_patched", 0)), int(dwc.get("rows_patched", 0))

    _check(cancel)
    stage("download", 0.0, "downloading the patch")
    dest = settings.device_dir / "patches" / f"{st.round_id}.gguf"
    dest.parent.mkdir(parents=True, exist_ok=True)
    got = client.download_patch(st.round_id, dest)
    rep.downlink_bytes = got.bytes
    _check(cancel)
    stage("apply", 0.0, "verifying and applying the patch")
    res = model.store.apply_patch(dest)
    rep.apply_seconds, rep.version_after = res.seconds, res.version.id
    new_model = open_device_model(settings, quant=quant)
    if reload is not None:
        rep.reload_seconds = reload(new_model)
    else:
        t = time.perf_counter()
        Runtime(RuntimeConfig(new_model.model, new_model.mmproj, n_threads=settings.threads)).close()
        rep.reload_seconds = time.perf_counter() - t
    stage("evaluate", 0.0, "measuring the patched device model")
    rep.accuracy_after = _eval(new_model, opts, settings.threads)
    stage("evaluate", 1.0, "done")
    return rep
