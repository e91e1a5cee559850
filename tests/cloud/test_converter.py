"""cloud/converter.py runs llama.cpp's official converter on a tiny HF Idefics3 checkpoint."""
import json
import shutil

import pytest
from gguf import GGUFReader

from cloud.converter import ConverterError, convert


def _str(r: GGUFReader, key: str) -> str:
    f = r.fields[key]
    return bytes(f.parts[f.data[0]]).decode()


def test_text_and_mmproj_convert(tiny_idefics3, convert_hf):
    text = GGUFReader(convert_hf(tiny_idefics3, "f32"))
    proj = GGUFReader(convert_hf(tiny_idefics3, "f32", mmproj=True))
    assert _str(text, "general.architecture") == "llama"
    assert _str(text, "tokenizer.ggml.model") == "llama"  # SentencePiece route: no pre-tokenizer hash check
    assert _str(proj, "clip.projector_type") == "idefics3"
    n_text = json.loads((tiny_idefics3 / "config.json").read_text())["text_config"]["num_hidden_layers"]
    assert sum(t.name.startswith("blk.") for t in text.tensors) == 9 * n_text
    assert any(t.name == "mm.model.fc.weight" for t in proj.tensors)


def test_layout_tokens_are_typed_so_libmtmd_finds_them(tiny_idefics3, convert_hf):
    r = GGUFReader(convert_hf(tiny_idefics3, "f32"))
    toks, types = r.fields["tokenizer.ggml.tokens"], r.fields["tokenizer.ggml.token_type"]
    by_text = {bytes(toks.parts[i]).decode(): int(types.parts[j][0]) for i, j in zip(toks.data, types.data)}
    assert by_text["\n\n"] == 4  # USER_DEFINED
    for t in ("<fake_token_around_image>", "<global-img>", "<row_1_col_1>"):
        assert by_text[t] == 3, t  # CONTROL


def test_q8_0_outtype_is_smaller(tiny_idefics3, convert_hf):
    assert convert_hf(tiny_idefics3, "q8_0").stat().st_size < convert_hf(tiny_idefics3, "f32").stat().st_size


def test_refusals_are_one_line_and_leave_no_file(tiny_idefics3, tmp_path):
    with pytest.raises(ConverterError, match="not a Hugging Face checkpoint"):
        convert(tmp_path, tmp_path / "x.gguf")
    with pytest.raises(ConverterError, match="unsupported --outtype"):
        convert(tiny_idefics3, tmp_path / "x.gguf", "q4_0")
    bad = tmp_path / "bad"
    shutil.copytree(tiny_idefics3, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["NoSuchModelForCausalLM"]
    cfg["text_config"]["architectures"] = ["NoSuchModelForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConverterError) as e:
        convert(bad, tmp_path / "bad.gguf")
    assert "\n" not in str(e.value) and "NoSuchModelForCausalLM" in str(e.value)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*part"))


def test_relative_paths_work_from_any_cwd(tiny_idefics3, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_idefics3.parent)
    out = convert(tiny_idefics3.name, "rel.gguf", "f32")
    assert out.is_absolute() and out.is_file() and out.parent == tiny_idefics3.parent
