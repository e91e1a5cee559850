"""Section 2 -- the paper's Table 5: uplink and downlink bytes and transfer times, measured over
loopback HTTP against the real cloud server (a LoopbackCloud, nothing added to it)."""
from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

import httpx
import numpy as np

from cloud.loopback import LoopbackCloud
from device.contracts.config import load_settings
from device.contracts.wire import RoundOptions, RoundRequest, UploadRequest
from device.uplink import CloudClient

from .common import BUDGET_KIB, Context, Section
from .synth import synthetic_sample
from .table import Table, num

BATCH = 32  # samples per upload request (CloudClient.upload's default)


def raw_payload(chat) -> bytes:
    """The no-selection uplink of one chat, byte for byte the size of device/uts.raw_bytes: the image
    file, prompt, answer, fp32 visual tokens and an fp32 full-vocabulary distribution per answer
    token.  (The device keeps 4 numbers per step, not the distributions, so those bytes are
    filled with seeded random floats: the transfer does not depend on the values.)"""
    rec = chat.record
    vis = np.asarray(rec.visual_embeddings, dtype=np.float32).tobytes() if rec.visual_embeddings is not None else b""
    n = len(rec.answer_token_ids) * rec.vocab_size
    dist = np.random.default_rng(n).random(n, dtype=np.float32).tobytes()
    out = (rec.image_bytes or b"") + rec.prompt.encode() + rec.answer.encode() + vis + dist
    if len(out) != chat.raw_bytes:
        raise AssertionError(f"raw payload {len(out)} B != raw_bytes {chat.raw_bytes} B")
    return out


def _batches(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _time_posts(http: httpx.Client, bodies: list[bytes], ctype: str, expect: int) -> float:
    t = time.perf_counter()
    for b in bodies:
        r = http.post("/v1/samples", content=b, headers={"Content-Type": ctype})
        if r.status_code != expect:
            raise RuntimeError(f"upload answered {r.status_code}, expected {expect}: {r.text[:200]}")
    return time.perf_counter() - t


def run(ctx: Context) -> Section:
    p = ctx.profile
    stream = ctx.stream
    sec = Section("transmission", "2. Transmission (paper Table 5)")
    settings = load_settings(home=ctx.work / "transmission-home")
    blob = {}

    def runner(rctx):  # a round whose "patch" is the blob under test: real GET /patch downloads
        shutil.copyfile(blob["path"], rctx.patch_path)
        return {"bench_blob": str(blob["path"].name)}

    cloud = LoopbackCloud(settings, runner=runner).start()
    try:
        up = _uplink(cloud, stream, p.transfer_reps)
        down = _downlink(cloud, ctx, blob, p.transfer_reps)
    finally:
        cloud.stop()
    t = Table("transmission", "Bytes and loopback transfer time, UTS/DWC vs baselines", [
        "direction: payload", "bytes", "bytes vs baseline", "time ms (median)", "time vs baseline", "MB/s"])
    for group in (up, down):
        base = group[0]
        for label, b, secs in group:
            t.add(label, [num(b, "{:,.0f}"), num(b / base[1], "{:.3%}"), num(1e3 * secs, "{:.1f}"),
                          num(secs / base[2], "{:.3f}"), num(b / secs / 1e6, "{:.1f}")])
    n, k = len(stream.chats), len(stream.kept_samples)
    t.notes = [
        f"Uplink: the drift stream of seed {stream.seed} ({n} chats answered by the device), of which UTS kept {k}. Raw = every chat's no-selection payload (image file + "
        "text + fp32 visual tokens + fp32 full-vocabulary distribution per answer token, the formula of device/uts.py) "
        f"sent as binary bodies of {BATCH} chats to POST /v1/samples, which reads each body fully and answers 422 "
        "(not a sample), so raw times EXCLUDE the server's storage work; UTS = the kept samples as UploadRequest "
        f"JSON in batches of {BATCH}, validated and stored (fsync) by the server. Each repeat stores them under a fresh "
        "device, so no repeat is answered as a duplicate.",
        "Downlink: three real files served by the cloud's GET /v1/rounds/{id}/patch and fetched with "
        "CloudClient.download_patch (streamed, sha256-verified, fsynced): the device's full GGUF pair (what a full "
        "model replace ships), the fp16 delta of every changed tensor of seed "
        f"{stream.seed}'s merged CDCCA update (family seam: AKD on the HF twin), and its DWC patch at the "
        f"{BUDGET_KIB} budget (a bench round runner hands each file to the server as the round's patch).",
        f"Times: median of {p.transfer_reps} repeat(s) over loopback on this machine, so they measure per-byte and "
        "per-request costs of the stack, not a real network; the byte ratios are what a real link would see.",
    ]
    sec.tables.append(t)
    sec.findings += [
        f"Uplink: UTS sends {up[2][1]:,} B instead of {up[0][1]:,} B for the same {n} chats "
        f"({up[2][1] / up[0][1]:.3%}; paper: 31.10 MB -> 65.54 KB = 0.21% on its much larger model), in "
        f"{up[2][2] / up[0][2]:.2f}x the time.",
        f"Downlink: the DWC patch is {down[2][1]:,} B, {down[2][1] / down[0][1]:.2%} of the full GGUF pair and "
        f"{down[2][1] / down[1][1]:.2%} of the fp16 delta (paper: 14.48 GB -> 0.791 MB, 0.005%, on a 7B-scale model "
        "where the full model is ~10^4x the update budget; here the whole device model is under 1 MB).",
    ]
    if up[2][2] >= up[0][2]:
        s = "UTS uplink time is NOT lower than the raw uplink's on loopback (request overheads dominate)."
        sec.findings.append(s)
        sec.not_beaten.append(s)
    if down[2][2] >= down[0][2]:
        s = "The DWC patch download is NOT faster than the full GGUF download on loopback."
        sec.findings.append(s)
        sec.not_beaten.append(s)
    sec.data = {"uplink": up, "downlink": down}
    return sec


def _uplink(cloud, stream, reps: int) -> list[tuple[str, int, float]]:
    raw_all = [raw_payload(c) for c in stream.chats]
    raw_kept = [raw_payload(c) for c in stream.chats if c.kept]
    uts = stream.kept_samples
    rows = []
    times = {"raw": [], "kept": [], "uts": []}
    for r in range(reps):
        token = cloud.add_device(f"tx-up-{r}")
        with httpx.Client(base_url=cloud.url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as http:
            times["raw"].append(_time_posts(http, [b"".join(b) for b in _batches(raw_all, BATCH)],
                                            "application/octet-stream", 422))
            times["kept"].append(_time_posts(http, [b"".join(b) for b in _batches(raw_kept, BATCH)],
                                             "application/octet-stream", 422))
            bodies = [UploadRequest(samples=b).model_dump_json().encode() for b in _batches(uts, BATCH)]
            times["uts"].append(_time_posts(http, bodies, "application/json", 200))
    rows.append(("uplink: raw, every chat (no selection)", sum(map(len, raw_all)), statistics.median(times["raw"])))
    rows.append(("uplink: UTS sample stage only (kept chats, raw payload)", sum(map(len, raw_kept)),
                 statistics.median(times["kept"])))
    rows.append(("uplink: **UTS** (kept chats, token-stage payload)", sum(len(s.model_dump_json()) for s in uts),
                 statistics.median(times["uts"])))
    return rows


def _downlink(cloud, ctx: Context, blob: dict, reps: int) -> list[tuple[str, int, float]]:
    from device.models import bundled_files

    from .chats import DEVICE_QUANT

    full = ctx.work / "full-gguf-pair.bin"
    with open(full, "wb") as f:
        for p in bundled_files(DEVICE_QUANT, ctx.model_dir):
            f.write(Path(p).read_bytes())
    items = [("downlink: full GGUF pair (model q4_0 + mmproj f32)", full),
             ("downlink: full fp16 delta of the merged update", ctx.delta),
             (f"downlink: **DWC patch** ({BUDGET_KIB} budget)", ctx.patch)]
    token = cloud.add_device("tx-down")
    client = CloudClient(cloud.url, token, retries=2, backoff=0.1)
    rows = []
    try:
        for i, (label, path) in enumerate(items):
            blob["path"] = path
            client.upload([synthetic_sample("tx-down", i)], progress=False)  # a round needs an unused sample
            st = client.start_round(RoundRequest(base_model="0" * 16, options=RoundOptions(max_samples=1)))
            st = client.wait_round(st.round_id, poll=0.02, timeout=120)
            if st.state != "done":
                raise RuntimeError(f"bench round {st.round_id} {st.state}: {st.message}")
            times = []
            for r in range(reps):
                t = time.perf_counter()
                got = client.download_patch(st.round_id, ctx.work / "downloads" / f"{i}-{r}.bin")
                times.append(time.perf_counter() - t)
                if got.bytes != path.stat().st_size:
                    raise RuntimeError(f"downloaded {got.bytes} B of {path.name}, expected {path.stat().st_size}")
            rows.append((label, path.stat().st_size, statistics.median(times)))
    finally:
        client.close()
    return rows
