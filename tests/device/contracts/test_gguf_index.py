"""The fast GGUF tensor index equals gguf-py's reader on every tensor, and refuses bad files in one line."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFWriter
from gguf.quants import quantize

from device.contracts.gguf_index import GGUFIndexError, read_index
from device.contracts.config import DEFAULT_MODEL_DIR


def _write(path: Path) -> Path:
    w = GGUFWriter(path, "llama")
    w.add_custom_alignment(64)
    w.add_token_list([f"tok{i}" for i in range(3000)])  # a vocabulary-like string array
    w.add_array("x.floats", [1.0, 2.0, 3.0])
    w.add_string("x.name", "hello")
    rng = np.random.default_rng(0)
    for name, shape, t in (("a", (8, 64), T.F32), ("b", (4, 256), T.Q8_0), ("c", (3, 2, 64), T.F16)):
        q = quantize(rng.standard_normal(shape).astype(np.float32), t)
        w.add_tensor(name, q, raw_dtype=t if q.dtype == np.uint8 else None)
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        step()
    return path


def _same(path: Path) -> None:
    idx, ref = read_index(path), GGUFReader(path, "r")
    assert idx.data_start == ref.data_offset
    assert set(idx.tensors) == {t.name for t in ref.tensors}
    for t in ref.tensors:
        got = idx.tensors[t.name]
        assert (got.tensor_type, got.shape, got.data_offset, got.n_bytes) == \
            (t.tensor_type, tuple(int(x) for x in t.shape), t.data_offset, t.n_bytes), t.name


def test_equals_gguf_reader(tmp_path):
    p = _write(tmp_path / "m.gguf")
    _same(p)
    kv = read_index(p).scalars
    assert kv["general.alignment"] == 64 and kv["x.name"] == "hello" and kv["general.architecture"] == "llama"
    for f in ("student-q4_0.gguf", "mmproj-f32.gguf"):
        if (DEFAULT_MODEL_DIR / f).is_file():
            _same(DEFAULT_MODEL_DIR / f)


def test_refuses_bad_files_in_one_line(tmp_path):
    good = _write(tmp_path / "m.gguf").read_bytes()
    cases = {"magic": b"GGUX" + good[4:], "truncated": good[: len(good) // 3], "tiny": b"GG",
             "huge_count": good[:8] + (2**62).to_bytes(8, "little") + good[16:]}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(GGUFIndexError) as err:
            read_index(tmp_path / name)
        assert "\n" not in str(err.value) and name in str(err.value)
