"""Shared pieces of the sections: the section result type, the run context handed to the
model-agnostic sections, and small number helpers (sentences are built from the numbers, never by hand)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from device.contracts.wire import RoundOptions

from .profiles import Profile
from .table import Table

DEFAULT_BUDGET = RoundOptions().downlink_budget_bytes  # the product's downlink budget (bytes)
BUDGET_KIB = f"{DEFAULT_BUDGET / 1024:g} KiB"  # how the report names it


@dataclass
class Section:
    key: str
    title: str
    tables: list[Table] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)  # auto-generated sentences from the numbers
    notes: list[str] = field(default_factory=list)  # how it was measured
    plots: list[str] = field(default_factory=list)  # PNG file names under the output folder
    data: dict = field(default_factory=dict)  # raw numbers for results.json
    seconds: float = 0.0
    compute_s: float = 0.0  # worker time of this section's jobs (they run in the pool, before the section)
    not_beaten: list[str] = field(default_factory=list)  # where CDCCA loses to / ties a baseline

    def to_json(self) -> dict:
        return {"key": self.key, "title": self.title, "tables": [t.to_json() for t in self.tables],
                "findings": self.findings, "notes": self.notes, "plots": self.plots, "data": self.data,
                "seconds": self.seconds, "compute_s": self.compute_s, "not_beaten": self.not_beaten}


@dataclass
class Context:
    """What the model-agnostic sections (transmission, device, fleet) read from the seam bench's run."""

    profile: Profile
    out: Path
    work: Path
    model_dir: Path
    stream: object = None  # bench.chats.ChatStream: the first reported seed's drift stream (the uplink)
    patch: Path | None = None  # CDCCA's DWC patch of that stream at DEFAULT_BUDGET (the downlink)
    delta: Path | None = None  # the fp16 delta of every changed tensor of the same merged update


def mean(xs: Sequence[float]) -> float:
    xs = [float(x) for x in xs]
    return sum(xs) / len(xs) if xs else float("nan")


def std(xs: Sequence[float]) -> float:
    xs = [float(x) for x in xs]
    if len(xs) < 2:
        return 0.0
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def pts(x: float) -> str:
    return f"{100 * x:+.1f} pts"
