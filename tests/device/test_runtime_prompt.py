"""The device renders a foreign GGUF's own chat template exactly as transformers does, states its
fallback when the GGUF has none, stops at the model's end-of-generation token and marks a cut answer.

The model is a tiny random-weight HF Llama whose tokenizer carries a ChatML-style template with a
default system prompt, converted by llama.cpp's official converter (cloud/converter.py)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from device.chat_prompt import ChatPrompt, PromptConfig
from device.contracts.prompt import CHAT_TEMPLATE
from device.runtime import Runtime, RuntimeConfig
from tiny_hf import CHATML_TEMPLATE, tiny_llama

TEMPLATE = CHATML_TEMPLATE
# token-level equality needs text this toy tokenizer covers (llama.cpp's SPM merge-by-score and HF's
# BPE merges part ways on byte-fallback runs); the rendered TEXT is compared on every question
QUESTIONS = ("what colour is the circle?", "  hello world how are you today?  ", "is the circle red")
ODD = ("Ünïcode: 3.3 + 33 = ?", "two\nlines, {braces} <|im_end|> inside")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from cloud.converter import convert

    root = tmp_path_factory.mktemp("tiny-llama")
    with_t = tiny_llama(root / "hf", TEMPLATE)
    plain = tiny_llama(root / "hf-plain", None)
    assert "chat_template" not in json.loads((plain / "tokenizer_config.json").read_text())
    return {"hf": with_t, "gguf": convert(with_t, root / "chat.gguf"), "plain": convert(plain, root / "plain.gguf")}


def _rt(path: Path, **prompt) -> Runtime:
    return Runtime(RuntimeConfig(path, n_threads=1, n_ctx=256, prompt=PromptConfig(**prompt)))


@pytest.mark.parametrize("system", [None, "Answer in one word."])
def test_prompt_tokens_equal_transformers_apply_chat_template(converted, system):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(converted["hf"])
    with _rt(converted["gguf"], system=system) as rt:
        assert rt.chat.kind == "template" and rt.prompt_notice is None
        for q in QUESTIONS:
            msgs = rt.chat.messages(q.strip(), False)
            want = hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
            assert rt.prompt_ids(q) == list(want), q
        for q in QUESTIONS + ODD:
            msgs = rt.chat.messages(q.strip(), False)
            assert rt.render(q).text == hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        text = rt.render(QUESTIONS[0]).text
    # the template's own default system prompt survives (the C llama_chat_apply_template drops it)
    assert ("You are a helpful assistant." in text) == (system is None)
    assert text.endswith("<|im_start|>assistant\n")


def test_template_less_gguf_uses_the_stated_fallback(converted, caplog):
    with caplog.at_level("WARNING", logger="cdcca.runtime"), _rt(converted["plain"]) as rt:
        assert rt.chat.kind == "fallback:completion"
        notice = rt.prompt_notice
        assert notice and "\n" not in notice and "no tokenizer.chat_template" in notice and "completion" in notice
        assert notice in caplog.text  # said out loud, not only stored
        assert rt.prompt_ids(" what colour? ") == rt.tokenize("what colour?", add_bos=True)
        gen = rt.generate("what colour?", max_tokens=2)
        assert gen.prompt_kind == "fallback:completion"
    with _rt(converted["plain"], fallback="toy") as rt:
        assert rt.chat.kind == "fallback:toy" and rt.render("q?").text == "USER: \nq?\nASSISTANT:"
    with _rt(converted["plain"], fallback="[Q] {{ messages[-1]['content'] }} [A]") as rt:
        assert rt.chat.kind == "fallback:jinja" and rt.render("q?").text == "[Q] q? [A]"
    with _rt(converted["gguf"], use_template=False) as rt:  # a template can be turned off, loudly
        assert rt.chat.kind == "fallback:completion" and "disabled" in rt.prompt_notice
    with pytest.raises(ValueError, match="unknown prompt fallback"):
        ChatPrompt(None, "<s>", "</s>", PromptConfig(fallback="llama-2"))


def test_answers_stop_at_the_models_eog_token_and_mark_truncation(converted):
    with _rt(converted["gguf"]) as rt:
        eos = rt.tokenize("<|im_end|>", special=True)
        assert len(eos) == 1 and rt.is_eog(eos[0])
        steps = []

        def force_eog_at_step_3(logits: np.ndarray) -> None:  # the hook sees the live logits view
            steps.append(1)
            if len(steps) == 4:
                logits[eos[0]] = 1e9

        gen = rt.generate("hello", max_tokens=10, logits_hook=force_eog_at_step_3)
        assert len(gen.token_ids) == 3 and not gen.truncated and eos[0] not in gen.token_ids
        cut = rt.generate("hello", max_tokens=2)
        assert len(cut.token_ids) == 2 and cut.truncated
        assert gen.token_ids[:2] == cut.token_ids  # greedy: the same first tokens either way
        with pytest.raises(ValueError, match="max_tokens"):
            rt.generate("hello", max_tokens=0)


def test_image_turns_place_the_media_marker_as_a_text_part():
    cp = ChatPrompt(TEMPLATE, "<s>", "<|im_end|>", marker="<__media__>")
    r = cp.render("what is it?", with_image=True)
    assert r.text.count("<__media__>") == 1 and "<|im_start|>user\n<__media__>what is it?<|im_end|>" in r.text
    assert r.parse_special and not r.add_special  # the template wrote BOS itself
    toy = ChatPrompt(CHAT_TEMPLATE, "<s>", "</s>")
    assert toy.kind == "toy" and toy.render("q?", True).text == "USER: <__media__>\nq?\nASSISTANT:"
