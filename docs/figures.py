"""The figures of docs/depthwise.md, computed by the engine's reference kernels (npmobile.kernels.reference) on
the tutorial's own 4 x 4 x 2 image and filters, and drawn with Pillow (npmobile.visualize's labelled canvas).

    python docs/figures.py            # rewrites docs/depthwise_*.png

Each function returns the Figure it drew: ``texts`` holds every number written in a cell, so tests/test_docs.py
checks the pictures' numbers against the kernels, as it checks the tutorial's printed ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from npmobile.kernels import reference as K
from npmobile.visualize import FAINT, INK, Canvas, Figure, font

HERE = Path(__file__).resolve().parent
CELL = 34  # pixels per number cell
MARGIN = 16
HIGHLIGHT = (214, 39, 40)
PADDING_FILL = (236, 236, 236)


def tutorial_tensors() -> dict[str, np.ndarray]:
    """Section 1-3's image and filters, exactly as docs/depthwise.md builds them."""
    x = np.zeros((1, 4, 4, 2), np.float32)
    x[0, :, 2:, 0] = 1
    x[0, :, :, 1] = [[1], [2], [3], [4]]
    vertical = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float32)
    dw_kernel = np.zeros((3, 3, 2, 1), np.float32)
    dw_kernel[:, :, 0, 0] = vertical
    dw_kernel[:, :, 1, 0] = vertical.T
    pw_kernel = np.array([[1, 0, 0.5], [0, 1, 0.5]], np.float32)
    pad = (K.same_padding(4, 3, 1), K.same_padding(4, 3, 1))
    d = K.depthwise_conv2d(x, dw_kernel, padding=pad)
    return {"x": x, "dw_kernel": dw_kernel, "pw_kernel": pw_kernel, "padded": K.zero_pad(x, pad), "d": d,
            "p": K.pointwise_conv2d(d, pw_kernel)}


def number(value: float) -> str:
    """A cell's number as the tutorial prints it: 4, -4, 5.5."""
    return f"{value:g}"


def _tint(value: float, limit: float) -> tuple[int, int, int]:
    """A light colour for a cell: blue for negative, white for zero, red for positive (numbers stay legible)."""
    t = max(-1.0, min(1.0, value / limit)) if limit else 0.0
    strong = np.array([244, 165, 130] if t >= 0 else [146, 197, 222], np.float64)
    return tuple(int(round(255 + abs(t) * (c - 255))) for c in strong)


def draw_grid(canvas: Canvas, values: np.ndarray, left: int, top: int, role: str, limit: float,
              padded: int = 0) -> tuple[int, int]:
    """A 2-D array as cells with their numbers; ``padded``: that many outer rows/columns are zero padding
    (grey). Returns the grid's (right, bottom)."""
    face = font(13)
    rows, cols = values.shape
    for r in range(rows):
        for c in range(cols):
            x0, y0 = left + c * CELL, top + r * CELL
            border = r < padded or c < padded or r >= rows - padded or c >= cols - padded
            fill = PADDING_FILL if border else _tint(float(values[r, c]), limit)
            canvas.draw.rectangle((x0, y0, x0 + CELL, y0 + CELL), fill=fill, outline=(160, 160, 160))
            canvas.write(role, (x0 + CELL // 2, y0 + CELL // 2), number(float(values[r, c])), face,
                         fill=FAINT if border else INK, anchor="mm")
    return left + cols * CELL, top + rows * CELL


def outline(canvas: Canvas, left: int, top: int, row: int, col: int, size: int) -> None:
    x0, y0 = left + col * CELL, top + row * CELL
    canvas.draw.rectangle((x0 - 1, y0 - 1, x0 + size * CELL + 1, y0 + size * CELL + 1), outline=HIGHLIGHT, width=3)


def _caption(canvas: Canvas, xy: tuple[int, int], text: str, role: str = "caption") -> None:
    canvas.write(role, xy, text, font(13))


def input_figure(t: dict | None = None) -> Figure:
    """Section 1: the image's two channels, every value written in its cell."""
    t = t or tutorial_tensors()
    x = t["x"][0]
    canvas = Canvas(2 * 4 * CELL + 3 * MARGIN + 40, 4 * CELL + 100)
    canvas.write("title", (MARGIN, MARGIN), "The 4 x 4 image, 2 channels: x[0, :, :, c]", font(17))
    top = MARGIN + 52
    for c, what in enumerate(("channel 0: a vertical edge", "channel 1: a ramp")):
        left = MARGIN + c * (4 * CELL + MARGIN + 40)
        _caption(canvas, (left, top - 18), what)
        draw_grid(canvas, x[:, :, c], left, top, f"x channel {c}", 4.0)
    return canvas.figure


def sliding_figure(t: dict | None = None, at: tuple[int, int] = (1, 2)) -> Figure:
    """Section 3, depthwise: per channel, the 3 x 3 window at output position ``at`` on the zero-padded
    channel, that channel's own filter, and the output value the sum of the 9 products gives."""
    t = t or tutorial_tensors()
    i, j = at
    width = MARGIN + 6 * CELL + 40 + 3 * CELL + 40 + 4 * CELL + MARGIN + 40
    canvas = Canvas(width, 2 * (6 * CELL + 50) + 100)
    canvas.write("title", (MARGIN, MARGIN), "Depthwise: each channel slides its own 3 x 3 filter", font(17))
    canvas.write("subtitle", (MARGIN, MARGIN + 24), f"Zero padding in grey, stride 1; in red the window for output "
                 f"row {i}, column {j}.", font(13), fill=FAINT)
    canvas.write("subtitle", (MARGIN, MARGIN + 42), "The window visits all 16 positions; no channel sees another.",
                 font(13), fill=FAINT)
    f_sign = font(22)
    for c in range(2):
        top = MARGIN + 90 + c * (6 * CELL + 50)
        left = MARGIN
        _caption(canvas, (left, top - 18), f"channel {c}, zero-padded to 6 x 6")
        right, _ = draw_grid(canvas, t["padded"][0, :, :, c], left, top, f"padded channel {c}", 4.0, padded=1)
        outline(canvas, left, top, i, j, 3)
        canvas.write("sign", (right + 20, top + 3 * CELL), "x", f_sign, anchor="mm")
        kernel_left = right + 40
        _caption(canvas, (kernel_left, top + 1.5 * CELL - 18), f"filter {c}")
        right, _ = draw_grid(canvas, t["dw_kernel"][:, :, c, 0], kernel_left, top + int(1.5 * CELL),
                             f"filter {c}", 2.0)
        canvas.write("sign", (right + 20, top + 3 * CELL), "=", f_sign, anchor="mm")
        out_left = right + 40
        _caption(canvas, (out_left, top + CELL - 18), f"output channel {c}")
        right, _ = draw_grid(canvas, t["d"][0, :, :, c], out_left, top + CELL, f"depthwise output {c}", 12.0)
        outline(canvas, out_left, top + CELL, i, j, 1)
        window = t["padded"][0, i:i + 3, j:j + 3, c] * t["dw_kernel"][:, :, c, 0]
        canvas.write("sum", (out_left, top + 5 * CELL + 8),
                      f"sum of the 9 products = {number(float(window.sum()))}", font(13))
    return canvas.figure


def pointwise_figure(t: dict | None = None, at: tuple[int, int] = (1, 2)) -> Figure:
    """Section 3, pointwise: at pixel ``at``, the depthwise output's 2 channels times the [2 x 3] matrix give
    the 3 output channels; the same matrix at every pixel gives the three 4 x 4 maps."""
    t = t or tutorial_tensors()
    i, j = at
    vector, matrix, mixed = t["d"][0, i, j], t["pw_kernel"], t["p"][0, i, j]
    canvas = Canvas(MARGIN + 3 * (4 * CELL + MARGIN) + 40, 2 * CELL + 4 * CELL + 190)
    canvas.write("title", (MARGIN, MARGIN), "Pointwise: at every pixel, one [2 x 3] matrix mixes the channels",
                 font(17))
    top, f_sign, gap = MARGIN + 62, font(22), 56
    _caption(canvas, (MARGIN, top - 20), f"pixel ({i}, {j})")
    right, _ = draw_grid(canvas, vector[None, :], MARGIN, top + CELL // 2, "pixel channels", 12.0)
    canvas.write("sign", (right + gap // 2, top + CELL), "x", f_sign, anchor="mm")
    _caption(canvas, (right + gap, top - 20), "kernel [C, C']")
    right, _ = draw_grid(canvas, matrix, right + gap, top, "pointwise kernel", 1.0)
    canvas.write("sign", (right + gap // 2, top + CELL), "=", f_sign, anchor="mm")
    _caption(canvas, (right + gap, top - 20), "3 channels")
    draw_grid(canvas, mixed[None, :], right + gap, top + CELL // 2, "pixel mixed", 12.0)
    top += 2 * CELL + 30
    _caption(canvas, (MARGIN, top), f"The same matrix at all 16 pixels: the three output maps (pixel ({i}, {j}) "
             "in red)", role="caption")
    top += 48
    for c in range(3):
        left = MARGIN + c * (4 * CELL + MARGIN)
        _caption(canvas, (left, top - 20), f"output channel {c}")
        draw_grid(canvas, t["p"][0, :, :, c], left, top, f"pointwise output {c}", 12.0)
        outline(canvas, left, top, i, j, 1)
    return canvas.figure


FIGURES = {"depthwise_input.png": input_figure, "depthwise_sliding.png": sliding_figure,
           "depthwise_pointwise.png": pointwise_figure}


def write_all(folder: Path = HERE) -> dict[str, Figure]:
    t = tutorial_tensors()
    drawn = {}
    for name, draw in FIGURES.items():
        drawn[name] = draw(t)
        drawn[name].image.save(folder / name)
    return drawn


if __name__ == "__main__":
    for name, figure in write_all().items():
        print(f"wrote docs/{name} ({figure.image.width}x{figure.image.height} px, "
              f"{sum(1 for role, _ in figure.texts if role not in ('title', 'subtitle', 'caption'))} labels)")
