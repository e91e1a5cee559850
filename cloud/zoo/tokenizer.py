"""A byte-level BPE tokenizer trained with `tokenizers` on the generated text.

Byte-level BPE with the GPT-2 pre-tokenizer regex exports to GGUF as ``tokenizer.ggml.model =
"gpt2"`` with pre-tokenizer ``"gpt-2"``, and llama.cpp then tokenizes exactly as HF does.
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from device.contracts.prompt import BOS, EOS, PAD, PREFIX, SPECIAL_TOKENS


def train_tokenizer(texts: list[str], vocab_size: int = 384) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts + [PREFIX, "\nASSISTANT:"], trainer=trainer)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    return Tokenizer.from_file(str(path))


def special_ids(tok: Tokenizer) -> dict[str, int]:
    return {"pad": tok.token_to_id(PAD), "bos": tok.token_to_id(BOS), "eos": tok.token_to_id(EOS)}


def encode(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids
