"""Tiny Hugging Face checkpoints of each required family, built in seconds and deterministic.

The tokenizer is a Llama-2-style byte-fallback BPE trained here on a few sentences (the official
converter reads it through its ``llama_hf`` path, no pre-tokenizer hash needed), with the tokens
SmolVLM's layout needs (``\\n\\n``, ``<fake_token_around_image>``, ``<global-img>``, ``<image>``,
``<row_R_col_C>``, ``<end_of_utterance>``).  Norm weights are jittered so that a wrong
norm mapping cannot hide behind all-ones.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for line in message['content'] %}"
    "{% if line['type'] == 'text' %}{{ line['text'] }}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
CORPUS = ["what colour is the circle ?", "red green blue square triangle circle", "User: Assistant: the answer is yes no",
          "how many shapes are there ? one two three", "is there a red square ? yes"]


def tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(CORPUS * 10, trainers.BpeTrainer(vocab_size=420, special_tokens=specials,
                                                             show_progress=False))
    extra = ["\n\n", "<|im_start|>", "<fake_token_around_image>", "<global-img>", "<image>", "<end_of_utterance>"]
    extra += [f"<row_{r}_col_{c}>" for r in range(1, 5) for c in range(1, 5)]
    tok.add_tokens([AddedToken(t, special=t != "\n\n", normalized=False) for t in extra])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<end_of_utterance>",
                                 unk_token="<unk>", pad_token="<unk>")
    hf.chat_template = CHAT_TEMPLATE
    return hf


def _jitter_norms(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def _text_config(vocab: int, eos: int) -> dict:
    return dict(model_type="llama", vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, initializer_range=0.2,
                tie_word_embeddings=False, bos_token_id=1, eos_token_id=eos, pad_token_id=0,
                architectures=["LlamaForCausalLM"])


def idefics3(out: Path, longest_edge: int = 64, seed: int = 0) -> Path:
    """SigLIP-style tower (32 px tiles, 8 px patches) + pixel shuffle x2 + 2-layer Llama."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil, Idefics3Processor

    torch.manual_seed(seed)
    tok = tokenizer()
    cfg = Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        text_config=_text_config(len(tok), tok.eos_token_id), scale_factor=2,
        image_token_id=tok.convert_tokens_to_ids("<image>"), tie_word_embeddings=False)
    model = Idefics3ForConditionalGeneration(cfg).eval()
    _jitter_norms(model)
    model.save_pretrained(out)
    ip = Idefics3ImageProcessorPil(do_image_splitting=True, size={"longest_edge": longest_edge},
                                   max_image_size={"longest_edge": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4, chat_template=CHAT_TEMPLATE).save_pretrained(out)
    c = json.loads((out / "config.json").read_text())
    c["text_config"]["architectures"] = ["LlamaForCausalLM"]  # transformers drops it; the converter needs it
    (out / "config.json").write_text(json.dumps(c, indent=1))
    return out


def llama(out: Path, seed: int = 0) -> Path:
    """A 2-layer text-only Llama with the same tokenizer (GQA: 4 query heads, 2 kv heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = tokenizer()
    model = LlamaForCausalLM(LlamaConfig(**_text_config(len(tok), tok.eos_token_id))).eval()
    _jitter_norms(model)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
