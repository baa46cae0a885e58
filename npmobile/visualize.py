"""Pictures of what a network computes: feature-map grids and depthwise kernels (Pillow only), and
time-per-layer and roofline charts (matplotlib, the optional ``plot`` extra).

Functions return images or write files; they never print.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from npmobile.errors import NpmobileError

GAP = 2  # pixels between tiles
BACKGROUND = (32, 32, 32)


def normalize_per_channel(maps: np.ndarray) -> np.ndarray:
    """[H, W, C] -> values in [0, 1], each channel stretched from its own min to its own max.

    Per channel, because channels live on very different scales; a constant channel becomes 0
    (black) rather than a division by zero.
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


def feature_map_image(maps: np.ndarray, max_channels: int | None = 64, scale: int | None = None) -> Image.Image:
    """A grid of one image's feature maps [H, W, C]: one grey tile per channel, normalized per channel
    (black = the channel's smallest value, white = its largest)."""
    if maps.ndim != 3:
        raise NpmobileError(f"feature maps must be [height, width, channels], got shape {maps.shape}")
    if max_channels is not None:
        maps = maps[:, :, :max_channels]
    grey = (normalize_per_channel(maps.astype(np.float64)) * 255).round().astype(np.uint8)
    tiles = np.repeat(np.moveaxis(grey, -1, 0)[..., None], 3, axis=-1)
    return tile_grid(tiles, scale or _auto_scale(max(maps.shape[:2])))


def diverging(values: np.ndarray) -> np.ndarray:
    """Values in [-1, 1] -> RGB uint8: blue for negative, white for zero, red for positive."""
    v = np.clip(values, -1, 1)[..., None]
    white = np.array([255, 255, 255], np.float64)
    red, blue = np.array([200, 30, 30], np.float64), np.array([30, 60, 200], np.float64)
    rgb = np.where(v >= 0, white + v * (red - white), white - v * (blue - white))
    return rgb.round().astype(np.uint8)


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


def plot_times(steps, path: str | Path, title: str = "") -> None:
    """Bar chart: milliseconds per plan step, coloured by kind (depthwise, pointwise, ...)."""
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
    plt.close(fig)


def plot_roofline(steps, machine, path: str | Path, title: str = "") -> None:
    """Roofline: each step at (its arithmetic intensity, the GFLOP/s it reached), under the machine's
    roof min(peak, intensity * bandwidth). Steps left of the ridge are memory-bound."""
    plt = _pyplot()
    work = [s for s in steps if s.cost.flops > 0 and s.seconds > 0]
    fig, ax = plt.subplots(figsize=(7, 5), dpi=100)
    low = min([s.cost.intensity for s in work] + [machine.balance]) / 2
    high = max([s.cost.intensity for s in work] + [machine.balance]) * 2
    xs = np.geomspace(low, high, 200)
    ax.plot(xs, [machine.attainable_gflops(x) for x in xs], color="black", lw=2, label="roof")
    ax.axvline(machine.balance, color="grey", ls=":", lw=1)
    ax.annotate(f"balance {machine.balance:.1f} FLOP/B", (machine.balance, machine.peak_gflops),
                textcoords="offset points", xytext=(4, -12), fontsize=8)
    for kind, color in KIND_COLORS.items():
        group = [s for s in work if s.cost.kind == kind]
        if group:
            ax.scatter([s.cost.intensity for s in group], [s.gflops for s in group], color=color, s=18, label=kind)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOPs per byte moved)")
    ax.set_ylabel("GFLOP/s")
    ax.set_title(title or "roofline")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
