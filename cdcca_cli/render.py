"""Rich rendering of answers with every token shaded by its entropy (green = sure, red = unsure)."""
from __future__ import annotations

from rich.text import Text

ENTROPY_RED = 1.5  # nats at which a token is drawn fully red


def entropy_colour(h: float) -> str:
    x = max(0.0, min(1.0, h / ENTROPY_RED))
    r, g = int(80 + 175 * x), int(200 - 150 * x)
    return f"rgb({r},{g},80)"


def shaded(pieces: list[str], entropies: list[float]) -> Text:
    t = Text()
    for p, h in zip(pieces, entropies):
        t.append(p, style=entropy_colour(h))
    return t


def legend(compact: bool = False) -> Text:
    """The colour key; ``compact`` (23 cells) fits the TUI's input column at 80 columns."""
    if compact:
        t = Text("entropy ", no_wrap=True)
        for h, label in ((0.0, "0"), (0.5, ".5"), (1.0, "1"), (1.5, "1.5+")):
            t.append(f"■{label} ", style=entropy_colour(h))
        return t
    t = Text("entropy (nats): ")
    for h in (0.0, 0.5, 1.0, 1.5):
        t.append(f"■ {h:.1f} ", style=entropy_colour(h))
    return t
