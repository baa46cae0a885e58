"""The GEMM operator: 1x1 convolutions and dense layers (and a 3-channel convolution's indirect GEMM) on a
register-tiled microkernel written as LLVM vector IR.

    packed = pack(w, bias, rows)                          # once, when the plan is made
    gemm_packed(a, packed, out, act, residual)            # every call (or .bind: see kernels/entry.py)

a [M, K], out and residual [M, N]: float32, C-contiguous. out = act(a @ w + bias) (+ residual), the
contract of kernels/pointwise.py; kernels/reference.py ``dense`` is the twin it is tested against.

    igemm_packed(x, table, packed, out, act)              # the indirect GEMM of a 3-channel conv

The same tile with another way of reading A: row p of A is output pixel p's receptive field, read in place
from the image through an indirection table (kernels/conv.py ``indirection_table``; twin:
kernels/reference.py ``indirect_conv2d``) instead of an im2col copy.

Read in order: kernels/reference.py (``dense``; ``pack_panels`` and ``gemm_panels``, the packed product in
NumPy), the plain Numba loops (kernels/pointwise.py ``pointwise_conv2d_numba``), then the microkernel.
The operator's parts, each in its own file:
- kernels/gemm_rules.py: the tiles (``Tile``: MR x NR in vectors of VW), which this CPU compiles, which one
  a product takes (``choose_tile``) and how a product is cut into tasks (``tiling``);
- kernels/gemm_packing.py: the weights in NR-wide panels (``pack``, ``PackedWeights``), once per plan;
- kernels/gemm_microkernel.py: the IR of one register tile, and why it is IR;
- kernels/gemm_drivers.py: the compiled loops over rows and panels, spread over Numba's threads;
- this file: the checks, the cut, and the call a plan binds.

Determinism: every output value is one FMA chain over k = 0..K-1 starting from zero, then + bias, then the
activation, then + residual, whatever tile, thread or batch position it falls in, so how the product is cut
(and which tile runs) never changes an answer.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np

from .entry import entry, no_work
from .gemm_drivers import NO_RESIDUAL, gemm_panels, igemm_panels, register_tiles
from .gemm_packing import PackedWeights, pack
from .gemm_rules import AVX512, COMPILED_TILES, INDIRECT_CIN, INDIRECT_TILES, TASKS, Tile, choose_tile, tiling

__all__ = ["AVX512", "COMPILED_TILES", "INDIRECT_CIN", "INDIRECT_TILES", "NO_RESIDUAL", "TASKS", "PackedWeights",
           "Tile", "choose_tile", "gemm_packed", "gemm_panels", "igemm_packed", "igemm_panels", "pack",
           "register_tiles", "tiling"]

_FLOAT32 = np.dtype(np.float32)


@entry
def gemm_packed(a: np.ndarray, packed: PackedWeights, out: np.ndarray, act: int,
                residual: np.ndarray | None = None) -> Callable[[], None]:
    """out = act(a @ w + bias) (+ residual), w and bias as packed; a [M, K], out/residual [M, N]."""
    m, k = a.shape
    if k != packed.k or out.shape != (m, packed.n) or (residual is not None and residual.shape != out.shape):
        raise ValueError(f"gemm_packed: shapes do not fit: a {a.shape} @ packed [{packed.k}, {packed.n}] -> out "
                         f"{out.shape}" + ("" if residual is None else f" + residual {residual.shape}"))
    if m == 0 or packed.n == 0:
        return no_work
    if residual is None:
        residual = NO_RESIDUAL
    # The kernel works on raw addresses: another dtype or layout must be refused, not compiled for.
    if not (a.dtype is _FLOAT32 and out.dtype is _FLOAT32 and residual.dtype is _FLOAT32
            and a.flags.c_contiguous and out.flags.c_contiguous and residual.flags.c_contiguous):
        raise ValueError("gemm_packed: arrays must be C-contiguous float32")
    if packed.tile not in COMPILED_TILES:
        raise ValueError(f"gemm_packed: the {packed.tile.name} tile is not compiled for this CPU "
                         f"(its tiles: {[tile.name for tile in COMPILED_TILES]})")
    cut = packed.cuts.get(m)
    if cut is None:
        cut = packed.cuts[m] = tiling(m, k, packed.panels.shape[0], packed.tile.mr)
    return partial(gemm_panels, a, packed.panels, packed.bias, out, act, residual,
                   COMPILED_TILES.index(packed.tile), *cut)


_PADDING_ZEROS = np.zeros(INDIRECT_CIN, np.float32)  # what a tap in the padding reads; never written


@entry
def igemm_packed(x: np.ndarray, table: np.ndarray, packed: PackedWeights, out: np.ndarray,
                 act: int) -> Callable[[], None]:
    """out = act(A @ w + bias), A's rows read through ``table`` (see ``igemm_panels``), w and bias as packed.

    x [N, H*W*Cin], table [ceil(P/MR), taps, MR] int32, out [N*P, Cout]. The table is trusted (its
    offsets are read as addresses): make it with conv.indirection_table for x's geometry and this MR.
    """
    taps = packed.k // INDIRECT_CIN
    mr = packed.tile.mr
    n_images = x.shape[0] if x.ndim == 2 else 0
    pixels = out.shape[0] // max(n_images, 1)
    if (x.ndim != 2 or packed.k != taps * INDIRECT_CIN or out.shape != (n_images * pixels, packed.n)
            or table.shape != (-(-pixels // mr), taps, mr) or packed.tile not in INDIRECT_TILES):
        raise ValueError(f"igemm_packed: shapes do not fit: x {x.shape}, table {table.shape} @ packed "
                         f"[{packed.k}, {packed.n}] -> out {out.shape}")
    if out.size == 0:
        return no_work
    # The kernel works on raw addresses: another dtype or layout must be refused, not compiled for.
    if not (x.dtype is _FLOAT32 and out.dtype is _FLOAT32 and table.dtype == np.int32
            and x.flags.c_contiguous and out.flags.c_contiguous and table.flags.c_contiguous):
        raise ValueError("igemm_packed: x and out must be C-contiguous float32, table C-contiguous int32")
    cut = packed.cuts.get(-pixels)  # per image; negative keys keep these apart from the GEMM's row counts
    if cut is None:
        cut = packed.cuts[-pixels] = tiling(pixels, packed.k, packed.panels.shape[0], mr)
    return partial(igemm_panels, x, table, _PADDING_ZEROS, packed.panels, packed.bias, out, act,
                   INDIRECT_TILES.index(packed.tile), *cut)
