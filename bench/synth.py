"""Synthetic but schema-valid UplinkSamples (the fleet's devices, the transmission section's round
trigger).  Kept free of torch and of the rest of the bench so that dozens of spawned device
processes start quickly."""
from __future__ import annotations

import base64
import hashlib
import io

import numpy as np
from PIL import Image

from device.contracts.wire import TokenStats, UplinkSample


def synthetic_id(device: str, i: int) -> str:
    return hashlib.sha256(f"{device}/{i}".encode()).hexdigest()[:32]


def synthetic_sample(device: str, i: int, seed: int = 0) -> UplinkSample:
    """A 32x32 image of coarse random blocks (PNG, ~2 KB like a UTS-kept scene) + QA text."""
    rng = np.random.default_rng([seed, i, int(hashlib.sha256(device.encode()).hexdigest()[:8], 16)])
    img = np.repeat(np.repeat(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), 2, 0), 2, 1)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    n_tok = int(rng.integers(1, 4))
    ent = [round(float(x), 4) for x in rng.uniform(0.2, 1.5, n_tok)]
    return UplinkSample(
        sample_id=synthetic_id(device, i), base_model="0" * 16, prompt="what colour is the circle?",
        answer="red", answer_token_ids=list(range(5, 5 + n_tok)), image=base64.b64encode(buf.getvalue()),
        image_format="png", tokens=TokenStats(positions=list(range(n_tok)), token_ids=list(range(5, 5 + n_tok)),
                                              entropy=ent),
        score=max(ent), ood_score=float(rng.uniform(0.5, 3.0)), raw_bytes=20_000, tag="fleet")
