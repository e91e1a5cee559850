"""The builder works end to end on the tiny preset (the default preset's weights ship in assets/)."""
import json

import numpy as np

from cloud.zoo.build import PRESETS, build, config_hash
from cloud.zoo.llava_io import write_generated
from device.runtime import Runtime, RuntimeConfig


def test_tiny_build_exports_loadable_ggufs_and_is_cached(tmp_path):
    out = build("tiny", tmp_path / "b", progress=False)
    m = json.loads((out / "manifest.json").read_text())
    assert m["config_hash"] == config_hash(PRESETS["tiny"])
    assert set(m["accuracy"]) == {"student", "teacher"} and "combo" in m["accuracy"]["student"]["domains"]
    assert m["gguf_bytes"]["q4_0"] < m["gguf_bytes"]["q8_0"] < m["gguf_bytes"]["f32"]
    for name, sha in m["files"].items():
        assert (out / name).is_file(), name
    mtime = (out / "manifest.json").stat().st_mtime
    assert build("tiny", out, progress=False) == out and (out / "manifest.json").stat().st_mtime == mtime
    with Runtime(RuntimeConfig(out / "student-q4_0.gguf", out / "mmproj-f16.gguf", n_threads=1)) as rt:
        g = rt.generate("what colour is the circle?", np.zeros((32, 32, 3), np.uint8), max_tokens=4)
        assert len(g.token_ids) <= 4 and g.visual_embeddings.shape == (16, 64)


def test_build_on_user_llava_data(tmp_path):
    write_generated(tmp_path / "ds", "source", 60, 0)
    out = build("tiny", tmp_path / "u", data_path=tmp_path / "ds" / "source.json", progress=False)
    m = json.loads((out / "manifest.json").read_text())
    assert m["data"].endswith("source.json")
    assert sum(d["n"] for d in m["accuracy"]["student"]["domains"].values()) == 6  # 10% held out
