"""The device runtime runs every tensor type the issue lists (F32, F16, Q8_0, Q5_0, Q4_1, Q4_0):
the default's converter-written f32 GGUF, quantized by the wheel's own llama-quantize."""
import numpy as np
import pytest

from cloud.zoo import scenes
from cloud.zoo.hf_assets import quantize_gguf
from device.runtime import Runtime, RuntimeConfig


@pytest.mark.parametrize("qtype", ["f32", "f16", "q8_0", "q5_0", "q4_1", "q4_0"])
def test_each_type_loads_and_answers_like_f32(assets, tmp_path, qtype):
    ref_path = assets / "student-f32.gguf"
    path = ref_path if qtype == "f32" else quantize_gguf(ref_path, tmp_path / f"s-{qtype}.gguf", qtype)
    samples = [s for d in scenes.DOMAINS for s in scenes.generate(d, 4, 55)]
    with Runtime(RuntimeConfig(ref_path, assets / "mmproj-f32.gguf", n_threads=1)) as ref:
        want = [ref.generate(s.question, s.image).text for s in samples]
    with Runtime(RuntimeConfig(path, assets / "mmproj-f32.gguf", n_threads=1)) as rt:
        got = [rt.generate(s.question, s.image).text for s in samples]
    assert all(got), "empty answers"
    assert np.mean([a == b for a, b in zip(got, want)]) >= 0.8
