"""Session fixtures: tiny checkpoints of each family, converted once by llama.cpp's official
converter (F32, Q8_0) and quantized to Q4_0 by the wheel's llama-quantize, as a user would."""
from __future__ import annotations

import ctypes

import pytest
import tiny_families as tiny


def _q4_0(src, dst):
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype, p.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, 1
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p)) == 0
    return dst


@pytest.fixture(scope="session")
def idefics3_pair(tmp_path_factory):
    """{"hf": dir, "f32"|"q8_0"|"q4_0": (model, mmproj)} for a tiny Idefics3 (Q4_0 keeps an F32 mmproj)."""
    from cloud.converter import convert_pair

    root = tmp_path_factory.mktemp("idefics3")
    hf = tiny.idefics3(root / "hf")
    out = {"hf": hf, **{t: convert_pair(hf, root / t, t) for t in ("f32", "q8_0")}}
    out["q4_0"] = (_q4_0(out["f32"][0], root / "model-q4_0.gguf"), out["f32"][1])
    return out


@pytest.fixture(scope="session")
def llama_gguf(tmp_path_factory):
    """{"hf": dir, "f32"|"q8_0"|"q4_0": model.gguf} for a tiny text-only Llama."""
    from cloud.converter import convert

    root = tmp_path_factory.mktemp("llama")
    hf = tiny.llama(root / "hf")
    out = {"hf": hf, **{t: convert(hf, root / f"model-{t}.gguf", t) for t in ("f32", "q8_0")}}
    out["q4_0"] = _q4_0(out["f32"], root / "model-q4_0.gguf")
    return out
