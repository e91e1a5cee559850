"""ggml's own quantizer through ctypes: equal to gguf-py where gguf-py can quantize, K-quants
row-exact, IQ types refused by name; and a DWC-style patch of a real Q4_K_M file (made by the
wheel's llama_model_quantize from an officially converted tiny model) ships exactly ggml's bytes
for the changed rows, leaves every other byte alone, and llama.cpp loads the patched file."""
from __future__ import annotations

import ctypes
import shutil
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGMLQuantizationType as T
from gguf.quants import dequantize, quantize as gguf_quantize

from cloud import ggml_quant
from cloud.ggml_quant import QuantError
from cloud.patch_build import QUANTIZABLE, make_patch_from_arrays
from device.contracts.patch_format import read_patch
from device.patch import apply_to_files
from tiny_hf import tiny_llama

RNG = np.random.default_rng(0)
LLAMA_FTYPE_MOSTLY_Q4_K_M = 15


@pytest.mark.parametrize("t", sorted(QUANTIZABLE - {T.BF16}, key=int))
def test_equals_gguf_py_on_the_types_gguf_py_quantizes(t):
    x = RNG.standard_normal((7, 256)).astype(np.float32)
    assert ggml_quant.quantize(x, t) == np.ascontiguousarray(gguf_quantize(x, t)).tobytes()


@pytest.mark.parametrize("t", [T.Q4_K, T.Q5_K, T.Q6_K, T.Q3_K, T.Q2_K])
def test_k_quants_are_row_exact_and_dequantize_close(t):
    x = RNG.standard_normal((300, 512)).astype(np.float32)
    whole = ggml_quant.quantize(x, t)
    per_row = ggml_quant.row_size(t, 512)
    assert len(whole) == 300 * per_row
    assert ggml_quant.quantize(x[17:40], t) == whole[17 * per_row:40 * per_row]  # rows are independent
    assert ggml_quant.quantize(x, t, threads=3) == whole
    back = dequantize(np.frombuffer(whole, np.uint8).reshape(300, per_row), t).reshape(300, 512)
    rel = np.linalg.norm(back - x) / np.linalg.norm(x)
    assert rel < {T.Q2_K: 0.5, T.Q3_K: 0.25}.get(t, 0.12), rel


def test_refusals_are_one_line_and_name_the_type():
    for t in (T.IQ2_XXS, T.IQ4_NL, T.IQ1_M):
        with pytest.raises(QuantError, match=t.name):
            ggml_quant.quantize(np.zeros((1, 256), np.float32), t)
    with pytest.raises(QuantError, match="Q8_K"):
        ggml_quant.check_type(T.Q8_K)
    with pytest.raises(QuantError, match="multiple of 256"):  # would be a GGML_ASSERT abort inside ggml
        ggml_quant.quantize(np.zeros((2, 200), np.float32), T.Q4_K)
    assert not ggml_quant.supported(T.IQ4_XS) and ggml_quant.supported(T.Q6_K)


def _quantize_file(src: Path, dst: Path, ftype: int) -> Path:
    import llama_cpp

    from device.llama_setup import silence_llama_logs

    silence_llama_logs()
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = ftype
    p.nthread = 1
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p)) == 0
    return dst


@pytest.fixture(scope="module")
def q4_k_m(tmp_path_factory) -> Path:
    from cloud.converter import convert

    root = tmp_path_factory.mktemp("kquant")
    f32 = convert(tiny_llama(root / "hf", hidden=256, intermediate=512, layers=1), root / "f32.gguf")
    return _quantize_file(f32, root / "q4_k_m.gguf", LLAMA_FTYPE_MOSTLY_Q4_K_M)


def test_k_quant_patch_ships_ggml_bytes_for_changed_rows_only(q4_k_m, tmp_path):
    r = GGUFReader(q4_k_m, "r")
    by_type = {}
    for t in r.tensors:
        by_type.setdefault(t.tensor_type, t)
    assert T.Q4_K in by_type and T.Q6_K in by_type, sorted(x.name for x in by_type)
    new, changed_rows = {}, {}
    for qt in (T.Q4_K, T.Q6_K):
        t = by_type[qt]
        ne0 = int(t.shape[0])
        w = dequantize(t.data, qt).reshape(-1, ne0).copy()
        w[2:5] += 0.05 * RNG.standard_normal((3, ne0)).astype(np.float32) * np.abs(w[2:5]).mean()
        new[t.name] = (w.reshape(tuple(reversed([int(s) for s in t.shape]))), [(0, 8)])  # rows 0,1,5,6,7 unchanged
        changed_rows[t.name] = (qt, w[2:5])
    old_bytes = q4_k_m.read_bytes()
    build = make_patch_from_arrays(q4_k_m, new, tmp_path / "p.gguf", round_id="r1", quantizer=ggml_quant.quantize)
    patch = read_patch(build.path)
    assert {e.tensor: (e.row_start, e.row_count) for e in patch.entries} == {n: (2, 3) for n in new}
    for e, payload in zip(patch.entries, patch.payloads):
        qt, rows = changed_rows[e.tensor]
        assert e.ggml_type == qt and payload == ggml_quant.quantize(rows, qt)  # ggml's own bytes
    dev = tmp_path / "device.gguf"
    shutil.copyfile(q4_k_m, dev)
    from device.runtime import Runtime, RuntimeConfig

    running = Runtime(RuntimeConfig(dev, n_threads=1, n_ctx=128, kv_cache="f32"))  # maps the file
    apply_to_files(build.path, {"model": dev})
    got = dev.read_bytes()
    assert len(got) == len(old_bytes)
    diff = np.flatnonzero(np.frombuffer(got, np.uint8) != np.frombuffer(old_bytes, np.uint8))
    idx = {t.name: t for t in GGUFReader(dev, "r").tensors}
    allowed = np.zeros(len(got), bool)
    for e in patch.entries:
        start = idx[e.tensor].data_offset + e.byte_offset
        allowed[start:start + e.nbytes] = True
    assert diff.size > 0 and allowed[diff].all()  # every changed byte lies inside a patched row

    with Runtime(RuntimeConfig(dev, n_threads=1, n_ctx=128, kv_cache="f32")) as rt:  # llama.cpp loads and runs it
        gen = rt.generate("hello", max_tokens=3)
        assert len(gen.token_ids) <= 3 and np.isfinite(rt.logits()).all()
        ids = rt.prompt_ids("hello")
        rt._clear_memory()
        rt._decode_tokens(ids, 0)
        fresh = rt.logits().copy()
    with running:  # the runtime that was up during the in-place write: K-quant rows live after a hot reload
        assert running.reload() < 0.5
        running._decode_tokens(ids, 0)
        assert np.array_equal(running.logits(), fresh)
