"""Tiny random-weight Hugging Face checkpoints for tests (built in seconds, never downloaded).

``tiny_llama`` writes a Llama with a byte-fallback BPE tokenizer (Llama-style, so llama.cpp's
official converter takes it without a known pre-tokenizer hash) and ChatML special tokens; give it
a chat template to get one stored in the tokenizer (and so in the converted GGUF).
"""
from __future__ import annotations

from pathlib import Path

CHATML_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{{ bos_token }}<|im_start|>system\nYou are a helpful assistant."
    "<|im_end|>\n{% else %}{{ bos_token }}{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = ["what colour is the circle? the circle is red. you are a helpful assistant."] * 50 \
    + ["hello world how are you today, system user"] * 50


def tiny_llama(out: Path, template: str | None = CHATML_TEMPLATE, hidden: int = 64, layers: int = 2,
               intermediate: int = 128, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials + [f"<0x{i:02X}>" for i in range(256)],
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    ft = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", unk_token="<unk>",
                                 pad_token="</s>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    if template:
        ft.chat_template = template
    ft.save_pretrained(out)
    cfg = LlamaConfig(vocab_size=len(ft), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=ft.bos_token_id, eos_token_id=ft.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out
