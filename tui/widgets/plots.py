"""Plots: VQA accuracy over rounds per domain, and the token-entropy histogram of recent chats.
Both take the series ``tui.state.TuiState`` computes."""
from __future__ import annotations

from textual_plotext import PlotextPlot


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
            for domain, (xs, ys) in sorted(series.items()):
                plt.plot(xs, ys, label=domain, marker="braille")
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
