"""The prompt format shared by the torch models (training, cloud) and llama.cpp (device).

A turn is ``<bos>USER: <image>\\n{question}\\nASSISTANT:`` and the model answers `` {answer}<eos>``.
The image marker is where libmtmd inserts the projected image embeddings; on the torch side the
text is tokenized in the same pieces (before the marker / after it / the answer) so both sides
see identical token ids.
"""
from __future__ import annotations

MEDIA_MARKER = "<__media__>"  # libmtmd's default marker
PREFIX = "USER: "
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (PAD, BOS, EOS)

# Jinja chat template stored in the GGUF so llama.cpp's own chat handlers render the same turns;
# message content may be a string or a list of {"type": "text"|"image_url"} parts.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token }}USER: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for p in m['content'] %}{% if p['type'] == 'text' %}{{ p['text'] }}{% else %}<__media__>\n{% endif %}{% endfor %}"
    "{% endif %}\nASSISTANT:{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


def suffix(question: str) -> str:
    """The text after the image marker (or directly after PREFIX for text-only turns)."""
    return f"\n{question.strip()}\nASSISTANT:"


def prompt_text(question: str, with_image: bool) -> str:
    """The whole prompt as libmtmd tokenizes it (BOS is added by the tokenizer)."""
    return PREFIX + (MEDIA_MARKER if with_image else "") + suffix(question)


def answer_text(answer: str) -> str:
    return " " + answer.strip()
