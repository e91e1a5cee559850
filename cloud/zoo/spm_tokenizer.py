"""The embedded default's tokenizer: a SentencePiece BPE model with byte fallback, saved as a
Hugging Face ``LlamaTokenizer`` (``tokenizer.model`` + ``tokenizer.json``).

Why SentencePiece and not a byte-level BPE: llama.cpp's official converter refuses a BPE
tokenizer whose pre-tokenizer hash it does not know (a fresh vocabulary always has an unknown
hash), while a ``tokenizer.model`` converts as ``tokenizer.ggml.model = "llama"`` and llama.cpp's
SPM tokenizer reproduces SentencePiece BPE.  The tokens libmtmd's ``idefics3`` layout looks up
by text (``\\n\\n``, ``<fake_token_around_image>``, ``<global-img>``, ``<row_1_col_1>``) are
user-defined pieces, so each is one token on both sides; ``\\n`` is the byte token ``<0x0A>``.
"""
from __future__ import annotations

import io
import json
import shutil
import tempfile
from pathlib import Path

from device.contracts.prompt import BOS, CHAT_TEMPLATE, EOS, PAD

UNK = "<unk>"
IMAGE_TOKEN = "<image>"  # Idefics3's placeholder id (the twin fills its rows with image features)
LAYOUT_TOKENS = ("\n\n", "<fake_token_around_image>", "<global-img>", "<row_1_col_1>", IMAGE_TOKEN,
                 "<end_of_utterance>")
VOCAB_SIZE = 512  # 256 byte tokens + specials + characters + ~200 merges
FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def train_spm(texts: list[str], vocab_size: int = VOCAB_SIZE) -> bytes:
    """Serialized SentencePiece BPE model trained on ``texts`` (deterministic: one thread,
    no sampling, identity normalisation so the device sees exactly the training text)."""
    import sentencepiece as spm

    out = io.BytesIO()
    lines = sorted(set(t.replace("\n", " ").strip() for t in texts if t.strip()))
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=out, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, split_digits=True,
        user_defined_symbols=list(LAYOUT_TOKENS), unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        unk_piece=UNK, bos_piece=BOS, eos_piece=EOS, pad_piece=PAD, num_threads=1,
        input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2)
    return out.getvalue()


def save_tokenizer(spm_model: bytes, out: str | Path):
    """Write ``tokenizer.model`` and the HF files into ``out``; returns the HF tokenizer."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as td:
        (Path(td) / "tokenizer.model").write_bytes(spm_model)
        (Path(td) / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
            "add_prefix_space": False, "bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD}))
        tok = AutoTokenizer.from_pretrained(td)
    # Mark the layout pieces as added tokens so the converter types them (SentencePiece's
    # user-defined pieces would otherwise land in the GGUF as NORMAL and llama.cpp would spell them
    # out): ``\n\n`` user-defined (matched in any text, as HF does), the image markers control.
    tok.add_tokens([AddedToken(LAYOUT_TOKENS[0], special=False, normalized=False)])
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in LAYOUT_TOKENS[1:]], special_tokens=True)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    (out / "tokenizer.model").write_bytes(spm_model)  # the converter reads this, not tokenizer.json
    _write_added_tokens_decoder(out)
    return tok


def _write_added_tokens_decoder(out: Path) -> None:
    """transformers 5 keeps added tokens only in tokenizer.json; llama.cpp's converter reads their
    types from ``tokenizer_config.json``'s ``added_tokens_decoder`` (the transformers 4 layout)."""
    added = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))["added_tokens"]
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["added_tokens_decoder"] = {str(a["id"]): {k: a[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                                                      "single_word", "special")} for a in added}
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True), encoding="utf-8")


def build_tokenizer(texts: list[str], out: str | Path, vocab_size: int = VOCAB_SIZE):
    return save_tokenizer(train_spm(texts, vocab_size), out)


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def copy_tokenizer(src: str | Path, dst: str | Path) -> None:
    """Put the tokenizer files of ``src`` (a directory ``save_tokenizer`` wrote) into a checkpoint."""
    for name in FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)
