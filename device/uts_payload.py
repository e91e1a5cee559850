"""UTS payload encoding: how a kept sample's image and visual tokens become few bytes.

Separate from the selection logic in ``device/uts.py`` (which chats and tokens to keep): these are
the byte-level codecs both sides share.  Masked patches are filled with a constant so the
re-encoded image compresses to almost nothing where it carries no information; kept visual-token
embeddings travel as f16 or as int8 with one scale per token; ``decode_visual_tokens`` is what the
cloud uses to read them back.
"""
from __future__ import annotations

import base64
import io
import math
from typing import Sequence

import numpy as np
from PIL import Image

from device.contracts.wire import VisualTokens


def n_visual_kept(n: int, mask_ratio: float) -> int:
    return 0 if n == 0 else max(1, int(math.floor((1.0 - mask_ratio) * n + 0.5)))


def mask_image(rgb: np.ndarray, patch: int, kept: Sequence[int], fill: int) -> np.ndarray:
    """Copy of ``rgb`` with every patch not in ``kept`` (row-major grid index) set to ``fill``."""
    gh, gw = rgb.shape[0] // patch, rgb.shape[1] // patch
    grid = np.zeros(gh * gw, dtype=bool)
    grid[list(kept)] = True
    pix = np.zeros(rgb.shape[:2], dtype=bool)
    pix[:gh * patch, :gw * patch] = np.repeat(np.repeat(grid.reshape(gh, gw), patch, 0), patch, 1)
    out = rgb.copy()
    out[~pix] = fill
    return out


def encode_image(rgb: np.ndarray, fmt: str, quality: int | None = None) -> tuple[bytes, str]:
    """Lossless PNG/WebP, or lossy WebP when ``quality`` is given (budget fallback)."""
    buf = io.BytesIO()
    im = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB")
    if quality is not None:
        im.save(buf, format="WEBP", quality=quality, method=6)
        return buf.getvalue(), "webp"
    if fmt == "png":
        im.save(buf, format="PNG", optimize=True)
    else:
        im.save(buf, format="WEBP", lossless=True, quality=100, method=6)
    return buf.getvalue(), fmt


def encode_visual_tokens(emb: np.ndarray, indices: Sequence[int], dtype: str) -> VisualTokens:
    """f16: plain half floats.  q8: int8 with one float32 scale per token (max-abs / 127).

    pydantic's ``Base64Bytes`` decodes its *input*: raw bytes must go in base64-encoded.
    """
    idx = sorted(int(i) for i in indices)
    x = np.asarray(emb, dtype=np.float32)[idx]
    if dtype == "f16":
        return VisualTokens(indices=idx, n_total=len(emb), dim=x.shape[1], dtype="f16",
                            data=base64.b64encode(x.astype("<f2").tobytes()))
    scale = np.abs(x).max(axis=1) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(x / scale[:, None]), -127, 127).astype(np.int8)
    return VisualTokens(indices=idx, n_total=len(emb), dim=x.shape[1], dtype="q8",
                        scale=[float(s) for s in scale], data=base64.b64encode(q.tobytes()))


def decode_visual_tokens(vt: VisualTokens) -> np.ndarray:
    """Inverse of ``encode_visual_tokens``: float32 [len(indices), dim] (for the cloud)."""
    if vt.dtype == "f16":
        return np.frombuffer(vt.data, dtype="<f2").reshape(len(vt.indices), vt.dim).astype(np.float32)
    q = np.frombuffer(vt.data, dtype=np.int8).reshape(len(vt.indices), vt.dim).astype(np.float32)
    return q * np.asarray(vt.scale, dtype=np.float32)[:, None]
