"""The embedded default models: procedural data -> tokenizer -> tiny LLaVA pair -> GGUF.

Importing this package does not import torch: `scenes` is numpy + Pillow only, so the device
tests and the demo can generate images without the cloud stack.
"""
