"""Plots: VQA accuracy over rounds per domain, and the token-entropy histogram of recent chats.
Both take the series ``tui.state.TuiState`` computes.

Each domain has a fixed colour that reads on dark and light themes alike (plotext's automatic
cycle gave two domains one colour in the dark theme), and the legend is a line of its own under
the plot: plotext draws its legend box over the top-left corner, where the source line runs.
"""
from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Static
from textual_plotext import PlotextPlot

DOMAIN_COLOURS = {"source": (80, 140, 255), "texture": (240, 150, 40), "noise": (60, 190, 90),
                  "combo": (220, 80, 220), "rotate": (230, 60, 60)}
OTHER_COLOURS = [(40, 190, 200), (200, 190, 40), (150, 110, 240)]


def domain_colour(domain: str, order: list[str]) -> tuple[int, int, int]:
    if domain in DOMAIN_COLOURS:
        return DOMAIN_COLOURS[domain]
    others = [d for d in order if d not in DOMAIN_COLOURS]
    return OTHER_COLOURS[others.index(domain) % len(OTHER_COLOURS)]


def legend_line(domains: list[str], per_line: int = 3) -> Text:
    """Domains ``per_line`` to a line (3 fit the half-width plot at 80 columns), never cut."""
    t = Text(no_wrap=True, overflow="ellipsis")
    for i, d in enumerate(domains):
        if i and i % per_line == 0:
            t.append("\n")
        t.append("━━ ", style="rgb({},{},{})".format(*domain_colour(d, domains)))
        t.append(f"{d:<9}")
    return t


class AccuracyPanel(Vertical):
    """The accuracy plot with its legend on a line below it."""

    DEFAULT_CSS = """
    AccuracyPanel { width: 1fr; height: 1fr; }
    AccuracyPanel > #accuracy-legend { height: auto; max-height: 3; padding: 0 1; }
    """

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.plot = AccuracyPlot(id="accuracy-plot")
        self.legend = Static("", id="accuracy-legend")

    def compose(self) -> ComposeResult:
        yield self.plot
        yield self.legend

    def show(self, series: dict[str, tuple[list[int], list[float]]]) -> None:
        self.plot.show(series)
        self.legend.update(legend_line(sorted(series)))


class AccuracyPlot(PlotextPlot):
    def show(self, series: dict[str, tuple[list[int], list[float]]]) -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title("VQA accuracy per domain")
        plt.xlabel("round")
        plt.ylim(0, 1)
        if series:
            last = max(max(xs) for xs, _ in series.values())
            plt.xticks(list(range(last + 1)))
            order = sorted(series)
            for domain in order:
                xs, ys = series[domain]
                plt.plot(xs, ys, marker="braille", color=domain_colour(domain, order))
        else:
            plt.xticks([0, 1])
            plt.text("no rounds yet", x=0.5, y=0.5, alignment="center")
            plt.xlim(0, 1)
        self.refresh()


class EntropyHistogram(PlotextPlot):
    def show(self, labels: list[str], counts: list[int]) -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title("token entropy, recent chats (nats)")
        plt.bar(labels, counts, marker="hd")
        step = max(1, -(-max(counts, default=0) // 4))  # at most 5 integer ticks
        top = step * max(1, -(-max(counts, default=0) // step))
        plt.ylim(0, top)
        plt.yticks(list(range(0, top + 1, step)))
        self.refresh()
