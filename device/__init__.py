"""The device half of cdcca: runs on the laptop, never imports torch or transformers."""
