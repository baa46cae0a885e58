"""Weights packed once (when a plan is made) into the column panels the GEMM microkernel streams.

Panel p holds columns [p*NR, p*NR + NR) of w as K rows of NR contiguous floats, zero-padded past N, so the
microkernel reads one panel front to back; the zero columns compute values no store keeps. The NumPy twin
is kernels/reference.py ``pack_panels``.
"""

from __future__ import annotations

import numpy as np

from . import huge_pages
from .gemm_rules import Tile, choose_tile


class PackedWeights:
    """A [K, N] weight matrix and its bias, packed once for one ``Tile`` of the microkernel.

    panels [P, K, NR]: panel p holds columns p*NR .. p*NR+NR-1, zero past N; bias [P*NR], zero past N.
    """

    __slots__ = ("panels", "bias", "k", "n", "tile", "cuts")

    def __init__(self, kernel: np.ndarray, bias: np.ndarray, tile: Tile):
        k, n = kernel.shape
        if bias.shape != (n,):
            raise ValueError(f"pack: bias {bias.shape} does not fit kernel {kernel.shape}")
        nr = tile.nr
        count = -(-n // nr)
        # 64-byte aligned (each weight vector is one cache line, or half of one), in huge pages where there are.
        panels = huge_pages.zeros(count * k * nr).reshape(count, k, nr)
        full = n // nr  # whole panels, then the last one's columns (its zero padding is already there)
        panels[:full] = kernel[:, :full * nr].reshape(k, full, nr).transpose(1, 0, 2)
        if full < count:
            panels[full, :, :n - full * nr] = kernel[:, full * nr:]
        self.panels = panels
        self.bias = huge_pages.zeros(count * nr)
        self.bias[:n] = bias
        self.k, self.n, self.tile = k, n, tile
        self.cuts: dict[int, tuple[int, int]] = {}  # rows of a product -> its cut (gemm_rules.tiling)


def pack(kernel: np.ndarray, bias: np.ndarray, rows: int, tile: Tile | None = None) -> PackedWeights:
    """Weights packed for products of ``rows`` rows (the tile that is fast for them, unless given)."""
    return PackedWeights(kernel, bias, choose_tile(rows, kernel.shape[1]) if tile is None else tile)
