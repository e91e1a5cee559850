"""Shared pieces of the sections: the section result type, accuracy helpers, the run context and
sentence builders that state comparisons from the numbers (never by hand)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .chats import DOMAINS, TARGETS
from .profiles import Profile
from .table import Table

DEFAULT_BUDGET = 48 * 1024  # the product's downlink budget (RoundOptions.downlink_budget_bytes)
NOISE_PTS = 0.005  # below half a point a difference is reported as a tie


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
    profile: Profile
    out: Path
    work: Path
    model_dir: Path
    streams: list = field(default_factory=list)  # ChatStream per seed
    results: dict = field(default_factory=dict)  # job name -> job result

    @property
    def seeds(self) -> list[int]:
        return list(range(self.profile.seeds))


def chat_seed(seed: int) -> int:
    """Generator seed of a chat stream: disjoint from the eval split (2000 + build seed), the
    replay pool (build seed 0) and the device's shipped eval set (3000)."""
    return 1000 + seed


def vqa(acc: dict, domain: str) -> float:
    return float(acc["domains"][domain]["vqa"])


def target_mean(acc: dict) -> float:
    return float(sum(vqa(acc, d) for d in TARGETS) / len(TARGETS))


def columns_of(acc: dict) -> list[float]:
    """source, 4 targets, target mean, caption F1: the accuracy columns every table shares."""
    return [vqa(acc, d) for d in DOMAINS] + [target_mean(acc), float(acc["caption_f1"])]


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


def compare(ours: Sequence[float], theirs: Sequence[float], what: str, ours_name: str, their_name: str) -> tuple[str, bool]:
    """One sentence comparing mean values over seeds; returns (sentence, ours_wins).  A win
    smaller than the seed spread is called out as such."""
    a, b = mean(ours), mean(theirs)
    d = a - b
    spread = max(std(ours), std(theirs))
    if d > NOISE_PTS:
        caveat = ""
        if len(ours) < 2:
            caveat = " (one seed: no spread measured)"
        elif d <= spread:
            caveat = f" -- within the seed spread (±{100 * spread:.1f} pts), so not a clear win"
        return f"{ours_name} beats {their_name} on {what}: {a:.3f} vs {b:.3f} ({pts(d)}){caveat}.", True
    if d >= -NOISE_PTS:
        return f"{ours_name} does NOT beat {their_name} on {what}: a tie, {a:.3f} vs {b:.3f} ({pts(d)}).", False
    return f"{ours_name} does NOT beat {their_name} on {what}: {a:.3f} vs {b:.3f} ({pts(d)}).", False
