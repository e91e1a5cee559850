"""The device's prompt rendering, reused: a twin's prompt text is what the device's runtime renders.

One definition: the device's ChatPrompt (Jinja chat template from the GGUF, image as libmtmd's
media marker).  The cloud only builds one from the twin's GGUF metadata and calls it.
"""
from __future__ import annotations


def chat_prompt(twin):
    if "_chat" not in twin.meta:
        from device.chat_prompt import ChatPrompt

        tok = twin.tokenizer
        twin.meta["_chat"] = ChatPrompt(twin.meta.get("chat_template"), tok.bos_token or "", tok.eos_token or "",
                                        model_name=twin.files["model"].name)
    return twin.meta["_chat"]


def render(twin, question: str, with_image: bool):
    """``device.chat_prompt.Rendered``: text (with the marker), add_special, parse_special."""
    return chat_prompt(twin).render(question, with_image)
