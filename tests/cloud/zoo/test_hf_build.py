"""The HF default's builder on the tiny preset: tokenizer parity with llama.cpp, libmtmd layout,
export through the official converter, device answers vs torch, reproducible bytes, data files."""
import json

import numpy as np
import pytest
import torch

from cloud.zoo import hf_build
from cloud.zoo.hf_build import PRESETS, build, config_hash, role_dir, train_role
from cloud.zoo.hf_data import Layout, embed
from cloud.zoo.hf_model import ModelSpec, load_model
from cloud.zoo.spm_tokenizer import load_tokenizer
from device.contracts.dataset import read_llava
from device.contracts.feature_stats import FEATURE_STATS_FILE, FeatureStats
from device.runtime import Runtime, RuntimeConfig


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("hfb")
    return build("tiny", root / "out", progress=False, cache=root / "cache"), root


def test_tiny_build_manifest_files_and_data(tiny):
    out, _ = tiny
    m = json.loads((out / "manifest.json").read_text())
    assert m["config_hash"] == config_hash(PRESETS["tiny"]) and m["family"] == "idefics3"
    for name, sha in m["files"].items():
        assert hf_build.sha256_file(out / name) == sha, name
    assert m["gguf_bytes"]["student-q4_0"] < m["gguf_bytes"]["student-f32"]
    assert {"student", "teacher", "student_device_q4_0"} <= set(m["accuracy"])
    for d in ("source", "combo"):
        lo, hi = m["accuracy"]["teacher"]["domains"][d]["vqa_ci"]
        assert 0 <= lo <= m["accuracy"]["teacher"]["domains"][d]["vqa"] <= hi <= 1
    ev = read_llava(out / m["data"]["eval"])
    assert len(ev) == 5 * PRESETS["tiny"].eval_n and {q.meta["domain"] for q in ev} == set(hf_build.DOMAINS)
    assert all(q.image.is_file() for q in ev)
    assert len(read_llava(out / m["data"]["replay"])) == PRESETS["tiny"].replay_n
    fs = FeatureStats.load(out / FEATURE_STATS_FILE)
    assert fs.mean.shape == (ModelSpec.from_dict(PRESETS["tiny"].student.spec).tokens_per_image(), 64)
    mtime = (out / "manifest.json").stat().st_mtime
    assert build("tiny", out, progress=False, cache=tiny[1] / "cache") == out  # cached: nothing rebuilt
    assert (out / "manifest.json").stat().st_mtime == mtime


def test_llama_cpp_tokenizes_and_lays_out_like_the_torch_side(tiny):
    """Prompt ids from libmtmd equal the training layout's ids (image rows aside), and the F32
    export's next-token logits match the torch model."""
    out, _ = tiny
    tok = load_tokenizer(out / "student")
    lay = Layout(tok, ModelSpec.from_dict(PRESETS["tiny"].student.spec).tokens_per_image())
    model = load_model(out / "student")
    ev = hf_build.eval_split(PRESETS["tiny"], n=4)
    gaps = []
    with Runtime(RuntimeConfig(out / "student-f32.gguf", out / "mmproj-f32.gguf", n_threads=1)) as rt:
        for q, img in zip(ev.questions, ev.images):
            _, embd, ids = rt.prefill(q, img)
            want = lay.prefix + lay.suffix(q)
            assert ids == [i for i in want if i != lay.image_id]
            with torch.no_grad():
                ref = model(inputs_embeds=embed(model, lay, torch.tensor([want]), img[None])).logits[0, -1].numpy()
            gaps.append(float(np.abs(ref - rt.logits()).max()))
            assert tok.encode(" " + q, add_special_tokens=False) == rt.tokenize(" " + q)
    assert max(gaps) < 1e-2, gaps


def test_device_q4_0_answers_agree_with_torch(tiny):
    out, _ = tiny
    m = json.loads((out / "manifest.json").read_text())
    assert m["device_vs_torch_agreement"]["q4_0"] >= 0.8


def test_role_training_is_reproducible(tmp_path):
    a = train_role("student", PRESETS["tiny"], tmp_path / "a")
    b = train_role("student", PRESETS["tiny"], tmp_path / "b")
    assert a.name == b.name == role_dir(PRESETS["tiny"], "student", tmp_path / "a").name
    for f in ("model.safetensors", "tokenizer.model", "tokenizer.json", "config.json"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_training_layout_equals_the_family_seams_libmtmd_layout(tiny):
    """The default is trained in the layout cloud/families/idefics3_layout.py derives from libmtmd."""
    from gguf import GGUFReader

    from cloud.families.idefics3_layout import Geometry, LlamaVocab, layout
    from cloud.zoo.hf_data import pixel_values
    from device.contracts import prompt

    out, _ = tiny
    lay = Layout(load_tokenizer(out / "student"), ModelSpec.from_dict(PRESETS["tiny"].student.spec).tokens_per_image())
    geo = Geometry.from_mmproj(GGUFReader(out / "mmproj-f32.gguf"))
    vocab = LlamaVocab(str(out / "student-f32.gguf"))
    ev = hf_build.eval_split(PRESETS["tiny"], n=2)
    for q, img in zip(ev.questions, ev.images):
        seam = layout(vocab, geo, prompt.prompt_text(q, True), img, lay.image_id)
        assert seam.input_ids == lay.prefix + lay.suffix(q)
        ours = pixel_values(img[None])[0].numpy()
        assert seam.pixel_values.shape[0] == 2  # one tile + the overview
        np.testing.assert_allclose(seam.pixel_values, np.stack([ours, ours]), atol=1e-6)


def test_polish_pass_warm_starts_from_the_cached_shorter_run(tmp_path):
    import dataclasses

    cfg = PRESETS["tiny"]
    longer = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, polish_steps=4))
    d = train_role("teacher", longer, tmp_path)
    base = role_dir(cfg, "teacher", tmp_path)
    assert base.is_dir() and d != base  # the shorter run was trained (and cached) on the way
    assert (d / "model.safetensors").read_bytes() != (base / "model.safetensors").read_bytes()


def test_more_polish_passes_chain_each_from_the_cached_run_before_it(tmp_path):
    """A further pass on fresh scenes starts from the role trained without it (reused from the
    cache, never retrained) and is reproducible; the cache names of earlier entries do not move."""
    import dataclasses

    from cloud.zoo.hf_build import steps_to_train

    cfg = PRESETS["tiny"]
    one = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, polish_steps=3))
    p = {"steps": 4, "lr": 1e-3, "n_train": 200, "data_seed": 31}
    two = dataclasses.replace(one, teacher=dataclasses.replace(one.teacher, more_polish=(p,)))
    assert steps_to_train(two, "teacher", tmp_path) == 30 + 3 + 4
    first = train_role("teacher", one, tmp_path)
    assert steps_to_train(two, "teacher", tmp_path) == 4  # only the new pass is left to train
    mtime = (first / "model.safetensors").stat().st_mtime
    d = train_role("teacher", two, tmp_path)
    assert d not in (first, role_dir(cfg, "teacher", tmp_path)) and steps_to_train(two, "teacher", tmp_path) == 0
    assert (first / "model.safetensors").stat().st_mtime == mtime
    assert (d / "model.safetensors").read_bytes() != (first / "model.safetensors").read_bytes()
    again = train_role("teacher", two, tmp_path / "fresh")  # from an empty cache: the same bytes
    assert (again / "model.safetensors").read_bytes() == (d / "model.safetensors").read_bytes()
    assert role_dir(one, "teacher", tmp_path) == first  # adding the field did not rename entries
