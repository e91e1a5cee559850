"""What one adaptation round reports, typed once for every face (CLI, TUI, bench) and the cloud.

The cloud's round job fills ``RoundMetrics`` (it travels as ``RoundStatus.metrics``); the device's
``device.evaluate`` fills ``Accuracy``.  The stage names are here too, so the progress the cloud
reports and the rows the faces draw cannot disagree ("compress 88 %" while the cloud evaluates).

Byte figures are named for what they count:
* ``patch_file_bytes``: the DWC patch file as it crosses the wire and as the version history
  records it -- the one "patch" size every face shows.
* ``uplink_shipped_bytes`` / ``uplink_baseline_bytes``: what UTS sent vs what a no-selection
  uplink of the same chats would send (``device.uts`` documents the baseline's formula).
"""
from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# The cloud's stages, in order, as ``RoundStatus.stage`` names them.
CLOUD_STAGES = ("load", "label", "distil", "compress", "evaluate", "done")
# The rows a face draws for one sync.  "check" (token + anything to learn from) comes first so a
# wrong token or an empty queue fails in a second, before the on-device measurement.
STAGES = ("check", "measure", "upload", "distil", "compress", "cloud eval", "download", "apply", "evaluate")
# cloud stage -> face row ("load"/"label" prepare the distillation; "done" closes the cloud eval)
CLOUD_TO_STAGE = {"queued": "distil", "load": "distil", "label": "distil", "distil": "distil",
                  "compress": "compress", "evaluate": "cloud eval", "done": "cloud eval"}


def face_stage(cloud_stage: str) -> str:
    """The face row of a cloud stage; an unknown (newer) cloud stage counts as distillation."""
    return CLOUD_TO_STAGE.get(cloud_stage, "distil")


# ``RoundStatus.progress`` is the whole round's fraction; each face row covers this span of it
# (cloud/round_job.py reports distil up to 0.75, compress at 0.78, evaluate at 0.88, done at 1).
ROW_SPANS = {"distil": (0.0, 0.75), "compress": (0.75, 0.88), "cloud eval": (0.88, 1.0)}


def face_progress(cloud_stage: str, progress: float) -> tuple[str, float]:
    """(face row, that row's own fraction) for a cloud stage and the round's overall progress, so
    a row's bar and the cloud's message agree ("cloud eval 0 %" while it evaluates)."""
    row = face_stage(cloud_stage)
    if cloud_stage == "done":
        return row, 1.0
    lo, hi = ROW_SPANS[row]
    return row, min(1.0, max(0.0, (float(progress) - lo) / (hi - lo)))


class _Open(BaseModel):
    # the producer may add fields before every face knows them: keep, do not refuse
    model_config = ConfigDict(extra="allow")


class DomainAccuracy(_Open):
    vqa: float | None = None
    caption_f1: float | None = None


class Accuracy(_Open):
    """Held-out accuracy of one model: overall and per domain (VQA exact match, caption F1)."""

    vqa: float | None = None
    caption_f1: float | None = None
    domains: dict[str, DomainAccuracy] = Field(default_factory=dict)

    def vqa_by_domain(self) -> dict[str, float]:
        return {d: float(a.vqa) for d, a in self.domains.items() if _finite(a.vqa)}

    @property
    def overall(self) -> float | None:
        return float(self.vqa) if _finite(self.vqa) else None


class RoundAccuracy(_Open):
    """The cloud's evaluation of its own twin: before, after the patch, unquantized, teacher."""

    before: Accuracy | None = None
    after: Accuracy | None = None
    after_full_precision: Accuracy | None = None
    teacher: Accuracy | None = None


class DwcMetrics(_Open):
    patch_file_bytes: int = Field(0, ge=0, description="the patch file as sent (the one patch size)")
    tensors_patched: int = Field(0, ge=0)
    rows_patched: int = Field(0, ge=0)
    rows_unchanged_after_quant: int = Field(0, ge=0)
    importance_kept: float | None = None
    full_fp16_delta_bytes: int = Field(0, ge=0, description="every changed weight as fp16: the no-DWC baseline")
    full_gguf_bytes: int = Field(0, ge=0, description="both GGUF files of the device model")
    skipped: Any = None

    def model_post_init(self, _ctx: Any) -> None:
        # older cloud builds call the file size "patch_bytes"
        extra = self.model_extra or {}
        if not self.patch_file_bytes and isinstance(extra.get("patch_bytes"), int):
            self.patch_file_bytes = extra["patch_bytes"]


class RoundMetrics(_Open):
    """``RoundStatus.metrics`` of a finished round."""

    samples: int = Field(0, ge=0, description="samples the round learned from (any upload, not only this sync's)")
    new_model: str | None = None
    seconds: float | None = None
    akd: dict[str, Any] = Field(default_factory=dict)
    dwc: DwcMetrics = Field(default_factory=DwcMetrics)
    accuracy: RoundAccuracy | None = None


def as_accuracy(acc: Any) -> Accuracy | None:
    """``device.evaluate``'s result (a dict) or an ``Accuracy``, as the typed model; None if empty."""
    if not acc:
        return None
    return acc if isinstance(acc, Accuracy) else Accuracy.model_validate(acc)


def accuracy_drop(before: Accuracy | None, after: Accuracy | None, tolerance: float = 0.0) -> float | None:
    """How much the overall VQA fell (positive) from ``before`` to ``after``; None when it did not
    fall by more than ``tolerance`` or either side is unknown.  Faces warn and offer a rollback."""
    if before is None or after is None or before.overall is None or after.overall is None:
        return None
    drop = before.overall - after.overall
    return drop if drop > tolerance else None


def _finite(x: float | None) -> bool:
    return x is not None and not math.isnan(float(x))


def paired_gain(before: Any, after: Any, domains) -> tuple[float, float, float] | None:
    """Mean per-question VQA gain from ``before`` to ``after`` (two ``device.evaluate`` results on
    the same eval set) over ``domains``, with its paired-bootstrap 95 % interval; None if either
    side lacks per-question scores.  A gain counts only when the interval excludes 0."""
    from .metrics import paired_bootstrap

    b, a = as_accuracy(before), as_accuracy(after)
    if b is None or a is None:
        return None
    xs, ys = [], []
    for d in domains:
        sb = (b.domains[d].model_extra or {}).get("scores") if d in b.domains else None
        sa = (a.domains[d].model_extra or {}).get("scores") if d in a.domains else None
        if not sb or not sa or len(sb) != len(sa):
            return None
        xs += sa
        ys += sb
    return paired_bootstrap(xs, ys)
