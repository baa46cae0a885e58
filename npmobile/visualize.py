"""Pictures of what a network computes: feature-map grids and depthwise kernels (Pillow only), and
time-per-layer and roofline charts (matplotlib, the optional ``plot`` extra).

A picture must be readable without the terminal that made it: the Pillow figures carry a title (the
layer's name, kind and shape), the input image, each tile's channel number, the colour scale as a bar
with its values, and a mark on constant maps. ``Figure.texts`` records every piece of text drawn and
``Figure.boxes`` where each part sits, so tests (and callers) check the picture from what drew it.

Functions return images or write files; they never print.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from npmobile.errors import NpmobileError

GAP = 2  # pixels between tiles
BACKGROUND = (32, 32, 32)

# --------------------------------------------------------------------------------------------------
# Colour scales
# --------------------------------------------------------------------------------------------------

# Viridis at nine evenly spaced points (matplotlib's table, sampled): dark blue = low, yellow = high. A
# perceptually even map is read the same by everyone, including the colour-blind, and prints in grey.
_VIRIDIS = np.array([[68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
                     [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37]], np.float64)


def sequential(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> RGB uint8 along viridis (dark blue .. yellow)."""
    t = np.clip(values, 0, 1) * (len(_VIRIDIS) - 1)
    low = np.minimum(np.floor(t).astype(int), len(_VIRIDIS) - 2)
    frac = (t - low)[..., None]
    return (_VIRIDIS[low] * (1 - frac) + _VIRIDIS[low + 1] * frac).round().astype(np.uint8)


def diverging(values: np.ndarray) -> np.ndarray:
    """Values in [-1, 1] -> RGB uint8: blue for negative, white for zero, red for positive."""
    v = np.clip(values, -1, 1)[..., None]
    white = np.array([255, 255, 255], np.float64)
    red, blue = np.array([200, 30, 30], np.float64), np.array([30, 60, 200], np.float64)
    rgb = np.where(v >= 0, white + v * (red - white), white - v * (blue - white))
    return rgb.round().astype(np.uint8)


@dataclass(frozen=True)
class ColourScale:
    """How values become colours. ``diverging``: white at zero, red up to +limit, blue down to -limit (for
    signed data, so the sign reads at a glance); otherwise viridis from ``low`` to ``high``."""

    low: float
    high: float
    diverging: bool

    @classmethod
    def for_values(cls, values: np.ndarray) -> ColourScale:
        """One scale for all of ``values``: diverging and symmetric when they take both signs."""
        low, high = float(np.min(values)), float(np.max(values))
        if low < 0 < high:
            limit = max(-low, high)
            return cls(-limit, limit, True)
        return cls(low, high, False)

    def colours(self, values: np.ndarray) -> np.ndarray:
        if self.diverging:
            return diverging(values / self.high)
        span = self.high - self.low
        return sequential((values - self.low) / span if span > 0 else np.zeros_like(values))

    def ticks(self) -> list[float]:
        return [self.low, 0.0, self.high] if self.diverging else [self.low, self.high]


def is_constant(values: np.ndarray) -> bool:
    """True when a map holds one value (up to float32 rounding): drawn as one flat colour it would look like a
    busy map's dark corner, so it is marked instead."""
    span = float(np.max(values) - np.min(values))
    return span <= 1e-6 * max(float(np.max(np.abs(values))), 1e-30)


def normalize_per_channel(maps: np.ndarray) -> np.ndarray:
    """[H, W, C] -> values in [0, 1], each channel stretched from its own min to its own max.

    Per channel, because channels live on very different scales; a constant channel becomes 0
    rather than a division by zero.
    """
    low = maps.min(axis=(0, 1), keepdims=True)
    span = maps.max(axis=(0, 1), keepdims=True) - low
    return np.where(span > 0, (maps - low) / np.where(span > 0, span, 1), 0.0)


def grid_shape(count: int) -> tuple[int, int]:
    """(rows, columns) of a near-square grid holding ``count`` tiles."""
    cols = math.ceil(math.sqrt(count))
    return math.ceil(count / cols), cols


def tile_grid(tiles: np.ndarray, scale: int) -> Image.Image:
    """[count, h, w, 3] uint8 tiles -> one RGB image, each tile enlarged ``scale`` times (nearest
    neighbour, so pixels stay visible as squares) with a gap between tiles."""
    count, h, w, _ = tiles.shape
    rows, cols = grid_shape(count)
    th, tw = h * scale, w * scale
    canvas = np.empty((rows * (th + GAP) + GAP, cols * (tw + GAP) + GAP, 3), np.uint8)
    canvas[...] = BACKGROUND
    for k in range(count):
        r, c = divmod(k, cols)
        big = np.repeat(np.repeat(tiles[k], scale, axis=0), scale, axis=1)
        top, left = GAP + r * (th + GAP), GAP + c * (tw + GAP)
        canvas[top : top + th, left : left + tw] = big
    return Image.fromarray(canvas, "RGB")


def _auto_scale(size: int, target: int = 48) -> int:
    """Enlarge small maps so each tile is at least about ``target`` pixels wide."""
    return max(1, math.ceil(target / max(size, 1)))


# --------------------------------------------------------------------------------------------------
# Labelled figures (Pillow)
# --------------------------------------------------------------------------------------------------

WHITE, INK, FAINT = (255, 255, 255), (20, 20, 20), (110, 110, 110)
MARGIN = 14
TILE_GAP = 6


def font(size: int) -> ImageFont.ImageFont:
    """Pillow's bundled font at ``size`` pixels (a scalable one when Pillow has FreeType, as its wheels do)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # an old Pillow or one without FreeType: the small bitmap font
        return ImageFont.load_default()


def text_size(text: str, face) -> tuple[int, int]:
    left, top, right, bottom = face.getbbox(text)
    return right - left, bottom


@dataclass
class Figure:
    """A drawn picture and what is on it: ``texts`` lists (role, text) in drawing order (roles: title,
    subtitle, input, tile, constant, colorbar, note), ``boxes`` maps part names (input, grid, colorbar,
    tile 0, tile 1, ...) to their (left, top, right, bottom) pixels."""

    image: Image.Image
    texts: list[tuple[str, str]] = field(default_factory=list)
    boxes: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)

    def text(self, role: str) -> list[str]:
        return [t for r, t in self.texts if r == role]


class Canvas:
    """A white page that remembers what was written on it (the Figure)."""

    def __init__(self, width: int, height: int):
        self.figure = Figure(Image.new("RGB", (width, height), WHITE))
        self.draw = ImageDraw.Draw(self.figure.image)

    def write(self, role: str, xy: tuple[int, int], text: str, face, fill=INK, anchor: str = "la") -> None:
        self.draw.text(xy, text, font=face, fill=fill, anchor=anchor)
        self.figure.texts.append((role, text))

    def paste(self, name: str, pixels: np.ndarray, left: int, top: int, outline=(190, 190, 190)) -> None:
        image = Image.fromarray(pixels, "RGB")
        self.figure.image.paste(image, (left, top))
        box = (left, top, left + image.width, top + image.height)
        self.draw.rectangle((left - 1, top - 1, box[2], box[3]), outline=outline)
        self.figure.boxes[name] = box


def _enlarge(pixels: np.ndarray, scale: int) -> np.ndarray:
    return np.repeat(np.repeat(pixels, scale, axis=0), scale, axis=1)


def _fit(image: np.ndarray, height: int) -> np.ndarray:
    """An RGB uint8 image resized (bilinear) to ``height`` pixels tall, aspect kept."""
    pil = Image.fromarray(image, "RGB")
    width = max(1, round(pil.width * height / pil.height))
    return np.asarray(pil.resize((width, height), Image.Resampling.BILINEAR))


def _format(value: float) -> str:
    return f"{value:.2g}" if value != 0 else "0"


def tile_figure(tiles: np.ndarray, labels: list[str], title: str, subtitle: str, scale: ColourScale | None,
                quantity: str, input_image: np.ndarray | None = None, input_caption: str = "") -> Figure:
    """The shared drawing: [count, h, w] float tiles in a near-square grid, each under its label, beside the
    input image, under a title, above a colour bar.

    ``scale`` None: each tile on its own min..max (viridis), the range written under the tile and the bar
    labelled tile min .. tile max. Constant tiles get a grey cross and "constant <value>" under them."""
    count, h, w = tiles.shape
    rows, cols = grid_shape(count)
    per_tile = scale is None
    f_title, f_sub, f_label, f_small = font(18), font(13), font(12), font(11)
    scales = [scale or ColourScale(float(t.min()), float(t.max()), False) for t in tiles]
    flat = [is_constant(t) for t in tiles]
    notes = [f"constant {_format(float(t.flat[0]))}" if f else f"{_format(s.low)}..{_format(s.high)}" if per_tile
             else "" for t, s, f in zip(tiles, scales, flat)]
    widest = max(text_size(n, f_small)[0] for n in notes) if count else 0
    zoom = max(_auto_scale(max(h, w), 48), math.ceil((widest + 4) / w))  # a tile is as wide as its note
    th, tw = h * zoom, w * zoom
    label_h = text_size("0123456789", f_label)[1] + 3
    under_h = text_size("-0.123..4.56", f_small)[1] + 3
    cell_w, cell_h = tw + TILE_GAP, label_h + th + under_h + TILE_GAP
    grid_w, grid_h = cols * cell_w - TILE_GAP, rows * cell_h - TILE_GAP

    header_h = text_size(title, f_title)[1] + text_size(subtitle, f_sub)[1] + 16
    shown = None
    if input_image is not None:
        shown = _fit(input_image, max(96, min(224, grid_h - 20)))
    left_w = shown.shape[1] + MARGIN if shown is not None else 0
    bar_w, bar_h = max(200, min(grid_w, 360)), 14
    footer_h = bar_h + 2 * text_size("0", f_small)[1] + 22
    width = max(MARGIN + left_w + grid_w + MARGIN, MARGIN + text_size(title, f_title)[0] + MARGIN,
                MARGIN + text_size(subtitle, f_sub)[0] + MARGIN, MARGIN + left_w + bar_w + 2 * MARGIN)
    input_h = shown.shape[0] + 2 * under_h if shown is not None else 0
    height = MARGIN + header_h + max(grid_h, input_h) + MARGIN + footer_h + MARGIN
    canvas = Canvas(width, height)

    canvas.write("title", (MARGIN, MARGIN), title, f_title)
    canvas.write("subtitle", (MARGIN, MARGIN + text_size(title, f_title)[1] + 6), subtitle, f_sub, fill=FAINT)
    top = MARGIN + header_h
    if shown is not None:
        canvas.paste("input", shown, MARGIN, top)
        canvas.write("input", (MARGIN, top + shown.shape[0] + 4), input_caption or "input", f_small)
    grid_left = MARGIN + left_w
    canvas.figure.boxes["grid"] = (grid_left, top, grid_left + grid_w, top + grid_h)
    for k in range(count):
        r, c = divmod(k, cols)
        left, y = grid_left + c * cell_w, top + r * cell_h
        canvas.write("tile", (left, y), labels[k], f_label)
        canvas.paste(f"tile {k}", _enlarge(scales[k].colours(tiles[k].astype(np.float64)), zoom), left, y + label_h)
        under = (left, y + label_h + th + 2)
        if flat[k]:
            box = canvas.figure.boxes[f"tile {k}"]
            canvas.draw.line(box, fill=(150, 150, 150), width=1)
            canvas.draw.line((box[0], box[3], box[2], box[1]), fill=(150, 150, 150), width=1)
            canvas.write("constant", under, notes[k], f_small, fill=FAINT)
        elif notes[k]:
            canvas.write("note", under, notes[k], f_small, fill=FAINT)

    bar_top = top + max(grid_h, input_h) + MARGIN
    bar_left = grid_left
    ramp = np.linspace(0, 1, bar_w)[None, :].repeat(bar_h, axis=0)
    if per_tile:
        pixels, ticks = sequential(ramp), [(0.0, "tile min"), (1.0, "tile max")]
        caption = f"colour scale: each tile from its own min to its own max (written under it); {quantity}"
    else:
        values = scale.low + ramp * (scale.high - scale.low)
        pixels = scale.colours(values)
        ticks = [((t - scale.low) / (scale.high - scale.low) if scale.high > scale.low else 0.0, _format(t))
                 for t in scale.ticks()]
        caption = f"colour scale, one for all tiles: {quantity}"
    canvas.paste("colorbar", pixels, bar_left, bar_top, outline=INK)
    for position, label in ticks:
        x = bar_left + round(position * (bar_w - 1))
        canvas.draw.line((x, bar_top + bar_h, x, bar_top + bar_h + 3), fill=INK)
        anchor = "la" if position <= 0 else "ra" if position >= 1 else "ma"
        canvas.write("colorbar", (x, bar_top + bar_h + 5), label, f_small, anchor=anchor)
    canvas.write("colorbar", (bar_left, bar_top + bar_h + 8 + text_size("0", f_small)[1]), caption, f_small,
                 fill=FAINT)
    return canvas.figure


def _shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


def feature_map_figure(maps: np.ndarray, layer: str, kind: str, max_channels: int | None = 64,
                       input_image: np.ndarray | None = None, per_tile: bool = False,
                       context: str = "") -> Figure:
    """One image's feature maps [H, W, C] of ``layer`` (a ``kind`` layer, e.g. DepthwiseConv2D) as a labelled
    grid: one tile per channel numbered as in the layer, on one colour scale (``per_tile``: each on its own,
    stated under it), beside the ``input_image`` (RGB uint8 as the model saw it)."""
    if maps.ndim != 3:
        raise NpmobileError(f"feature maps must be [height, width, channels], got shape {maps.shape}")
    h, w, c = maps.shape
    shown = min(c, max_channels or c)
    tiles = np.moveaxis(maps[:, :, :shown], -1, 0).astype(np.float64)
    flat = sum(is_constant(t) for t in tiles)
    title = f"{layer} ({kind}): output {h}x{w}x{c}"
    subtitle = f"channels 0-{shown - 1} of {c}, one tile each ({h}x{w} values)" + \
               (f"; {flat} constant (crossed)" if flat else "") + (f"; {context}" if context else "")
    caption = f"input ({input_image.shape[0]}x{input_image.shape[1]})" if input_image is not None else ""
    return tile_figure(tiles, [str(k) for k in range(shown)], title, subtitle,
                       None if per_tile else ColourScale.for_values(tiles), "the layer's output value",
                       input_image, caption)


def kernel_figure(kernel: np.ndarray, layer: str, max_channels: int | None = 64, per_tile: bool = False,
                  context: str = "") -> Figure:
    """A depthwise kernel [kh, kw, C, M] as a labelled grid of its C*M filters (red positive, blue negative,
    white zero on one scale; ``per_tile``: each filter on its own min..max)."""
    if kernel.ndim != 4:
        raise NpmobileError(f"a depthwise kernel is [kh, kw, channels, multiplier], got shape {kernel.shape}")
    kh, kw, c, m = kernel.shape
    filters = np.moveaxis(kernel.reshape(kh, kw, c * m), -1, 0).astype(np.float64)  # [C*M, kh, kw]
    shown = min(c * m, max_channels or c * m)
    filters = filters[:shown]
    labels = [str(k) if m == 1 else f"{k // m}.{k % m}" for k in range(shown)]
    title = f"{layer} (DepthwiseConv2D): kernel {_shape_text(kernel.shape)}"
    subtitle = f"filters 0-{shown - 1} of {c * m}, one {kh}x{kw} filter per input channel" + \
               (f" x {m}" if m > 1 else "") + (f"; {context}" if context else "")
    return tile_figure(filters, labels, title, subtitle, None if per_tile else ColourScale.for_values(filters),
                       "the filter's weight")


def feature_map_image(maps: np.ndarray, max_channels: int | None = 64, scale: int | None = None) -> Image.Image:
    """A bare grid of one image's feature maps [H, W, C]: one grey tile per channel, normalized per channel
    (black = the channel's smallest value, white = its largest). ``feature_map_figure`` labels it."""
    if maps.ndim != 3:
        raise NpmobileError(f"feature maps must be [height, width, channels], got shape {maps.shape}")
    if max_channels is not None:
        maps = maps[:, :, :max_channels]
    grey = (normalize_per_channel(maps.astype(np.float64)) * 255).round().astype(np.uint8)
    tiles = np.repeat(np.moveaxis(grey, -1, 0)[..., None], 3, axis=-1)
    return tile_grid(tiles, scale or _auto_scale(max(maps.shape[:2])))


def kernel_image(kernel: np.ndarray, max_channels: int | None = 64, scale: int = 12) -> Image.Image:
    """A depthwise kernel [kh, kw, C, M] as a grid of C*M small tiles, one per filter; each filter is
    scaled by its own largest |weight| so its shape shows (red positive, blue negative, white zero)."""
    if kernel.ndim != 4:
        raise NpmobileError(f"a depthwise kernel is [kh, kw, channels, multiplier], got shape {kernel.shape}")
    kh, kw, c, m = kernel.shape
    filters = np.moveaxis(kernel.reshape(kh, kw, c * m), -1, 0).astype(np.float64)  # [C*M, kh, kw]
    if max_channels is not None:
        filters = filters[:max_channels]
    peak = np.abs(filters).max(axis=(1, 2), keepdims=True)
    return tile_grid(diverging(filters / np.where(peak > 0, peak, 1)), scale)


# --------------------------------------------------------------------------------------------------
# Charts (matplotlib)
# --------------------------------------------------------------------------------------------------

KIND_COLORS = {"conv": "#7f7f7f", "depthwise": "#d62728", "pointwise": "#1f77b4", "expand+dw": "#ff7f0e",
               "se": "#9467bd", "dense": "#2ca02c", "other": "#bcbd22"}


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, never a window
        import matplotlib.pyplot as plt
    except ImportError:
        raise NpmobileError("plots need matplotlib: pip install 'npmobile[plot]'") from None
    return plt


def plot_times(steps, path: str | Path, title: str = "") -> list[str]:
    """Bar chart: milliseconds per plan step, coloured by kind (depthwise, pointwise, ...); returns the texts
    drawn."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(8, 0.18 * len(steps)), 4.5), dpi=100)
    xs = np.arange(len(steps))
    ax.bar(xs, [s.seconds * 1e3 for s in steps], color=[KIND_COLORS[s.cost.kind] for s in steps])
    ax.set_xticks(xs, [s.cost.name for s in steps], rotation=90, fontsize=6)
    ax.set_ylabel("ms")
    ax.set_title(title or "time per layer")
    handles = [plt.Rectangle((0, 0), 1, 1, color=KIND_COLORS[k]) for k in KIND_COLORS
               if any(s.cost.kind == k for s in steps)]
    ax.legend(handles, [k for k in KIND_COLORS if any(s.cost.kind == k for s in steps)], fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    texts = _chart_texts(fig, ax)
    plt.close(fig)
    return texts


def _chart_texts(fig, ax) -> list[str]:
    """Every piece of text on a chart: title, axis labels, legend entries, notes (for the caller's checks)."""
    legend = ax.get_legend()
    return [ax.get_title(), ax.get_xlabel(), ax.get_ylabel(),
            *([t.get_text() for t in legend.get_texts()] if legend else []),
            *(t.get_text() for t in ax.texts), *(t.get_text() for t in fig.texts)]


def plot_roofline(steps, machine, path: str | Path, title: str = "") -> list[str]:
    """Roofline: each step at (its arithmetic intensity, the GFLOP/s it reached), under the machine's
    roof min(peak, intensity * bandwidth) as ``profiling.measure_machine`` measured it, said on the chart.
    Steps left of the ridge are memory-bound. Returns the texts drawn."""
    plt = _pyplot()
    work = [s for s in steps if s.cost.flops > 0 and s.seconds > 0]
    fig, ax = plt.subplots(figsize=(7, 5), dpi=100)
    low = min([s.cost.intensity for s in work] + [machine.balance]) / 2
    high = max([s.cost.intensity for s in work] + [machine.balance]) * 2
    xs = np.geomspace(low, high, 200)
    ax.plot(xs, [machine.attainable_gflops(x) for x in xs], color="black", lw=2,
            label=f"roof: {machine.peak_gflops:.0f} GFLOP/s, {machine.bandwidth_gbs:.0f} GB/s")
    if machine.memory_gbs:
        ax.plot(xs, [min(machine.peak_gflops, x * machine.memory_gbs) for x in xs], color="grey", lw=1, ls="--",
                label=f"large arrays: {machine.memory_gbs:.0f} GB/s")
    ax.axvline(machine.balance, color="grey", ls=":", lw=1)
    ax.annotate(f"balance {machine.balance:.1f} FLOP/B", (machine.balance, machine.peak_gflops),
                textcoords="offset points", xytext=(4, -12), fontsize=8)
    threads = f"{machine.threads} thread{'s' if machine.threads > 1 else ''}"
    fig.text(0.01, 0.01, f"roof measured on this machine, {threads}: peak = npmobile's pointwise (1x1) kernel on a "
             "cache-resident product;\nbandwidth = an elementwise add compiled by Numba like the kernels, on "
             "cache-resident arrays (bytes read + written per second)", fontsize=7, color="#444444")
    for kind, color in KIND_COLORS.items():
        group = [s for s in work if s.cost.kind == kind]
        if group:
            ax.scatter([s.cost.intensity for s in group], [s.gflops for s in group], color=color, s=18, label=kind)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOPs per byte moved)")
    ax.set_ylabel("GFLOP/s")
    ax.set_title(title or "roofline")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path)
    texts = _chart_texts(fig, ax)
    plt.close(fig)
    return texts
