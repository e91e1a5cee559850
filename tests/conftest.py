"""Shared fixtures. The embedded default (an HF Idefics3 student + teacher and their GGUFs) ships in
assets/default (built by `cdcca models build`); tests read it and never train big models."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from device.contracts.config import DEFAULT_MODEL_DIR


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Every test gets its own CDCCA_HOME: nothing touches the user's data directory."""
    monkeypatch.setenv("CDCCA_HOME", str(tmp_path / "home"))
    yield


@pytest.fixture(scope="session")
def assets() -> Path:
    d = DEFAULT_MODEL_DIR
    missing = [f for f in ("student-f32.gguf", "student-q8_0.gguf", "student-q4_0.gguf", "mmproj-f32.gguf",
                           "student/config.json", "teacher/config.json", "data/eval.json", "data/replay.json",
                           "manifest.json") if not (d / f).is_file()]
    assert not missing, f"embedded default models missing from {d}: {missing}"
    return d


@pytest.fixture(scope="session")
def convert_hf(tmp_path_factory):
    """``convert_hf(model_dir, outtype="f32", mmproj=False) -> Path``: llama.cpp's official converter
    (cloud/converter.py) on a tiny HF checkpoint, cached per session so tests that share a checkpoint
    convert it once."""
    from cloud.converter import convert

    root = tmp_path_factory.mktemp("converted")
    done: dict[tuple, Path] = {}

    def run(model_dir, outtype: str = "f32", mmproj: bool = False) -> Path:
        key = (str(Path(model_dir).resolve()), outtype, mmproj)
        if key not in done:
            name = f"{'mmproj-' if mmproj else ''}{Path(model_dir).name}-{len(done)}-{outtype}.gguf"
            done[key] = convert(model_dir, root / name, outtype, mmproj=mmproj)
        return done[key]

    return run


@pytest.fixture(scope="session")
def tiny_idefics3(tmp_path_factory) -> Path:
    """A random-weight tiny ``Idefics3ForConditionalGeneration`` checkpoint (save_pretrained layout,
    SentencePiece tokenizer, preprocessor) of the embedded default's shape; convert it with convert_hf."""
    from cloud.zoo.hf_model import ModelSpec, new_model, save_checkpoint
    from cloud.zoo.scenes import generate
    from cloud.zoo.spm_tokenizer import build_tokenizer

    root = tmp_path_factory.mktemp("tiny_idefics3")
    texts = [t for d in ("source", "combo") for s in generate(d, 120, 0, teacher=True) for t in (s.question, s.answer)]
    tok = build_tokenizer(texts + ["USER: ", "ASSISTANT:"], root / "tokenizer")
    spec = ModelSpec(vision_dim=32, vision_layers=1, vision_heads=2, vision_mlp=64, text_dim=64, text_layers=1,
                     text_heads=2, text_kv_heads=1, text_ffn=128)
    return save_checkpoint(new_model(spec, tok, seed=0), root / "tokenizer", spec, root / "model")


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
