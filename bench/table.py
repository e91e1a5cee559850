"""A table that renders to Markdown and to JSON from the same object, so the report and
``results.json`` can never disagree.  A cell is a measured number (optionally mean ± std over
seeds), a count, or an explicit "n/a (reason)" -- never a silent blank or NaN."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence


@dataclass
class Cell:
    value: float | None = None
    std: float | None = None
    fmt: str = "{:.3f}"
    na: str | None = None  # reason the cell has no number (documented in the table notes)

    def text(self) -> str:
        if self.na is not None or self.value is None or (isinstance(self.value, float) and math.isnan(self.value)):
            return f"n/a ({self.na or 'not measured'})"
        s = self.fmt.format(self.value)
        if self.std is not None:
            s += " ± " + self.fmt.format(self.std)
        return s

    def to_json(self) -> dict:
        if self.na is not None or self.value is None:
            return {"na": self.na or "not measured"}
        out = {"value": float(self.value)}
        if self.std is not None:
            out["std"] = float(self.std)
        return out


def num(value, fmt: str = "{:.3f}") -> Cell:
    return Cell(float(value), None, fmt)


def mean_std(values: Sequence[float], fmt: str = "{:.3f}") -> Cell:
    """Mean ± sample std over seeds (no ± with a single seed)."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return Cell(na="no finite value", fmt=fmt)
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return Cell(m, None, fmt)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
    return Cell(m, sd, fmt)


def na(reason: str) -> Cell:
    return Cell(na=reason)


@dataclass
class Table:
    key: str
    title: str
    columns: list[str]  # the first column is the row label
    rows: list[tuple[str, list[Cell]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, label: str, cells: Sequence[Cell]) -> None:
        if len(cells) != len(self.columns) - 1:
            raise ValueError(f"table {self.key}: row {label!r} has {len(cells)} cells, "
                             f"expected {len(self.columns) - 1}")
        bad = [c for c in cells if not isinstance(c, Cell)]
        if bad:  # fail where the row is made, not when the report renders at the end of a long run
            raise TypeError(f"table {self.key}: row {label!r} has non-Cell cells {bad!r} (use num/na)")
        self.rows.append((label, list(cells)))

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        for label, cells in self.rows:
            lines.append("| " + " | ".join([label] + [c.text() for c in cells]) + " |")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"key": self.key, "title": self.title, "columns": self.columns,
                "rows": [{"label": label, "cells": dict(zip(self.columns[1:], [c.to_json() for c in cells]))}
                         for label, cells in self.rows],
                "notes": self.notes}
