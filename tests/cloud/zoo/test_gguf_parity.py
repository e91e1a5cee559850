"""The proof the export is right: llama.cpp and the torch model agree on the same inputs.

Tolerances, stated against the scale of the outputs (ggml's float32 CPU kernels sum in another
order, read GELU from an fp16 table, and differ most on high-contrast images):
* F32 export: next-token logits within 1e-2 absolute and 1e-3 of the largest |logit| (observed on
  the shipped student: <= 5.8e-3 absolute on logits of magnitude 10-16, i.e. <= 3.6e-4 relative),
  projected image embeddings within 5e-3 (observed <= 3.2e-3 on embeddings of magnitude ~2.5),
  and the same argmax token on every sample.
* Quantized exports: the torch twin loaded from the GGUF must be far closer to llama.cpp than the
  original float model is (llama.cpp also quantizes activations for Q8_0/Q4_0 matmuls).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cloud.zoo import data, scenes
from cloud.zoo.build import load_pt
from cloud.zoo.evaluate import generate
from cloud.zoo.gguf_load import dequantize, load_gguf_pair, open_gguf
from cloud.zoo.tokenizer import load_tokenizer
from device.runtime import Runtime, RuntimeConfig


def _held_out(n_per_domain=4, seed=4242):
    return [s for d in scenes.DOMAINS for s in scenes.generate(d, n_per_domain, seed)]


@pytest.fixture(scope="module")
def student(assets):
    return load_pt(assets / "student.pt"), data.Codec(load_tokenizer(assets / "tokenizer.json"))


def _torch_next_logits(model, codec, sample):
    b = data.make_batch(codec, sample.image[None], [sample.question], None)
    with torch.no_grad():
        return model(b)[0, -1].numpy(), model.image_embeds(b.images)[0].numpy(), b.prefix_ids[0].tolist() + b.text_ids[0].tolist()


def test_f32_logits_embeddings_and_prompt_tokens_match(assets, student):
    model, codec = student
    with Runtime(RuntimeConfig(assets / "student-f32.gguf", assets / "mmproj-f32.gguf", n_threads=1, kv_cache="f32")) as rt:
        worst_logit = worst_rel = worst_emb = 0.0
        for s in _held_out():
            _, emb, ids = rt.prefill(s.question, s.image)
            lg = rt.logits().copy()
            lt, et, tids = _torch_next_logits(model, codec, s)
            assert ids == tids
            worst_logit = max(worst_logit, float(np.abs(lg - lt).max()))
            worst_rel = max(worst_rel, float(np.abs(lg - lt).max() / np.abs(lt).max()))
            worst_emb = max(worst_emb, float(np.abs(emb - et).max()))
            assert lg.argmax() == lt.argmax()
    assert worst_logit < 1e-2 and worst_rel < 1e-3, (worst_logit, worst_rel)
    assert worst_emb < 5e-3, worst_emb


def test_llama_cpp_tokenizer_matches_hf(assets, student):
    _, codec = student
    texts = [s.question for s in _held_out(2)] + [" " + s.answer for s in _held_out(2)] + [
        "", " ", "hello world", "  two  spaces", "ünïcödé ✓ 漢字", "digits 0123456789", "tabs\tand\nnewlines",
        "what colour is the circle?!", "ASSISTANT: USER:", "a, b and c.", "émoji 🙂 end"]
    with Runtime(RuntimeConfig(assets / "student-f32.gguf", None, n_threads=1)) as rt:
        for t in texts:
            assert rt.tokenize(t) == codec.tok.encode(t, add_special_tokens=False).ids, t


@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
def test_loader_round_trips_quantized_files(assets, student, quant):
    """GGUF -> torch gives exactly the dequantized tensors, and it is what llama.cpp computes with."""
    model, _ = student
    twin, _ = load_gguf_pair(assets / f"student-{quant}.gguf", assets / "mmproj-f32.gguf")
    r = open_gguf(assets / f"student-{quant}.gguf")
    t = {x.name: x for x in r.tensors}["blk.0.attn_q.weight"]
    assert torch.equal(twin.text.layers[0].q_proj.weight, torch.from_numpy(dequantize(t)))
    assert not torch.equal(twin.text.layers[0].q_proj.weight, model.text.layers[0].q_proj.weight)
    codec = data.Codec(load_tokenizer(assets / "tokenizer.json"))
    d_twin = d_float = 0.0
    with Runtime(RuntimeConfig(assets / f"student-{quant}.gguf", assets / "mmproj-f32.gguf", n_threads=1)) as rt:
        for s in _held_out(2):
            rt.prefill(s.question, s.image)
            lg = rt.logits().copy()
            d_twin += float(np.abs(lg - _torch_next_logits(twin, codec, s)[0]).mean())
            d_float += float(np.abs(lg - _torch_next_logits(model, codec, s)[0]).mean())
    # Q4_0: weight rounding dominates, so the twin must be much closer than the float model.
    # Q8_0: llama.cpp also rounds activations to 8 bits in every matmul, which dominates the tiny
    # weight error, so the twin can only be required to be no farther than the float model.
    assert d_twin < (0.5 if quant == "q4_0" else 1.0) * d_float, (d_twin, d_float)


def test_f32_loader_is_exact(assets, student):
    model, _ = student
    twin, tok = load_gguf_pair(assets / "student-f32.gguf", assets / "mmproj-f32.gguf")
    for (k, a), (k2, b) in zip(model.state_dict().items(), twin.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert tok.encode("what shape is the red object?").ids == load_tokenizer(assets / "tokenizer.json").encode(
        "what shape is the red object?").ids


def test_q8_greedy_answers_agree_with_torch_twin(assets):
    """>= 95% of greedy answers of the Q8_0 device model equal the torch twin's (held-out set)."""
    twin, tok = load_gguf_pair(assets / "student-q8_0.gguf", assets / "mmproj-f32.gguf")
    codec = data.Codec(tok)
    samples = _held_out(12, seed=777)
    ref = generate(twin, codec, np.stack([s.image for s in samples]), [s.question for s in samples])
    with Runtime(RuntimeConfig(assets / "student-q8_0.gguf", assets / "mmproj-f32.gguf", n_threads=1)) as rt:
        got = [rt.generate(s.question, s.image).text for s in samples]
    agree = np.mean([a == b for a, b in zip(got, ref)])
    assert agree >= 0.95, agree
