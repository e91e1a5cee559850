"""family_for picks the family from GGUF metadata and refuses anything else in one line."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from cloud.families import FamilyError, family_for


def _gguf(path, arch):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_tensor("x", np.zeros(4, np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return path


def test_picks_by_architecture_and_projector(idefics3_pair, llama_gguf):
    assert family_for(*idefics3_pair["f32"]).name == "idefics3"
    assert family_for(llama_gguf["f32"]).name == "causal-lm"


def test_refuses_unknown_architecture_in_one_line(tmp_path):
    with pytest.raises(FamilyError) as e:
        family_for(_gguf(tmp_path / "m.gguf", "qwen2"))
    msg = str(e.value)
    assert "\n" not in msg and "'qwen2'" in msg and "llama" in msg and "idefics3" in msg


def test_refuses_unknown_projector(tmp_path, llama_gguf):
    mm = tmp_path / "mm.gguf"
    w = gguf.GGUFWriter(str(mm), "clip")
    w.add_string("clip.projector_type", "mlp")
    w.add_tensor("x", np.zeros(4, np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(FamilyError, match="projector type 'mlp' is not supported"):
        family_for(llama_gguf["f32"], mm)


def test_not_a_gguf(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"nope")
    with pytest.raises(FamilyError, match="not a valid GGUF"):
        family_for(tmp_path / "x.gguf")
