"""The embedded default: a generated world (scenes) -> SentencePiece tokenizer -> tiny HF Idefics3
student and teacher -> GGUF through llama.cpp's official converter (``cdcca models build``).

Importing this package does not import torch: `scenes` is numpy + Pillow only, so the device
tests and the demo can generate images without the cloud stack.
"""
