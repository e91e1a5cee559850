"""Device apply: verify-before-write, in-place journaled versions, rollback and roll-forward, the
load-time hash check, crash safety (a kill at every step, 30 random SIGKILLs), O(patch) cost, and
llama.cpp loading."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter
from gguf import GGMLQuantizationType as T
from gguf.quants import quantize

from device.contracts import patch_format as pf
from device.contracts.atomic import temp_target
from cloud.patch_build import make_patch_from_arrays
from device.contracts.patch_format import PatchError, read_patch
from device.patch import apply_to_files
from device.versions import VersionError, VersionStore

REPO = Path(__file__).resolve().parents[2]
MODEL = {
    "blk.0.attn_q.weight": ((64, 64), T.F32),
    "blk.0.attn_k.weight": ((64, 64), T.F16),
    "blk.0.attn_v.weight": ((64, 64), T.Q8_0),
    "blk.0.attn_output.weight": ((64, 64), T.Q4_0),
    "blk.0.ffn_up.weight": ((96, 64), T.Q4_1),
    "blk.0.ffn_down.weight": ((64, 96), T.Q5_0),
    "blk.0.attn_norm.weight": ((64,), T.F32),
}
MMPROJ = {"v.blk.0.attn_q.weight": ((64, 64), T.Q8_0), "mm.0.weight": ((32, 64), T.F16)}


def weights(layout: dict, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {n: (rng.standard_normal(s).astype(np.float32), t) for n, (s, t) in layout.items()}


def write_gguf(path: Path, ws: dict, arch: str = "llama", kv=None) -> Path:
    w = GGUFWriter(path, arch)
    (kv or (lambda _: None))(w)
    for name, (a, t) in ws.items():
        q = quantize(a, t)
        w.add_tensor(name, q, raw_dtype=t if q.dtype == np.uint8 else None)
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        step()
    return path


def edit(ws: dict, names=None) -> tuple[dict, dict]:
    """New weights (rows 3..6 and the last row changed) and the DWC update for them."""
    new, upd = dict(ws), {}
    for name in names or ws:
        a, t = ws[name]
        b = a.copy()
        b[3:7 if b.ndim > 1 else None] += 0.5
        b[-1] -= 0.75
        new[name] = (b, t)
        upd[name] = (b, [(3, 4), (b.shape[0] - 1, 1)] if b.ndim > 1 else None)
    return new, upd


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def snapshot(store: VersionStore) -> dict[str, str]:
    """Every byte of the store (CURRENT, log, all version files) by content hash."""
    return {str(p.relative_to(store.dir)): sha(p) for p in sorted(store.dir.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.fixture
def world(tmp_path: Path) -> dict:
    """A store at v0 (model + mmproj), a model-only patch, and the fresh file it must produce."""
    ws, mm = weights(MODEL, 0), weights(MMPROJ, 1)
    base = write_gguf(tmp_path / "base.gguf", ws)
    mmproj = write_gguf(tmp_path / "mmproj.gguf", mm, arch="clip")
    new, upd = edit(ws)
    fresh = write_gguf(tmp_path / "fresh.gguf", new)
    patch = make_patch_from_arrays(base, upd, tmp_path / "round1.patch.gguf", round_id="r1").path
    store = VersionStore(tmp_path / "dev" / "models", "tiny")
    store.install_base(base, mmproj)
    return dict(ws=ws, mm=mm, base=base, mmproj=mmproj, fresh=fresh, patch=patch, store=store, tmp=tmp_path)


# ------------------------------------------------------------ apply, versions, rollback

def test_apply_gives_fresh_bytes_and_rollback_restores(world):
    store: VersionStore = world["store"]
    v0 = store.current()
    assert store.installed() and not VersionStore(world["tmp"] / "empty").installed()
    assert v0.id == "v0" and sha(store.paths(v0).model) == sha(world["base"])
    inodes = {r: p.stat().st_ino for r, p in store.paths(v0).roles().items()}
    res = store.apply_patch(world["patch"])
    assert res.version.id == "v1" and res.version.parent == "v0" and res.version.round_id == "r1"
    assert store.current() == res.version and res.paths == store.paths("v1")
    assert res.paths.model.read_bytes() == world["fresh"].read_bytes()  # the field notes' claim
    assert res.version.files["model"].sha256 == ""  # identity hash left to the first use (O(model) read)
    assert store.identify().files["model"].sha256 == sha(world["fresh"]) == store.version("v1").files["model"].sha256
    payload = read_patch(world["patch"]).payload_bytes
    assert res.bytes_written == payload < res.version.patch_bytes == os.path.getsize(world["patch"])
    # in place: the same files (no copy), still read-only; the delta record holds old + new bytes
    assert {r: p.stat().st_ino for r, p in res.paths.roles().items()} == inodes and res.bytes_copied == 0
    assert all(p.stat().st_mode & 0o222 == 0 for p in res.paths.roles().values())
    assert 2 * payload < res.journal_bytes < 2 * payload + 4096 and not (store.dir / "JOURNAL").exists()
    with pytest.raises(VersionError, match="not the current version"):
        store.paths(v0)
    assert [v.id for v in store.list()] == ["v0", "v1"]
    back = store.rollback()
    assert back.id == "v0" and store.current().id == "v0"
    assert sha(store.paths(back).model) == sha(world["base"]) and sha(store.paths(back).mmproj) == sha(world["mmproj"])
    with pytest.raises(VersionError, match="base"):
        store.rollback()
    again = store.apply_patch(world["patch"])  # after rollback the patch fits again: new id, same bytes
    assert again.version.id == "v2" and sha(again.paths.model) == sha(world["fresh"])
    log = json.loads((store.dir / "versions.json").read_text())
    assert [v["id"] for v in log["versions"]] == ["v0", "v1", "v2"] and log["next"] == 3
    # any kept version, back and forward: v1 and v2 are siblings (both children of v0)
    assert store.switch("v1").id == "v1" and sha(store.paths().model) == sha(world["fresh"])
    assert store.switch("v0").id == "v0" and sha(store.paths().model) == sha(world["base"])
    assert store.switch("v2").id == "v2" and store.check().id == "v2"
    with pytest.raises(VersionError, match="unknown version 'v9'"):
        store.switch("v9")


def test_a_swapped_model_file_is_refused_at_load(world):
    store: VersionStore = world["store"]
    live = store.paths().model
    assert store.check().id == "v0"
    os.chmod(live, 0o644)
    live.write_bytes(world["fresh"].read_bytes())  # someone copies another model over it
    with pytest.raises(VersionError, match="bytes differ from the record of v0") as err:
        store.check()
    assert "\n" not in str(err.value)
    with pytest.raises(VersionError, match="bytes differ"):
        store.apply_patch(world["patch"])  # a patch is accepted only for the exact current version
    live.write_bytes(world["base"].read_bytes())  # the right bytes again (new inode/ctime): re-hashed, fine
    assert store.check().id == "v0"


def test_a_patch_for_another_version_is_refused(world):
    store: VersionStore = world["store"]
    p = read_patch(world["patch"])
    other = world["tmp"] / "for-v5.gguf"
    pf._write_gguf(other, list(p.entries), list(p.payloads), dataclasses.replace(p.meta, parent_version="v5"))
    before = snapshot(store)
    with pytest.raises(PatchError, match="built for version v5, the device is at v0"):
        store.apply_patch(other)
    assert snapshot(store) == before

def test_mmproj_patch_and_prune(world):
    store: VersionStore = world["store"]
    new_mm, upd = edit(world["mm"], ["v.blk.0.attn_q.weight"])
    fresh_mm = write_gguf(world["tmp"] / "fresh_mm.gguf", new_mm, arch="clip")
    p = make_patch_from_arrays({"model": world["base"], "mmproj": world["mmproj"]}, upd,
                               world["tmp"] / "mm.patch.gguf", round_id="r2", data_hashes=True).path
    assert {e.role for e in read_patch(p).entries} == {"mmproj"}
    res = store.apply_patch(p)
    assert sha(res.paths.mmproj) == sha(fresh_mm) and sha(res.paths.model) == sha(world["base"])
    res2 = store.apply_patch(world["patch"])
    assert res2.version.parent == "v1" and sha(res2.paths.model) == sha(world["fresh"])
    assert sha(res2.paths.mmproj) == sha(fresh_mm)
    assert store.prune(keep=2) == ["v0"] and [v.id for v in store.list()] == ["v1", "v2"]
    assert sorted(p.name for p in store.undo.iterdir()) == ["v2.delta"]  # v1 is the new root
    assert store.rollback().id == "v1" and sha(store.paths().model) == sha(world["base"])
    assert sha(store.paths().mmproj) == sha(fresh_mm)
    with pytest.raises(VersionError, match="nothing to roll back"):
        store.rollback()
    assert store.switch("v2").id == "v2" and store.prune(keep=1) == ["v1"] and not list(store.undo.iterdir())


def test_apply_to_files_in_place_for_cloud_preview(world):
    scratch = world["tmp"] / "scratch.gguf"
    scratch.write_bytes(world["base"].read_bytes())
    assert apply_to_files(world["patch"], {"model": scratch}) == read_patch(world["patch"]).payload_bytes
    assert scratch.read_bytes() == world["fresh"].read_bytes()
    with pytest.raises(PatchError, match="already applied"):
        apply_to_files(world["patch"], {"model": scratch})


def liar_patch(world: dict, layout: dict, name: str, out: str) -> Path:
    """A valid patch built against a base whose layout differs from the device's."""
    ws = weights(layout, 0)
    base = write_gguf(world["tmp"] / f"{out}.base.gguf", ws)
    _, upd = edit(ws, [name])
    return make_patch_from_arrays(base, upd, world["tmp"] / f"{out}.gguf", round_id="liar").path


def refused_patch(world: dict, case: str) -> Path:
    tmp, good = world["tmp"], world["patch"].read_bytes()
    if case == "truncated":
        (tmp / "t.gguf").write_bytes(good[: len(good) * 2 // 3])
        return tmp / "t.gguf"
    if case == "random":
        (tmp / "r.gguf").write_bytes(os.urandom(len(good)))
        return tmp / "r.gguf"
    if case == "other_base":
        ws = weights(MODEL, 42)
        base = write_gguf(tmp / "other.gguf", ws)
        return make_patch_from_arrays(base, edit(ws)[1], tmp / "o.gguf", round_id="x").path
    if case == "out_of_bounds":
        p = read_patch(world["patch"])
        bad = dataclasses.replace(p.entries[0], row_start=62)  # rows 62..65 of 64
        pf._write_gguf(tmp / "b.gguf", [bad], [p.payloads[0]], dataclasses.replace(
            p.meta, target_hash=pf.sha256_concat([p.payloads[0]])))
        return tmp / "b.gguf"
    if case == "wrong_type":
        return liar_patch(world, {**MODEL, "blk.0.attn_v.weight": ((64, 64), T.Q4_0)}, "blk.0.attn_v.weight", "wt")
    if case == "wrong_shape":
        return liar_patch(world, {**MODEL, "blk.0.ffn_up.weight": ((128, 64), T.Q4_1)}, "blk.0.ffn_up.weight", "ws")
    if case == "unknown_tensor":
        return liar_patch(world, {**MODEL, "blk.9.attn_q.weight": ((64, 64), T.F16)}, "blk.9.attn_q.weight", "ut")
    if case == "other_file":  # same bytes in the patched rows, different elsewhere: data hash refuses
        ws = dict(world["ws"])
        ws["blk.0.attn_k.weight"] = (ws["blk.0.attn_k.weight"][0] + 1, T.F16)
        base = write_gguf(tmp / "of.gguf", ws)
        _, upd = edit(ws, ["blk.0.attn_q.weight"])
        return make_patch_from_arrays(base, upd, tmp / "of.patch.gguf", round_id="x", data_hashes=True).path
    raise AssertionError(case)


@pytest.mark.parametrize("case, match", [
    ("truncated", "not a readable GGUF|corrupt|truncated"),
    ("random", "not a readable GGUF"),
    ("other_base", "base hash mismatch"),
    ("applied_twice", "already applied"),
    ("out_of_bounds", "outside"),
    ("wrong_type", "patch type Q4_0, device tensor is Q8_0"),
    ("wrong_shape", r"patch shape \[64, 128\], device tensor is \[64, 96\]"),
    ("unknown_tensor", "blk.9.attn_q.weight: no such tensor"),
    ("other_file", "not the base this patch was built on"),
])
def test_refused_patch_changes_nothing(world, case, match):
    store: VersionStore = world["store"]
    if case == "applied_twice":
        store.apply_patch(world["patch"])
        bad = world["patch"]
    else:
        bad = refused_patch(world, case)
    before, current = snapshot(store), store.current()
    with pytest.raises(PatchError, match=match) as err:
        store.apply_patch(bad)
    assert "\n" not in str(err.value)
    assert snapshot(store) == before and store.current() == current
    assert not list(store.dir.glob(".staging-*")) and not (store.dir / "JOURNAL").exists()


def test_patch_for_missing_mmproj_is_refused(world):
    store = VersionStore(world["tmp"] / "solo", "m")
    store.install_base(world["base"])
    _, upd = edit(world["mm"], ["mm.0.weight"])
    p = make_patch_from_arrays({"mmproj": world["mmproj"]}, upd, world["tmp"] / "m.gguf", round_id="m").path
    before = snapshot(store)
    with pytest.raises(PatchError, match="does not have"):
        store.apply_patch(p)
    assert snapshot(store) == before


def test_install_refusals_and_recover_garbage(world):
    store: VersionStore = world["store"]
    with pytest.raises(VersionError, match="already installed"):
        store.install_base(world["base"])
    with pytest.raises(VersionError, match="not a loadable GGUF"):
        VersionStore(world["tmp"] / "x").install_base(world["patch"].with_suffix(".nope"))
    (store.dir / ".staging-v9").mkdir()
    (store.undo / "v7.delta").write_bytes(b"never logged")
    (store.dir / "CURRENT.tmp-123").write_text("v7\n")  # an older cdcca's temp name
    (store.dir / ".CURRENT.0badf00d.tmp").write_text("v7\n")  # device/contracts/atomic.py's
    (store.undo / ".v7.delta.0badf00d.tmp").write_bytes(b"torn")
    (store.dir / ".feature_stats.npz.0badf00d.tmp").write_bytes(b"")  # the chat's, written unlocked: kept
    before = store.current()
    rep = store.recover()
    assert set(rep.removed) == {".staging-v9", "v7.delta", "CURRENT.tmp-123", ".CURRENT.0badf00d.tmp",
                                ".v7.delta.0badf00d.tmp"} and store.current() == before
    assert (store.dir / ".feature_stats.npz.0badf00d.tmp").is_file()


# ------------------------------------------------------------ crash safety

APPLY_SCRIPT = """
import sys
from device.versions import VersionStore
s = VersionStore(sys.argv[1], "tiny")
if sys.argv[3] == "apply":
    s.apply_patch(sys.argv[2])
elif sys.argv[3] == "rollback":
    s.rollback()
else:
    s.recover()
    print("ready", flush=True)
    while True:  # alternate old -> new -> old ..., whatever state the last kill left
        if s.current().parent is None:
            s.apply_patch(sys.argv[2])
        else:
            s.rollback()
        s.prune(keep=2)
"""


def run_child(world: dict, mode: str, **env) -> subprocess.Popen:
    args = [str(world["store"].dir.parent), str(world["patch"]), mode]
    return subprocess.Popen([sys.executable, "-c", APPLY_SCRIPT, *args], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def check_consistent(world: dict, cleaned: list | None = None) -> str:
    """After recover(): CURRENT is logged, every logged version's bytes match its record, no
    staging left, and the current files load. Returns "old" or "new"."""
    store: VersionStore = world["store"]
    report = store.recover()
    if cleaned is not None:
        cleaned.append(len(report.removed) + len(report.relogged))
    cur = store.identify()
    assert cur.id in {v.id for v in store.list()}
    assert not [p for p in store.dir.iterdir() if p.name.startswith(".staging") or ".tmp-" in p.name
                or temp_target(p.name)]
    assert not (store.dir / "JOURNAL").exists()
    paths = store.paths(cur)
    for role, rec in cur.files.items():
        assert sha(paths.roles()[role]) == rec.sha256, (cur.id, role)
    assert store.check() == cur
    assert len(GGUFReader(paths.model).tensors) == len(MODEL)
    assert len(GGUFReader(paths.mmproj).tensors) == len(MMPROJ)
    state = {sha(world["base"]): "old", sha(world["fresh"]): "new"}.get(sha(paths.model))
    assert state is not None, "current model is neither the old nor the new bytes"
    assert sha(paths.mmproj) == sha(world["mmproj"])
    return state


@pytest.mark.parametrize("step, expect", [
    ("undo", "old"), ("journal", "old"), ("write", "old"), ("written", "old"), ("logged", "old"),
    ("current_tmp", "old"), ("switched", "new"),
])
def test_crash_injected_at_each_apply_step(world, step, expect):
    child = run_child(world, "apply", CDCCA_CRASH_AT=step)
    assert child.wait(timeout=60) == -signal.SIGKILL, child.stderr.read()
    assert check_consistent(world) == expect
    if expect == "old":  # the store still works: the same patch now applies cleanly
        world["store"].apply_patch(world["patch"])
        assert check_consistent(world) == "new"


@pytest.mark.parametrize("step", ["rollback", "current_tmp"])
def test_crash_injected_during_rollback(world, step):
    world["store"].apply_patch(world["patch"])
    child = run_child(world, "rollback", CDCCA_CRASH_AT=step)
    assert child.wait(timeout=60) == -signal.SIGKILL, child.stderr.read()
    assert check_consistent(world) == "new"
    world["store"].rollback()
    assert check_consistent(world) == "old"


def test_random_sigkill_during_apply_rollback_loop(world):
    """30 SIGKILLs at random instants of an apply/rollback/prune loop; each leaves old or new."""
    rng, seen, cleaned = random.Random(1234), {"old": 0, "new": 0}, []
    for _ in range(30):
        child = run_child(world, "loop")
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
        time.sleep(rng.uniform(0, 0.15))
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL, child.stderr.read()  # killed mid-loop, not dead
        child.stdout.close()
        child.stderr.close()
        seen[check_consistent(world, cleaned)] += 1
    print(f"\nrandom kills landed: {seen}; recover() had to clean up after {sum(map(bool, cleaned))}")
    assert len(world["store"].list()) <= 3


# ------------------------------------------------------------ cost

def test_apply_cost_is_patch_sized(tmp_path):
    """A 1-tensor patch on a 16 MiB model: bytes written == patch payload, nothing copied, the
    delta record ~2x the payload; only the patched span differs; rollback restores every byte."""
    layout = {f"blk.{i}.ffn_up.weight": ((1024, 1024), T.F16) for i in range(8)}
    ws = weights(layout, 3)
    base = write_gguf(tmp_path / "big.gguf", ws)
    _, upd = edit(ws, ["blk.5.ffn_up.weight"])
    patch = read_patch(make_patch_from_arrays(base, upd, tmp_path / "p.gguf", round_id="big").path)
    store = VersionStore(tmp_path / "models", "big")
    store.install_base(base)
    res = store.apply_patch(patch.path)
    assert res.bytes_written == patch.payload_bytes == 5 * 2048
    assert res.bytes_copied == 0 and res.journal_bytes < 2 * patch.payload_bytes + 4096
    assert sum(p.stat().st_size for p in store.dir.rglob("*") if p.is_file()) < base.stat().st_size + 64 * 1024
    old = np.fromfile(base, np.uint8)
    diff = np.flatnonzero(old != np.fromfile(res.paths.model, np.uint8))
    t = next(t for t in GGUFReader(base).tensors if t.name == "blk.5.ffn_up.weight")
    spans = [(t.data_offset + e.byte_offset, t.data_offset + e.byte_offset + e.nbytes) for e in patch.entries]
    assert diff.size and all(any(a <= d < b for a, b in spans) for d in diff)
    ms = {k: round(v * 1e3, 2) for k, v in res.timings.items()}
    print(f"\napply 1-tensor patch ({res.bytes_written} B) to {base.stat().st_size / 2**20:.0f} MiB "
          f"{res.copy_method}: total {res.seconds * 1e3:.1f} ms, phases ms {ms}")
    store.rollback()
    assert sha(store.paths().model) == sha(base)


# ------------------------------------------------------------ walls and llama.cpp

def test_device_patch_code_never_imports_torch():
    code = ("import sys, device.versions, device.journal, device.patch, device.contracts.patch_format; "
            "bad = [m for m in ('torch', 'transformers', 'cloud') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def tiny_llama_kv(w: GGUFWriter) -> None:
    """Just enough metadata for llama.cpp to load a 1-layer llama (byte-level gpt2 vocab)."""
    for add, val in [(w.add_context_length, 64), (w.add_embedding_length, 64), (w.add_block_count, 1),
                     (w.add_feed_forward_length, 128), (w.add_head_count, 2), (w.add_head_count_kv, 2),
                     (w.add_layer_norm_rms_eps, 1e-5), (w.add_vocab_size, 257), (w.add_tokenizer_model, "gpt2"),
                     (w.add_tokenizer_pre, "gpt-2"), (w.add_bos_token_id, 0), (w.add_eos_token_id, 1)]:
        add(val)
    bs = [*range(33, 127), *range(161, 173), *range(174, 256)]
    cs, extra = bs[:], [b for b in range(256) if b not in bs]
    bs += extra
    cs += [256 + i for i in range(len(extra))]
    tokens = [chr(c) for c in cs] + ["\u0120t"]
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges(["\u0120 t"])


# Q8_0/Q4_0/Q4_1 weights segfault this llama.cpp build's CPU repack path on tiny tensors, so the
# model uses types that load everywhere; the patch logic is type-agnostic and tested above.
LLAMA = {
    "token_embd.weight": ((257, 64), T.F16), "blk.0.attn_norm.weight": ((64,), T.F32),
    "blk.0.attn_q.weight": ((64, 64), T.Q5_0), "blk.0.attn_k.weight": ((64, 64), T.Q5_0),
    "blk.0.attn_v.weight": ((64, 64), T.F16), "blk.0.attn_output.weight": ((64, 64), T.F16),
    "blk.0.ffn_norm.weight": ((64,), T.F32), "blk.0.ffn_gate.weight": ((128, 64), T.F16),
    "blk.0.ffn_up.weight": ((128, 64), T.F32), "blk.0.ffn_down.weight": ((64, 128), T.Q5_0),
    "output_norm.weight": ((64,), T.F32), "output.weight": ((257, 64), T.F16),
}
LOGITS_SCRIPT = """
import json, sys, numpy as np, llama_cpp
out = []
for p in sys.argv[1:]:
    m = llama_cpp.Llama(p, n_ctx=64, verbose=False, logits_all=True, n_threads=1)
    m.eval([5, 72, 101, 33])
    out.append(np.array(m.scores[:4]).tolist())
    m.close()
print(json.dumps(out))
"""


def test_llama_cpp_loads_patched_version_with_fresh_logits(tmp_path):
    pytest.importorskip("llama_cpp")
    ws = weights(LLAMA, 5)
    ws = {n: (a * 0.2, t) for n, (a, t) in ws.items()}
    base = write_gguf(tmp_path / "l.gguf", ws, kv=tiny_llama_kv)
    new, upd = edit(ws, ["blk.0.attn_q.weight", "blk.0.ffn_gate.weight", "blk.0.ffn_down.weight"])
    fresh = write_gguf(tmp_path / "lf.gguf", new, kv=tiny_llama_kv)
    patch = make_patch_from_arrays(base, upd, tmp_path / "lp.gguf", round_id="l").path
    store = VersionStore(tmp_path / "models", "llama")
    store.install_base(base)
    patched = store.apply_patch(patch).paths.model
    run = subprocess.run([sys.executable, "-c", LOGITS_SCRIPT, str(base), str(patched), str(fresh)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    b, p, f = (np.array(x) for x in json.loads(run.stdout.strip().splitlines()[-1]))
    assert np.array_equal(p, f) and not np.allclose(p, b)


def test_a_file_changed_before_its_hash_was_recorded_is_refused(world):
    store: VersionStore = world["store"]
    live = store.apply_patch(world["patch"]).paths.model
    os.chmod(live, 0o644)
    with open(live, "r+b") as f:  # tampered between the apply and the first use
        f.seek(100)
        f.write(b"\x00")
    with pytest.raises(VersionError, match="before its hash was recorded"):
        store.identify()


def test_a_store_in_the_old_copy_per_version_layout_is_migrated(world):
    """Stores written before the journal (v<N>/ copies, CURRENT) keep their current version."""
    old = world["tmp"] / "old" / "m"
    for vid, src in (("v0", world["base"]), ("v1", world["fresh"])):
        (old / vid).mkdir(parents=True)
        (old / vid / "model.gguf").write_bytes(src.read_bytes())
    recs = {vid: {"id": vid, "parent": None if vid == "v0" else "v0", "round_id": "", "created": "t",
                  "files": {"model": {"name": "model.gguf", "sha256": sha(src), "size": src.stat().st_size}},
                  "patch_bytes": 0, "note": ""} for vid, src in (("v0", world["base"]), ("v1", world["fresh"]))}
    (old / "versions.json").write_text(json.dumps({"model": "m", "next": 2, "versions": list(recs.values())}))
    (old / "CURRENT").write_text("v1\n")
    store = VersionStore(old.parent, "m")
    rep = store.recover()
    assert set(rep.removed) >= {"v0", "v1"} and not (old / "v0").exists()
    assert store.check().id == "v1" and sha(store.paths().model) == sha(world["fresh"])
    assert [v.id for v in store.list()] == ["v1"] and store.current().parent is None
    w = world["ws"]["blk.0.attn_q.weight"][0].copy()
    w[:2] += 2.0
    p = make_patch_from_arrays(store.paths().model, {"blk.0.attn_q.weight": (w, [(0, 2)])},
                               world["tmp"] / "after-migration.gguf", round_id="m2").path
    assert store.apply_patch(p).version.id == "v2" and store.rollback().id == "v1"


def test_retention_prunes_old_versions_on_apply(world):
    store = VersionStore(world["store"].dir.parent, "tiny", keep=2)
    for _ in range(3):  # apply, roll back, apply again ...: history stays at the retention size
        store.apply_patch(world["patch"])
        assert len(store.list()) <= 2
        store.rollback()
    assert len(list(store.undo.iterdir())) <= 1
