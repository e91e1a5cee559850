"""Smoke test after a patch: does the new version still think?

Hash checks prove that the bytes are the ones the cloud meant to send, not that they are good:
a patch with NaN weights verifies perfectly and then breaks every chat.  So right after an apply
the device loads the new version and answers one fixed probe (a mid-grey image and a plain
question, greedy, a few tokens).  It fails if any step's logits are not finite, if the runtime
errors, or if it produces no answer where the previous version did.  The caller rolls back.

The sync keeps the runtime the probe ran on (:func:`open_tested`) and evaluates on it: a patch
needs one load of the new version, not one for the probe, one to "reload" and one to evaluate.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from device.models import DeviceModel
from device.runtime import Runtime, RuntimeConfig, reuse_or_open

PROBE_QUESTION = "what is in the picture?"
PROBE_TOKENS = 4
PROBE_GREY = 128


@dataclass(frozen=True)
class SmokeResult:
    ok: bool
    reason: str = ""
    answer: str = ""


def _runtime_failed(exc: Exception) -> SmokeResult:
    first = (str(exc).splitlines() or [""])[0]
    return SmokeResult(False, f"the runtime failed ({type(exc).__name__}: {first[:200]})")


def probe(model: DeviceModel, threads: int = 1, runtime: Runtime | None = None) -> SmokeResult:
    """Run the fixed probe once; never raises for a broken model, says why instead.
    ``runtime``: one already loaded on ``model`` (left open), else a load of its own."""
    bad_steps: list[int] = []

    def finite(logits: np.ndarray) -> None:
        if not np.isfinite(logits).all():
            bad_steps.append(len(bad_steps))

    try:
        with reuse_or_open(runtime, RuntimeConfig(model.model, model.mmproj, n_threads=threads)) as rt:
            image = None
            if rt.has_vision and rt.image_size:
                image = np.full((rt.image_size, rt.image_size, 3), PROBE_GREY, np.uint8)
            gen = rt.generate(PROBE_QUESTION, image, max_tokens=PROBE_TOKENS, logits_hook=finite)
    except Exception as exc:  # a model that cannot run is exactly what this test is for
        return _runtime_failed(exc)
    if bad_steps:
        return SmokeResult(False, "non-finite logits on the probe")
    return SmokeResult(True, "", gen.text)


def smoke_test(new: DeviceModel, old: DeviceModel, threads: int = 1, runtime: Runtime | None = None) -> SmokeResult:
    """Probe ``new`` (on ``runtime`` if given); an empty answer fails only if ``old`` answered the
    same probe (some tiny models end at once on a grey image, and that is not the patch's fault)."""
    res = probe(new, threads, runtime)
    if not res.ok or res.answer:
        return res
    before = probe(old, threads)
    if before.ok and before.answer:
        return SmokeResult(False, f"no answer on the probe (the previous version answered "
                                  f"{before.answer[:40]!r})")
    return res


def open_tested(new: DeviceModel, old: DeviceModel, threads: int) -> tuple[Runtime | None, SmokeResult, float]:
    """(runtime on ``new`` or None, smoke result, seconds the load took): ``new`` loaded once and
    smoke-tested on that load.  A failed test or load returns no runtime (nothing is left open);
    otherwise the caller owns the runtime -- the sync evaluates on it, and its load time is the
    reload time it reports."""
    t = time.perf_counter()
    try:
        rt = Runtime(RuntimeConfig(new.model, new.mmproj, n_threads=threads))
    except Exception as exc:
        return None, _runtime_failed(exc), time.perf_counter() - t
    seconds = time.perf_counter() - t
    res = smoke_test(new, old, threads, rt)
    if not res.ok:
        rt.close()
        return None, res, seconds
    return rt, res, seconds
