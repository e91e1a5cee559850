"""The model-family seam: one small registered interface per model family (see base.py)."""
