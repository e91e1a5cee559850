"""Session fixtures: tiny checkpoints of each family, converted once by llama.cpp's official converter."""
from __future__ import annotations

import pytest

import tiny_families as tiny


@pytest.fixture(scope="session")
def idefics3_pair(tmp_path_factory):
    """{"hf": dir, "f32": (model, mmproj), "q8_0": (model, mmproj)} for a tiny Idefics3."""
    from cloud.converter import convert_pair

    root = tmp_path_factory.mktemp("idefics3")
    hf = tiny.idefics3(root / "hf")
    return {"hf": hf, **{t: convert_pair(hf, root / t, t) for t in ("f32", "q8_0")}}


@pytest.fixture(scope="session")
def llama_gguf(tmp_path_factory):
    """{"hf": dir, "f32": model.gguf, "q8_0": model.gguf} for a tiny text-only Llama."""
    from cloud.converter import convert

    root = tmp_path_factory.mktemp("llama")
    hf = tiny.llama(root / "hf")
    return {"hf": hf, **{t: convert(hf, root / f"model-{t}.gguf", t) for t in ("f32", "q8_0")}}
