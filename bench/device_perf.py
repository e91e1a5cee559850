"""Section 3 -- device performance: llama.cpp decode speed per GGUF type vs the torch twin, a
memory-bandwidth bound beside it, the cost of reading full logits for uncertainty, and patch
apply + reload vs replacing the whole model.  The torch row is the cloud's own twin, rebuilt from the
device's f32 GGUF pair through the family seam (cloud.families)."""
from __future__ import annotations

import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np

from device.contracts.patch_format import read_patch
from device.runtime import Runtime, RuntimeConfig
from device.uncertainty import UncertaintyRecorder
from device.versions import VersionStore

from .common import Context, Section
from .table import Table, na, num

QUANTS = ("q4_0", "q8_0", "f32")
THREADS = 1
MAX_TOKENS = 16
PROMPT_SEED = 4000  # scene generator seed of the speed prompts (disjoint from streams, eval and training)


def prompts(n: int, seed: int = PROMPT_SEED):
    """``n`` generated (image, question) pairs over all domains and tasks (captions give the long
    answers); disjoint generator seed."""
    from cloud.zoo import scenes

    from .chats import DOMAINS

    per = max(1, -(-n // len(DOMAINS)))
    out = [(s.image, s.question) for d in DOMAINS for s in scenes.generate(d, per, seed)]
    return out[:n]


def memcpy_bandwidth(mib: int, reps: int = 5) -> float:
    """Bytes/s of a large numpy copy, counting read + write traffic (2 x size / time), best of ``reps``."""
    a = np.ones(mib << 20, dtype=np.uint8)
    b = np.empty_like(a)
    best = min(_timed(lambda: np.copyto(b, a)) for _ in range(reps))
    return 2 * a.nbytes / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def weight_bytes_per_token(path: Path) -> int:
    """Bytes of text-model weights one decode step reads: every tensor, except that the token
    embedding table contributes only the one row it gathers."""
    import gguf

    total = 0
    for t in gguf.GGUFReader(str(path), "r").tensors:
        rows = int(np.prod([int(x) for x in t.shape[1:]])) or 1
        total += int(t.n_bytes) // rows if t.name == "token_embd.weight" else int(t.n_bytes)
    return total


def llama_speed(model: Path, mmproj: Path, ps, reps: int, hook: bool = False) -> dict:
    with Runtime(RuntimeConfig(model, mmproj, n_threads=THREADS)) as rt:
        for img, q in ps[:3]:  # warm-up
            rt.generate(q, img, MAX_TOKENS)
        return _llama_pass(rt, ps, reps, hook)


def _llama_pass(rt, ps, reps: int, hook: bool) -> dict:
    tok, dec, pre, answers = 0, 0.0, 0.0, []
    for _ in range(reps):
        for img, q in ps:
            g = rt.generate(q, img, MAX_TOKENS, logits_hook=UncertaintyRecorder() if hook else None)
            tok += len(g.token_ids)
            dec += g.decode_s
            pre += g.prefill_s
            answers.append(g.text)
    n = reps * len(ps)
    return {"tokens": tok, "decode_s": dec, "prefill_s": pre, "decode_tps": tok / dec, "prefill_ms": 1e3 * pre / n,
            "e2e_tps": tok / (dec + pre), "answers": answers[: len(ps)]}


def torch_speed(model_path: Path, mmproj: Path, ps, reps: int) -> dict:
    """The cloud's torch twin of the same weights (``cloud.families.family_for`` rebuilds the HF model
    from the f32 GGUF pair, as a round does), greedy decode token by token with HF's KV cache: like
    llama.cpp's loop, 'prefill' is the prompt's forward (image tiles included) up to its logits and
    'decode' is one cached forward per generated token."""
    import torch

    from cloud.families import collate, family_for
    from device.contracts.image import decode_image

    from .chats import png_bytes

    torch.set_num_threads(THREADS)
    fam = family_for(model_path, mmproj)
    twin = fam.load_twin(model_path, mmproj)
    geo = twin.meta.get("geometry")
    eos = set(twin.meta.get("eos_ids") or ())
    model = twin.model.eval()
    exs = [fam.example(twin, q, decode_image(png_bytes(img), geo.image_size, "prompt") if geo else None)
           for img, q in ps]
    ntok, dec, pre, answers = 0, 0.0, 0.0, []
    with torch.no_grad():
        for b in (collate([e]) for e in exs[:3]):  # warm-up, as for llama.cpp
            model(**b, use_cache=True)
        for r in range(reps):
            for ex in exs:
                b = collate([ex])
                t0 = time.perf_counter()
                o = model(**b, use_cache=True)
                t1 = time.perf_counter()
                out = []
                for _ in range(MAX_TOKENS):
                    nxt = int(o.logits[0, -1].argmax())
                    if nxt in eos:
                        break
                    out.append(nxt)  # and one forward per kept token, as Runtime.generate decodes it
                    o = model(input_ids=torch.tensor([[nxt]]), past_key_values=o.past_key_values, use_cache=True)
                t2 = time.perf_counter()
                ntok += len(out)
                pre += t1 - t0
                dec += t2 - t1
                if r == 0:
                    answers.append(fam.decode(twin, out))
    n = reps * len(ps)
    return {"tokens": ntok, "decode_s": dec, "prefill_s": pre, "decode_tps": ntok / dec, "prefill_ms": 1e3 * pre / n,
            "e2e_tps": ntok / (dec + pre), "answers": answers, "family": fam.name}


def hook_overhead(model: Path, mmproj: Path, ps, reps: int) -> dict:
    """Tokens/s with the uncertainty recorder on every step vs without, alternating the order
    each repeat so drift in machine load hits both alike."""
    acc = {False: [0, 0.0], True: [0, 0.0]}
    with Runtime(RuntimeConfig(model, mmproj, n_threads=THREADS)) as rt:
        for img, q in ps[:3]:
            rt.generate(q, img, MAX_TOKENS)
        for r in range(max(2, reps)):
            for hook in ((False, True) if r % 2 == 0 else (True, False)):
                res = _llama_pass(rt, ps, 1, hook)
                acc[hook][0] += res["tokens"]
                acc[hook][1] += res["decode_s"]
    tps = {h: acc[h][0] / acc[h][1] for h in acc}
    return {"tps_without": tps[False], "tps_with": tps[True], "ratio": tps[True] / tps[False],
            "us_per_token": 1e6 * (acc[True][1] / acc[True][0] - acc[False][1] / acc[False][0]),
            "tokens": acc[True][0], "us_per_call_isolated": recorder_cost(rt.n_vocab),
            "n_vocab": rt.n_vocab}


def recorder_cost(n_vocab: int, calls: int = 2000) -> float:
    """µs per UncertaintyRecorder call on one step's logits, in a hot loop (no decoding between)."""
    x = np.random.default_rng(0).standard_normal(n_vocab).astype(np.float32)
    rec = UncertaintyRecorder()
    for _ in range(50):
        rec(x)
    t = time.perf_counter()
    for _ in range(calls):
        rec(x)
    return 1e6 * (time.perf_counter() - t) / calls


def _fsync_copy(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    with open(dst, "rb") as f:
        os.fsync(f.fileno())


def apply_vs_replace(work: Path, model: Path, mmproj: Path, patch: Path, reps: int) -> dict:
    """Patch: VersionStore.apply_patch (verify, journaled in-place write, commit) + Runtime.refresh
    (a reload only when the mmproj changed). Full replace: copy the whole new GGUF pair (fsynced)
    + Runtime.reload."""
    store = VersionStore(work / "perf-store", "bench")
    store.install_base(model, mmproj)
    base = store.paths(store.current())
    apply_s, reload_s, copy_s, reload_full_s = [], [], [], []
    with Runtime(RuntimeConfig(base.model, base.mmproj, n_threads=THREADS)) as rt:
        new = None
        for r in range(reps):
            res = store.apply_patch(patch)
            apply_s.append(res.seconds)
            roles = tuple(sorted({e.role for e in read_patch(patch).entries}))
            reload_s.append(rt.refresh(roles))
            new = res.paths
            copy = work / "perf-new"  # the patched pair, for the full-replace baseline below
            shutil.rmtree(copy, ignore_errors=True)
            copy.mkdir()
            for role, path in new.roles().items():
                shutil.copyfile(path, copy / path.name)
            store.rollback()
            rt.refresh(roles)
        new = type(new)(copy / new.model.name, copy / new.mmproj.name if new.mmproj else None)
        for r in range(reps):
            d = work / f"full-replace-{r}"
            d.mkdir(parents=True, exist_ok=True)
            t = time.perf_counter()
            _fsync_copy(new.model, d / "model.gguf")
            _fsync_copy(new.mmproj, d / "mmproj.gguf")
            fd = os.open(d, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
            copy_s.append(time.perf_counter() - t)
            reload_full_s.append(rt.reload(d / "model.gguf", d / "mmproj.gguf"))
    med = statistics.median
    return {"apply_s": med(apply_s), "reload_s": med(reload_s), "copy_s": med(copy_s), "reload_full_s": med(reload_full_s),
            "patch_bytes": patch.stat().st_size, "full_bytes": new.model.stat().st_size + new.mmproj.stat().st_size,
            "copy_method": res.copy_method}


def run(ctx: Context) -> Section:
    from device.models import bundled_files

    from .chats import DEVICE_QUANT

    p = ctx.profile
    sec = Section("device", "3. Device performance")
    md = ctx.model_dir
    mmproj = bundled_files(DEVICE_QUANT, md)[1]
    ps = prompts(p.perf_prompts)
    bw = memcpy_bandwidth(p.memcpy_mib)
    speed = {q: llama_speed(md / f"student-{q}.gguf", mmproj, ps, p.perf_reps) for q in QUANTS}
    speed["torch"] = torch_speed(md / "student-f32.gguf", mmproj, ps, p.perf_reps)
    wbytes = {q: weight_bytes_per_token(md / f"student-{q}.gguf") for q in QUANTS}
    wbytes["torch"] = wbytes["f32"]
    t = Table("decode", "Decode speed (1 thread, greedy, up to 16 answer tokens per prompt)", [
        "engine / weights", "answer tokens", "decode tokens/s", "prompt prefill ms", "end-to-end tokens/s",
        "weight bytes read per token", "bandwidth bound tokens/s", "measured / bound"])
    for key, label in (("q4_0", "llama.cpp q4_0 (device default)"), ("q8_0", "llama.cpp q8_0"),
                       ("f32", "llama.cpp f32"),
                       ("torch", f"torch HF twin ({speed['torch']['family']}, family seam), same f32 weights, KV cache")):
        s = speed[key]
        bound = bw / wbytes[key]
        t.add(label, [num(s["tokens"], "{:.0f}"), num(s["decode_tps"], "{:.0f}"), num(s["prefill_ms"], "{:.2f}"),
                      num(s["e2e_tps"], "{:.0f}"), num(wbytes[key], "{:,.0f}"), num(bound, "{:,.0f}"),
                      num(s["decode_tps"] / bound, "{:.2%}")])
    agree = float(np.mean([a == b for a, b in zip(speed["f32"]["answers"], speed["torch"]["answers"])]))
    t.notes = [
        f"{len(ps)} generated prompts (all domains and tasks) x {p.perf_reps} repeat(s) after 3 warm-up prompts; "
        "decode tokens/s = answer tokens / decode time (after the prompt's logits, one forward per generated token, "
        f"as in Runtime.generate); llama.cpp q4_0 answers average {speed['q4_0']['tokens'] / (p.perf_reps * len(ps)):.1f} "
        f"tokens (EOS or the {MAX_TOKENS}-token cap), hence many prompts.",
        f"Bandwidth bound = measured copy bandwidth {bw / 1e9:.1f} GB/s (numpy copy of {p.memcpy_mib} MiB, read + "
        "write, best of 5) / weight bytes read per token. These models (at most "
        f"{max(wbytes.values()) / 1e6:.2f} MB read per token) fit in the CPU caches, so DRAM bandwidth is not what "
        "limits them: per-token fixed costs (graph build, Python loop) are.",
        f"llama.cpp f32 and torch greedy answers agree on {100 * agree:.0f}% of the prompts (same weights).",
    ]
    sec.tables.append(t)

    hk = hook_overhead(md / "student-q4_0.gguf", mmproj, ps, p.perf_reps)
    t2 = Table("uncertainty_overhead", "Cost of exact per-token uncertainty (full-vocabulary logits every step)", [
        "q4_0 decode", "answer tokens", "tokens/s", "ratio vs without", "added µs per token"])
    t2.add("without logits hook", [num(hk["tokens"], "{:.0f}"), num(hk["tps_without"], "{:.0f}"), num(1.0, "{:.3f}"),
                                   num(0.0, "{:.1f}")])
    t2.add("with UncertaintyRecorder hook", [num(hk["tokens"], "{:.0f}"), num(hk["tps_with"], "{:.0f}"),
                                             num(hk["ratio"], "{:.3f}"), num(hk["us_per_token"], "{:.1f}")])
    t2.notes = [f"{max(2, p.perf_reps)} alternating passes over the same prompts each way (orders swapped every pass); "
                "target: ratio >= 0.90. The hook runs once per decode step, including the final step that yields "
                f"EOS. In a hot loop without decoding in between, one call costs {hk['us_per_call_isolated']:.0f} µs "
                f"(vocabulary {hk['n_vocab']}); the decode step of this model costs only "
                f"{1e6 / hk['tps_without']:.0f} µs, so the same absolute cost is a large fraction here and a small "
                "one on a model whose step takes milliseconds."]
    sec.tables.append(t2)
    ok = hk["ratio"] >= 0.9
    sec.findings.append(f"Uncertainty logging keeps {hk['ratio']:.1%} of the decode speed "
                        f"({'meets' if ok else 'MISSES'} the >= 90% target): it adds {hk['us_per_token']:.0f} µs per "
                        f"answer token to a {1e6 / hk['tps_without']:.0f} µs decode step.")
    if not ok:
        sec.not_beaten.append(sec.findings[-1])

    av = apply_vs_replace(ctx.work, md / "student-q4_0.gguf", mmproj, ctx.patch, max(3, p.perf_reps))
    t3 = Table("apply", "Installing an update on the device (median of repeats)", [
        "method", "bytes written", "install ms", "reload ms", "total ms"])
    t3.add("DWC patch: VersionStore.apply_patch + Runtime.refresh",
           [num(av["patch_bytes"], "{:,.0f}"), num(1e3 * av["apply_s"], "{:.1f}"), num(1e3 * av["reload_s"], "{:.1f}"),
            num(1e3 * (av["apply_s"] + av["reload_s"]), "{:.1f}")])
    t3.add("full replace: copy the whole GGUF pair (fsync) + Runtime.reload",
           [num(av["full_bytes"], "{:,.0f}"), num(1e3 * av["copy_s"], "{:.1f}"), num(1e3 * av["reload_full_s"], "{:.1f}"),
            num(1e3 * (av["copy_s"] + av["reload_full_s"]), "{:.1f}")])
    t3.notes = ["apply_patch verifies the patch against the current version, writes a delta record (old + new "
                "bytes) and a journal, writes the patched rows in place, and commits (CURRENT switch, fsyncs); "
                "Runtime.refresh is a KV clear when only the memory-mapped text model changed, a reload when the "
                "mmproj did (libmtmd copies its weights). The full replace only copies and fsyncs. 'bytes written' "
                "counts the payload that changes (patch file vs whole model)."]
    sec.tables.append(t3)
    tot_p, tot_f = av["apply_s"] + av["reload_s"], av["copy_s"] + av["reload_full_s"]
    s = (f"Patch install + reload takes {1e3 * tot_p:.0f} ms vs {1e3 * tot_f:.0f} ms for a full replace "
         f"({tot_p / tot_f:.2f}x).")
    sec.findings.append(s)
    if tot_p >= tot_f:
        sec.not_beaten.append(s + " The patch path is NOT faster on the device: at this model size its "
                              "verification and journaling cost more than copying the whole (tiny) model.")
    real_rows(sec, ctx)
    q4, fp = speed["q4_0"]["decode_tps"], speed["torch"]["decode_tps"]
    sec.findings.append(f"llama.cpp q4_0 decodes {q4:.0f} tokens/s vs {fp:.0f} for the torch twin ({q4 / fp:.1f}x).")
    if q4 <= fp:
        sec.not_beaten.append(sec.findings[-1])
    sec.data = {"speed": {k: {kk: vv for kk, vv in v.items() if kk != "answers"} for k, v in speed.items()},
                "bandwidth_Bps": bw, "weight_bytes": wbytes, "hook": hk, "apply": av, "f32_torch_agree": agree}
    return sec


def _goal(sec: Section, ok: bool, claim: str, goal: str, aside: str) -> None:
    """A finding measured against its goal; a miss also goes to the report's not-beaten list."""
    sec.findings.append(f"{claim} ({'meets' if ok else 'MISSES'} the {goal} goal; {aside}).")
    if not ok:
        sec.not_beaten.append(sec.findings[-1])


def real_rows(sec: Section, ctx: Context) -> None:
    """The real-GGUF rows (bench/device_real.py): in the full profile, or with CDCCA_BENCH_REAL=1."""
    from .device_real import REAL_EXTRA, run_real

    want = os.environ.get("CDCCA_BENCH_REAL", "1" if ctx.profile.name == "full" else "0") == "1"
    if not want:
        sec.notes.append("Real-GGUF rows skipped: opt-in outside the full profile (CDCCA_BENCH_REAL=1; "
                         f"needs {REAL_EXTRA}).")
        return
    r = run_real(ctx.work / "real")
    if "skipped" in r:
        sec.notes.append(f"Real-GGUF rows skipped: {r['skipped']}.")
        return
    t = Table("real_uncertainty", "Real GGUFs: decode with and without exact per-token uncertainty (1 thread)", [
        "model (prompt format, recorder)", "vocabulary", "CPU tokens/s without", "CPU tokens/s with", "CPU ratio",
        "added CPU µs per token", "wall ratio"])
    rows = [(n, h, "float32 (default)") for n, h in r["hook"].items()]
    rows += [(n, h, "float64 (exact=True)") for n, h in r.get("hook_exact", {}).items()]
    for name, h, rec in rows:
        t.add(f"{name} ({h['prompt_kind']}, {rec})", [num(h["n_vocab"], "{:,.0f}"), num(h["cpu_tps_without"], "{:.1f}"),
                     num(h["cpu_tps_with"], "{:.1f}"), num(h["cpu_ratio"], "{:.3f}"),
                     num(h["cpu_us_per_token"], "{:.0f}"), num(h["ratio"], "{:.3f}")])
    for name, h in r["hook"].items():
        _goal(sec, h["cpu_ratio"] >= 0.9, f"{name} ({h['n_vocab']:,}-token vocabulary): uncertainty keeps "
              f"{h['cpu_ratio']:.1%} of decode speed in CPU time", ">= 90%", f"wall-clock ratio {h['ratio']:.1%}")
    t.notes = ["Alternating passes (with/without, order swapped each pass) over the same prompts, up to 32 answer "
               "tokens each, in one process. 'CPU' = the decode thread's CPU time (time.thread_time; llama.cpp "
               "computes on the calling thread at 1 thread): stable when other jobs share the machine, where the "
               "wall-clock ratio is mostly their noise."]
    sec.tables.append(t)
    if r.get("vs_transformers"):
        t = Table("real_engines", "Real GGUFs: llama.cpp vs transformers decode, same weights (1 thread)", [
            "model", "llama.cpp CPU tokens/s", "transformers CPU tokens/s", "CPU ratio", "wall ratio"])
        for name, v in r["vs_transformers"].items():
            t.add(name, [num(v["llama_cpu_tps"], "{:.1f}"), num(v["transformers_cpu_tps"], "{:.1f}"),
                         num(v["cpu_speedup"], "{:.2f}"), num(v["speedup"], "{:.2f}")])
            _goal(sec, v["cpu_speedup"] >= 5, f"{name}: llama.cpp decodes {v['cpu_speedup']:.1f}x faster than "
                  "transformers in CPU time on the same weights", ">= 5x", f"wall-clock {v['speedup']:.1f}x")
        t.notes = ["Interleaved prompt by prompt (llama.cpp, then transformers' GGUF loader in float32 with its KV "
                   "cache, same prompt ids, 32 greedy steps), so both engines see the same machine load; 'CPU' = the "
                   "decoding thread's CPU time."]
        sec.tables.append(t)
    a = r["apply"]
    t = Table("real_apply", f"Real GGUF ({a['model']}, {a['model_bytes'] / 2**20:.0f} MiB): installing a patch", [
        "method", "seconds", "vs full replace", "bytes written"])
    t.add("journaled apply + hot refresh", [num(a["apply"] + a["refresh"], "{:.3f}"), num(a["ratio_hot"], "{:.3f}"),
                                             num(a["wchar"], "{:,.0f}")])
    t.add("journaled apply + reload", [num(a["apply"] + a["reload"], "{:.3f}"), num(a["ratio_reload"], "{:.3f}"),
                                        na("as above")])
    t.add("identity hash of the new version (once, on first use)", [num(a["identify"], "{:.3f}"), na("once"), num(0, "{:.0f}")])
    t.add("full replace: copy (fsync) + reload", [num(a["full_s"], "{:.3f}"), num(1.0, "{:.3f}"),
                                                  num(a["model_bytes"], "{:,.0f}")])
    t.notes = [f"Patch: {a['patch_bytes']:,} bytes ({a['payload_bytes']:,} payload) over two K-quant tensors, "
               "re-quantized by ggml. Bytes written = write() bytes of the process during apply (Linux "
               f"/proc/self/io wchar): the payload in place + the delta record ({a['journal_bytes']:,} B, old + new "
               f"bytes, kept for rollback) + journal and log = {a['wchar'] / max(1, a['patch_bytes']):.1f}x the patch."]
    sec.tables.append(t)
    _goal(sec, a["ratio_hot"] <= 0.1, f"Patch apply + hot refresh on a {a['model_bytes'] / 2**20:.0f} MiB GGUF takes "
          f"{a['ratio_hot']:.1%} of a full replace", "<= 10%", f"with a reload {a['ratio_reload']:.0%}")
    sec.data["real"] = r
