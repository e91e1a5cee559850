"""`cdcca sync`: one cloud round from the device's side.

check the token and that there is something to learn from (one request, before any slow work) ->
measure the current model -> upload pending queue -> make sure the cloud has this model -> request the round -> follow its
progress -> download the patch -> verify + atomic apply (new version) -> load it once: smoke
test, reload, evaluation on the device's held-out set all on that load -> report.  Each step is
one call; the CLI and the TUI both drive this function and only render its progress and report.
"""
from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from pydantic import ValidationError

from device.contracts.config import DEFAULT_MODEL_DIR, Settings
from device.contracts.round_metrics import STAGES, RoundMetrics, face_progress
from device.contracts.patch_format import PatchError
from device.contracts.signing import SignatureError, verify_patch
from device.contracts.wire import RoundOptions, RoundRequest, RoundStatus
from device.evaluate import evaluate, load_eval_set
from device.models import DeviceModel, open_device_model
from device.preflight import NothingToLearn, preflight
from device.queue import Queue
from device.resume import clear_inflight, follow, load_inflight, release, sync_lock
from device.runtime import Runtime, RuntimeConfig, reuse_or_open
from device import eval_cache
from device.smoke import open_tested
from device.trust import private_dir, trusted_key
from device.queue_sync import sync_queue
from device.uplink import MAX_PATCH_BYTES, CloudClient, CloudError
from device.versions import VersionError

Stage = Callable[[str, float, str], None]
__all__ = ["STAGES", "NothingToLearn", "SyncOptions", "SyncReport", "run_sync"]
DEFAULT_EVAL = DEFAULT_MODEL_DIR / "data" / "eval.json"  # the default build manifest's data.eval
INCOMING_PATCH = "incoming.gguf"  # the one patch being downloaded/applied (one sync at a time)


class PatchRefused(RuntimeError):
    """The round's patch was not taken (bad signature, refused by the store, failed smoke test):
    the device is on its previous version and the round was released on the cloud."""


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
    resumed: bool = False  # the round was already in flight (an earlier sync broke off)
    samples_learned: int = 0  # what the round trained on (samples uploaded by earlier syncs count)
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
    cloud: RoundMetrics = field(default_factory=RoundMetrics)

    @property
    def uplink_ratio(self) -> float:
        return self.uplink_bytes / self.uplink_raw_bytes if self.uplink_raw_bytes else 0.0

    @property
    def downlink_ratio(self) -> float:
        return self.downlink_bytes / self.full_gguf_bytes if self.full_gguf_bytes else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cloud"] = self.cloud.model_dump()
        return d | {"uplink_ratio": self.uplink_ratio, "downlink_ratio": self.downlink_ratio}


def _check(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise InterruptedError("sync cancelled")


def _eval(model: DeviceModel, opts: SyncOptions, threads: int, device_dir: Path,
          runtime: Runtime | None = None) -> tuple[dict | None, bool]:
    """(accuracy, reused): measured by llama.cpp (on ``runtime`` when one is loaded on ``model``
    already; it stays open), or read back when these exact model bytes were measured on this
    exact eval set before (device.eval_cache)."""
    if not opts.evaluate or not Path(opts.eval_path).is_file():
        return None, False
    key = eval_cache.cache_key(model.id, Path(opts.eval_path), opts.eval_per_domain)
    hit = eval_cache.load(device_dir, key)
    if hit is not None:
        return hit, True
    qas = load_eval_set(opts.eval_path, opts.eval_per_domain)
    with reuse_or_open(runtime, RuntimeConfig(model.model, model.mmproj, n_threads=threads)) as rt:
        res = evaluate(rt, qas)
    res.pop("answers", None)
    eval_cache.save(device_dir, key, res, model.version)
    return res, False


def run_sync(settings: Settings, client: CloudClient, opts: SyncOptions | None = None, quant: str | None = None,
             on_stage: Stage | None = None, cancel: threading.Event | None = None,
             reload: Callable[[DeviceModel], float] | None = None) -> SyncReport:
    """Run one round (or finish the one in flight); ``reload`` (e.g. a live ChatSession's) is
    called with the new model.  One sync at a time per device (an flock in the device dir)."""
    opts = opts or SyncOptions()
    with sync_lock(settings.device_dir):
        return _run_locked(settings, client, opts, quant, on_stage or (lambda *_: None), cancel, reload)


def _run_locked(settings: Settings, client: CloudClient, opts: SyncOptions, quant: str | None, stage: Stage,
                cancel: threading.Event | None, reload: Callable[[DeviceModel], float] | None) -> SyncReport:
    rep = SyncReport()
    model = open_device_model(settings, quant=quant)
    if model.store is None:
        raise ValueError("sync needs the versioned device model (not --model files)")
    rep.version_before = model.version
    rep.full_gguf_bytes = sum(p.stat().st_size for p in model.files().values())
    key = trusted_key(settings.device_dir, client.health().signing_key)
    rec = load_inflight(settings.device_dir)
    if rec is not None and rec.base_model != model.id:  # the device moved on (rollback, switch)
        release(client, settings.device_dir, rec.round_id)
        rec = None
    stage("check", 0.0, "checking the token and the samples to learn from")
    pending = preflight(settings, client) if rec is None else 0  # a round in flight has its samples
    stage("check", 1.0, f"resuming round {rec.round_id}" if rec else f"{pending} samples to upload")
    _check(cancel)
    stage("measure", 0.0, "measuring the current model on the held-out set")
    rep.accuracy_before, reused = _eval(model, opts, settings.threads, settings.device_dir)
    stage("measure", 1.0, f"measured before on these exact bytes ({model.version}): reused" if reused else "")
    _check(cancel)
    _upload(settings, client, model, rep, stage)

    _check(cancel)
    t0 = time.time()

    def progress(s):
        if cancel is not None and cancel.is_set():
            client.cancel_round(s.round_id)
            clear_inflight(settings.device_dir)  # the user ended it: nothing to resume
            raise InterruptedError("sync cancelled")
        stage(*face_progress(s.stage, s.progress), s.message)

    request = RoundRequest(base_model=model.id, options=opts.round)
    st, rep.resumed = follow(client, settings.device_dir, request, rec, progress, opts.timeout_s,
                             on_restart=lambda rid: stage("distil", 0.0, f"round {rid} ended without a patch; starting a new one"))
    rep.round_id = st.round_id
    rep.round_seconds = time.time() - t0
    rep.cloud = _metrics(st.metrics)
    dwc = rep.cloud.dwc
    rep.samples_learned = rep.cloud.samples or st.n_samples
    rep.full_fp16_delta_bytes = dwc.full_fp16_delta_bytes
    rep.tensors_patched, rep.rows_patched = dwc.tensors_patched, dwc.rows_patched

    _check(cancel)
    new_model, rt, load_s = _downlink(settings, client, model, st, key, opts, quant, rep, stage, cancel)
    try:  # rt: the new version, loaded once by the smoke test; the evaluation runs on it too
        # a live session (the TUI's) reloads itself; otherwise that load is the reload
        rep.reload_seconds = reload(new_model) if reload is not None else load_s
        stage("evaluate", 0.0, "measuring the patched device model")
        rep.accuracy_after, _ = _eval(new_model, opts, settings.threads, settings.device_dir, rt)
    finally:
        rt.close()
    stage("evaluate", 1.0, "done")
    return rep


def _metrics(raw: dict) -> RoundMetrics:
    """The cloud's round metrics are for the report only: malformed ones are dropped, never a
    reason to refuse a good patch or to print a validation traceback."""
    try:
        return RoundMetrics.model_validate(raw)
    except ValidationError:
        return RoundMetrics()


def _upload(settings: Settings, client: CloudClient, model: DeviceModel, rep: SyncReport, stage: Stage) -> None:
    stage("upload", 0.0, "uploading the device model if the cloud lacks it")
    client.ensure_model(model.id, model.files())
    with Queue(settings.queue_path) as q:
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


def patch_cap(opts: RoundOptions) -> int:
    """Most bytes the device downloads for one patch: the payload budget plus generous room for
    the GGUF header and entry table; anything bigger is refused mid-stream."""
    return min(MAX_PATCH_BYTES, 2 * opts.downlink_budget_bytes + (1 << 20))


def _downlink(settings: Settings, client: CloudClient, model: DeviceModel, st: RoundStatus, key: str | None,
              opts: SyncOptions, quant: str | None, rep: SyncReport, stage: Stage,
              cancel: threading.Event | None) -> tuple[DeviceModel, Runtime, float]:
    """Download, authenticate, apply, smoke-test.  Any refusal leaves the device on its current
    version, releases the round on the cloud (its samples become usable again) and raises one line.
    Returns (new model, the runtime the smoke test loaded it in -- the caller closes it --, seconds
    that load took)."""
    store, rid = model.store, st.round_id
    if rep.resumed and store.current().round_id == rid:
        new_model = model  # applied before a crash cleared the record: only the smoke test is left
        rep.version_after = new_model.version
    else:
        stage("download", 0.0, "downloading the patch")
        dest = settings.device_dir / "patches" / INCOMING_PATCH  # named by the device, never by the cloud
        private_dir(dest.parent)
        try:
            got = client.download_patch(rid, dest, max_bytes=patch_cap(opts.round))
            rep.downlink_bytes = got.bytes
            if key is not None:
                verify_patch(key, got.signature, got.sha256, rid, model.id)
            _check(cancel)
            stage("apply", 0.0, "verifying and applying the patch")
            res = store.apply_patch(dest)
        except (SignatureError, PatchError, VersionError) as exc:
            release(client, settings.device_dir, rid)
            raise PatchRefused(f"{exc}; the device stays on {model.version}") from None
        except CloudError as exc:
            if exc.status in (404, 409, 410):  # the cloud no longer has this patch: stop resuming it
                release(client, settings.device_dir, rid)
            raise
        finally:
            dest.unlink(missing_ok=True)
        rep.apply_seconds, rep.version_after = res.seconds, res.version.id
        new_model = open_device_model(settings, quant=quant)
    stage("apply", 0.5, "smoke-testing the new version")
    rt, smoke, load_s = open_tested(new_model, model, settings.threads)
    if not smoke.ok:
        back = store.rollback()
        release(client, settings.device_dir, rid)
        raise PatchRefused(f"the patch of round {rid} failed the smoke test ({smoke.reason}); "
                           f"rolled back to {back.id}")
    clear_inflight(settings.device_dir)
    stage("apply", 1.0, f"now on {rep.version_after}")
    return new_model, rt, load_s
