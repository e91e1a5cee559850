"""How the device turns a question (and maybe an image) into the prompt text a GGUF expects.

A model answers well only in the format it was tuned on, and that format ships inside the GGUF as
``tokenizer.chat_template`` (Jinja). We render it the way llama-cpp-python does -- its
``Jinja2ChatFormatter`` (sandboxed Jinja with HF's extensions), whose output equals HF
``apply_chat_template(add_generation_prompt=True)``; the template writes BOS itself, so the text is
tokenized with special tokens parsed and no extra BOS. Not llama.cpp's C ``llama_chat_apply_template``:
it is not Jinja and drops a template's default system prompt.

An image becomes a text part holding libmtmd's media marker (what llama-cpp-python's
``MTMDChatHandler`` does), so any template that prints text parts places the image where the model
expects it, and libmtmd splices the image embeddings in at the marker.

A GGUF without a template gets the *stated* fallback (``PromptConfig.fallback``): ``completion``
(the bare question, BOS as the vocabulary says), ``toy`` (cdcca's ``USER: ... ASSISTANT:``), or a
Jinja template string of your own. Never silent: ``ChatPrompt.notice`` is one line saying so.
The embedded default carries cdcca's own template; it is rendered by ``device.contracts.prompt``
exactly as the torch side tokenizes it, so the toy's prompts stay bit-identical to its training.
"""
from __future__ import annotations

from dataclasses import dataclass

from device.contracts import prompt

FALLBACKS = ("completion", "toy")


@dataclass(frozen=True)
class PromptConfig:
    """``fallback``: used only when the GGUF has no chat template (or ``use_template`` is False):
    ``completion``, ``toy``, or a Jinja template. ``system``: an optional system message (small
    instruct models answer far better with one); None keeps the template's own default."""

    fallback: str = "completion"
    system: str | None = None
    use_template: bool = True


@dataclass(frozen=True)
class Rendered:
    """Prompt text plus how to tokenize it (``add_special``: let the vocab add BOS;
    ``parse_special``: turn ``<|im_start|>``-style text into its special token)."""

    text: str
    add_special: bool
    parse_special: bool


def _is_jinja(s: str) -> bool:
    return "{%" in s or "{{" in s


class ChatPrompt:
    """The prompt format of one loaded model; ``kind`` says which one was chosen and why."""

    def __init__(self, template: str | None, bos_token: str, eos_token: str, cfg: PromptConfig | None = None,
                 model_name: str = "model", marker: str = prompt.MEDIA_MARKER) -> None:
        self.cfg = cfg or PromptConfig()
        self.marker = marker
        self.notice: str | None = None
        fb = self.cfg.fallback
        if fb not in FALLBACKS and not _is_jinja(fb):
            raise ValueError(f"unknown prompt fallback {fb!r}: use one of {', '.join(FALLBACKS)} or a Jinja template")
        if template and self.cfg.use_template:
            chosen, self.kind = template, "template"
        else:
            why = "has no tokenizer.chat_template" if not template else "template disabled by configuration"
            self.kind = f"fallback:{fb if fb in FALLBACKS else 'jinja'}"
            self.notice = f"{model_name} {why}: prompts use the fallback format {self.kind.split(':')[1]!r}"
            chosen = fb if _is_jinja(fb) else None
        if chosen is not None and chosen.strip() == prompt.CHAT_TEMPLATE.strip():
            chosen, self.kind = None, "toy"  # cdcca's own models: the torch side's exact pieces
        self._fmt = None
        if chosen is not None:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            self._fmt = Jinja2ChatFormatter(chosen, eos_token=eos_token, bos_token=bos_token,
                                            add_generation_prompt=True)

    def messages(self, question: str, with_image: bool) -> list[dict]:
        """The chat messages rendered for one turn (also what a test hands to HF)."""
        msgs = [{"role": "system", "content": self.cfg.system}] if self.cfg.system else []
        content: str | list[dict] = question
        if with_image:
            content = [{"type": "text", "text": self.marker}, {"type": "text", "text": question}]
        return msgs + [{"role": "user", "content": content}]

    def render(self, question: str, with_image: bool = False) -> Rendered:
        question = question.strip()
        if self._fmt is not None:
            out = self._fmt(messages=self.messages(question, with_image))
            return Rendered(out.prompt, not out.added_special, True)
        if self.kind.endswith("toy"):
            return Rendered(prompt.prompt_text(question, with_image), True, False)
        text = (self.marker + "\n" if with_image else "") + question  # plain completion
        if self.cfg.system:
            text = self.cfg.system.strip() + "\n\n" + text
        return Rendered(text, True, False)
