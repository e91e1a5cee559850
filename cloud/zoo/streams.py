"""The chat stream a device sees on the embedded world: mostly in-distribution chats, with the
user's images drifting to a few target domains (issue 12: "70 % source, 30 % drifted").

One definition for the demo, the end-to-end test and the benchmark, so the three measure the
same thing.  numpy + scenes only: no torch on the device path."""
from __future__ import annotations

import numpy as np

from . import scenes

DRIFT_SOURCE_FRACTION = 0.7


def drift_stream(n: int, drifted: tuple[str, ...], seed: int, source_fraction: float = DRIFT_SOURCE_FRACTION,
                 salt: int = 0) -> list[scenes.Sample]:
    """``n`` generated chats, shuffled: ``source_fraction`` of them from the source domain, the
    rest split evenly over ``drifted`` (``source_fraction=0`` = the all-target stream)."""
    if not drifted:
        raise ValueError("a drift stream needs at least one drifted domain")
    unknown = set(drifted) - set(scenes.TARGET_DOMAINS)
    if unknown:
        raise ValueError(f"unknown target domain(s) {sorted(unknown)}; choose from {', '.join(scenes.TARGET_DOMAINS)}")
    n_src = int(round(source_fraction * n))
    n_t = n - n_src
    per = [n_t // len(drifted) + (1 if i < n_t % len(drifted) else 0) for i in range(len(drifted))]
    flat = scenes.generate("source", n_src, seed + salt) if n_src else []
    for d, k in zip(drifted, per):
        flat += scenes.generate(d, k, seed + salt)
    order = np.random.default_rng([seed, salt]).permutation(len(flat))
    return [flat[i] for i in order]


# the demo's and the e2e test's two rounds: a low-level shift, then a semantic one
ROUND_DRIFTS = (("noise", "texture"), ("combo", "rotate"))
