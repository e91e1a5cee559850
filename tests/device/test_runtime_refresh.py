"""Hot apply: llama.cpp computes from the memory-mapped text model, so a patch written in place by
the version store is live in a running runtime without a reload -- bit-exact with a fresh load."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.quants import dequantize

from device.contracts.config import DEFAULT_MODEL_DIR
from cloud.patch_build import make_patch_from_arrays
from device.runtime import Runtime, RuntimeConfig
from device.versions import VersionStore


def _logits(rt: Runtime, ids: list[int]) -> np.ndarray:
    rt._clear_memory()
    rt._decode_tokens(ids, 0)
    return rt.logits().copy()


@pytest.mark.parametrize("quant", ["q4_0", "f32"])
def test_in_place_patch_is_live_after_refresh(tmp_path, quant):
    base = DEFAULT_MODEL_DIR / f"student-{quant}.gguf"
    r = GGUFReader(base, "r")
    t = next(t for t in r.tensors if t.name == "blk.0.attn_q.weight")
    ne0, rows = int(t.shape[0]), int(t.shape[1])
    w = dequantize(t.data, t.tensor_type).reshape(rows, ne0).copy()
    w[: rows // 2] *= 1.7
    patch = make_patch_from_arrays(base, {t.name: (w, [(0, rows // 2)])}, tmp_path / "p.gguf", round_id="hot").path
    del r
    store = VersionStore(tmp_path / "models", "m")
    store.install_base(base)
    with Runtime(RuntimeConfig(store.paths().model, n_threads=1, kv_cache="f32")) as rt:
        assert rt.weights_mapped
        ids = rt.tokenize("USER: what colour is the circle?\nASSISTANT:", add_bos=True)
        before = _logits(rt, ids)
        res = store.apply_patch(patch)
        assert rt.refresh(("model",)) < 0.5
        hot = _logits(rt, ids)
        with Runtime(RuntimeConfig(res.paths.model, n_threads=1, kv_cache="f32")) as fresh:
            want = _logits(fresh, ids)
        assert not np.array_equal(hot, before) and np.array_equal(hot, want)
        store.rollback()
        rt.refresh(("model",))
        assert np.array_equal(_logits(rt, ids), before)  # and back again, still without a reload


def test_reload_is_hot_for_in_place_bytes_and_full_for_a_replaced_file(tmp_path):
    import os
    import shutil

    base = DEFAULT_MODEL_DIR / "student-f32.gguf"
    live = tmp_path / "model.gguf"
    shutil.copyfile(base, live)
    with Runtime(RuntimeConfig(live, n_threads=1, kv_cache="f32")) as rt:
        ids = rt.tokenize("USER: what shape is red?\nASSISTANT:", add_bos=True)
        before = _logits(rt, ids)
        t = next(t for t in GGUFReader(live, "r").tensors if t.name == "output.weight")
        with open(live, "r+b") as f:  # an in-place edit (same inode): live in the mapping at once
            f.seek(t.data_offset)
            f.write(np.full(64, 0.5, np.float32).tobytes())
        assert rt.reload() < 0.5 and rt._llama is not None
        hot = _logits(rt, ids)
        with Runtime(RuntimeConfig(live, n_threads=1, kv_cache="f32")) as fresh:
            assert np.array_equal(hot, _logits(fresh, ids)) and not np.array_equal(hot, before)
        other = tmp_path / "other.gguf"
        shutil.copyfile(base, other)
        os.replace(other, live)  # replaced (new inode): the mapping is stale, so a full load
        old_llama = rt._llama
        rt.reload()
        assert rt._llama is not old_llama and np.array_equal(_logits(rt, ids), before)
