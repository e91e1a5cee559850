"""An RGB image drawn with half blocks: each terminal cell shows two vertical pixels, the upper
one as the foreground colour of '▀' and the lower one as the background colour.  Terminal cells
are about twice as tall as wide, so one cell = 1×2 pixels keeps pixels square."""
from __future__ import annotations

import numpy as np
from PIL import Image
from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

UPPER_HALF = "▀"


def fit_pixels(rgb: np.ndarray, cols: int, rows: int) -> np.ndarray:
    """Resize ``rgb`` (H×W×3 uint8) to the largest size that fits ``cols`` cells × ``rows`` cells
    (= cols × 2·rows pixels) with its aspect ratio kept; never enlarges by a fractional factor
    (integer upscaling keeps small images crisp)."""
    h, w = rgb.shape[:2]
    max_w, max_h = max(1, cols), max(2, 2 * rows)
    scale = min(max_w / w, max_h / h)
    if scale >= 1:
        k = int(scale)
        return np.repeat(np.repeat(rgb, k, axis=0), k, axis=1) if k > 1 else rgb
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb[..., :3])).resize(size, Image.Resampling.BOX))


class HalfBlocks:
    """A Rich renderable of an RGB array (its height is padded to an even number of pixels)."""

    def __init__(self, rgb: np.ndarray) -> None:
        self.rgb = np.asarray(rgb, dtype=np.uint8)[..., :3]

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(self.rgb.shape[1], self.rgb.shape[1])

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        px = self.rgb
        if px.shape[0] % 2:
            px = np.concatenate([px, px[-1:]], axis=0)
        styles: dict[tuple[int, ...], Style] = {}
        for y in range(0, px.shape[0], 2):
            top, bottom = px[y], px[y + 1]
            for x in range(px.shape[1]):
                key = (*top[x].tolist(), *bottom[x].tolist())
                style = styles.get(key)
                if style is None:
                    style = styles[key] = Style.parse("rgb({},{},{}) on rgb({},{},{})".format(*key))
                yield Segment(UPPER_HALF, style)
            yield Segment.line()


class ImageView(Widget):
    """Shows the image the next question is about, as large as the widget allows."""

    DEFAULT_CSS = """
    ImageView { width: 18; height: 10; content-align: center middle; }
    """

    image: reactive[np.ndarray | None] = reactive(None, always_update=True)

    def __init__(self, placeholder: str = "no image", **kw) -> None:
        super().__init__(**kw)
        self.placeholder = placeholder

    def set_image(self, rgb: np.ndarray | None) -> None:
        self.image = rgb

    def render(self):
        if self.image is None:
            return Text(self.placeholder, style="dim", justify="center")
        size = self.content_region.size
        return HalfBlocks(fit_pixels(self.image, size.width, size.height))
