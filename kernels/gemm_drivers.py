"""The GEMM drivers: compiled loops that walk a product's rows and weight panels through the microkernel's
tiles (kernels/gemm_microkernel.py), spread over Numba's threads.

    gemm_panels(a, panels, bias, out, act, residual, tile, tile_rows, panels_per_tile)
    igemm_panels(x, table, zero, panels, bias, out, act, tile, tile_rows, panels_per_tile)
    register_tiles(...)    the walk on raw addresses, for kernels that hold A elsewhere (kernels/expand_depthwise.py)

``tile`` is the index of the weights' tile in COMPILED_TILES (kernels/gemm_rules.py): the drivers are compiled
with this CPU's tiles only. The operator (kernels/gemm.py) checks shapes and chooses the cut; these loops trust
them.
"""

from __future__ import annotations

import numpy as np

from .activations import ACT_HARD_SWISH, ACT_NONE, ACT_RELU, ACT_RELU6, apply_activation
from .backend import njit, prange
from .gemm_microkernel import indirect_tile_kernel, tile_kernel
from .gemm_rules import COMPILED_TILES, INDIRECT_CIN, INDIRECT_TILES

_run_tile = tile_kernel(COMPILED_TILES)
_run_indirect_tile = indirect_tile_kernel(INDIRECT_TILES, INDIRECT_CIN)
MR = tuple(tile.mr for tile in COMPILED_TILES)  # by tile index, for the compiled loops
_INDIRECT_COUNT = len(INDIRECT_TILES)  # a prefix of COMPILED_TILES: the same indices
NO_RESIDUAL = np.zeros((0, 0), np.float32)


@njit(inline="always")
def _cdiv(x, y):
    return (x + y - 1) // y


@njit(inline="always")
def on_registers(act):
    """Whether the tile applies ``act`` on its registers before the store (else after, from a scratch tile)."""
    return act == ACT_NONE or act == ACT_RELU or act == ACT_RELU6 or act == ACT_HARD_SWISH


@njit(inline="always")
def rows_times_panels(a, panels, bias, out, act, residual, tile, r0, r1, p0, p1, scratch):
    """Rows [r0, r1) of out = act(a @ w + bias) (+ residual), for panels [p0, p1) of w, MR rows at a time.

    ``residual``: shaped like ``out``, or empty for none (one compiled kernel serves both).

    ``scratch`` [MR, NR] takes the tiles whose activation is applied here rather than on the
    registers (the sigmoid family).
    """
    k = a.shape[1]
    n = out.shape[1]
    nr = panels.shape[2]
    mr = MR[tile]
    in_registers = on_registers(act)
    register_act = act if in_registers else ACT_NONE
    a_addr = np.int64(a.ctypes.data)
    w_addr = np.int64(panels.ctypes.data)
    b_addr = np.int64(bias.ctypes.data)
    c_addr = np.int64(out.ctypes.data)
    s_addr = np.int64(scratch.ctypes.data)
    has_residual = residual.size > 0
    r_addr = np.int64(residual.ctypes.data) if has_residual else np.int64(0)
    n_panels = panels.shape[0]
    lines = max(1, nr // 16)  # cache lines in one row of a panel
    for p in range(p0, p1):
        c0 = p * nr
        cols = min(nr, n - c0)
        w_p = w_addr + 4 * p * k * nr
        for i in range(r0, r1, mr):
            rows = min(mr, r1 - i)
            # While the rows of this panel are worked, the next panel comes from memory: each row
            # tile asks for one cache line of every row of it, in turn. (Past this task's panels: the
            # thread's next task starts there when the cut is by panels; the last panel: its own lines.)
            ahead = w_p + 4 * k * nr * (p + 1 < n_panels) + 64 * (((i - r0) // mr) % lines)
            # One call site (each inlines every tile): into out, or into scratch for the copy below.
            dest, ld, res = s_addr, nr, np.int64(0)
            if in_registers:
                dest, ld = c_addr + 4 * (i * n + c0), n
                if r_addr != 0:
                    res = r_addr + 4 * (i * n + c0)
            _run_tile(tile, a_addr + 4 * i * k, k, rows, w_p, k, b_addr + 4 * c0, dest, ld, register_act, res, ld,
                      cols if in_registers else nr, ahead)
            if not in_registers:
                _activate_into(scratch, out, act, residual, has_residual, i, rows, c0, cols)


@njit(inline="always")
def register_tiles(a_addr, k, w_addr, nr, b_addr, c_addr, n, act, r_addr, tile, r0, r1, p0, p1):
    """Rows [r0, r1) of C = act(A @ w + bias) (+ R), panels [p0, p1), for an activation applied on the
    registers (``on_registers``), on raw addresses: A rows of k floats, C and R rows of n floats (R at
    0: none), w packed in panels of nr columns. A constant ``tile`` compiles that tile alone.

    ``rows_times_panels`` keeps its own loop rather than calling this one for its on-register case: a
    second call site of the tiles in gemm_panels would compile every tile twice."""
    mr = MR[tile]
    for p in range(p0, p1):
        c0 = p * nr
        cols = min(nr, n - c0)
        w_p = w_addr + 4 * p * k * nr
        for i in range(r0, r1, mr):
            res = r_addr + 4 * (i * n + c0) if r_addr != 0 else np.int64(0)
            _run_tile(tile, a_addr + 4 * i * k, k, min(mr, r1 - i), w_p, k, b_addr + 4 * c0,
                      c_addr + 4 * (i * n + c0), n, act, res, n, cols, w_p)


@njit(inline="always")
def _activate_into(scratch, out, act, residual, has_residual, r0, rows, c0, cols):
    """out[r0 + r, c0 + c] = act(scratch[r, c]) (+ residual) for a tile whose activation is not on the registers."""
    for rr in range(rows):
        for cc in range(cols):
            v = apply_activation(scratch[rr, cc], act)
            if has_residual:
                v = v + residual[r0 + rr, c0 + cc]
            out[r0 + rr, c0 + cc] = v


@njit(inline="always")
def _scratch(act, tasks, mr, nr):
    """[tasks, MR, NR] for the tiles whose activation is applied after the store (one per task, made
    before the parallel loop: an allocation inside it costs microseconds), or [1, 1, 1] when every
    activation is applied on the registers."""
    if on_registers(act):
        return np.empty((1, 1, 1), np.float32)
    return np.empty((tasks, mr, nr), np.float32)


@njit(parallel=True, cache=True)
def gemm_panels(a, panels, bias, out, act, residual, tile, tile_rows, panels_per_tile):
    """out = act(a @ w + bias) (+ residual), w and bias packed by ``pack`` (``panels``, ``bias``) for the
    tile COMPILED_TILES[tile].

    ``residual``: shaped like ``out``, or ``NO_RESIDUAL``.

    The product is cut into tiles of ``tile_rows`` rows x ``panels_per_tile`` panels, spread over
    Numba's threads; within a tile, panel by panel (it stays in cache), MR rows at a time.
    """
    if not 0 <= tile < len(MR):  # another tile would run in its place
        raise ValueError("gemm_panels: this tile is not compiled for this CPU")
    m = a.shape[0]
    n_panels = panels.shape[0]
    row_tiles = _cdiv(m, tile_rows)
    col_tiles = _cdiv(n_panels, panels_per_tile)
    scratch = _scratch(act, row_tiles * col_tiles, MR[tile], panels.shape[2])
    for t in prange(row_tiles * col_tiles):
        r0 = (t // col_tiles) * tile_rows
        p0 = (t % col_tiles) * panels_per_tile
        rows_times_panels(a, panels, bias, out, act, residual, tile, r0, min(m, r0 + tile_rows),
                          p0, min(n_panels, p0 + panels_per_tile), scratch[t % scratch.shape[0]])


@njit(parallel=True, cache=True)
def igemm_panels(x, table, zero, panels, bias, out, act, tile, tile_rows, panels_per_tile):
    """out = act(A @ w + bias) where row p of A is read through ``table``: a convolution, without im2col.

    x [N, H*W*Cin]: each image's pixels, flat. table [ceil(P/MR), taps, MR] int32: for output pixel
    p = tile*MR + i and kernel tap t, the offset in an image of the Cin values that tap sees, or -1
    for the padding (read from ``zero``, Cin zeros). w [taps*Cin, Cout] and bias packed by ``pack`` for
    INDIRECT_TILES[tile]; out [N*P, Cout]. ``tile_rows`` is a multiple of MR.

    Each image is cut alike into tiles of ``tile_rows`` pixels x ``panels_per_tile`` panels, spread
    over Numba's threads; within a tile, panel by panel, MR pixels at a time. Every output is the
    FMA chain over k = tap*Cin + c that the GEMM on im2col's patch rows runs, so the answers are
    those bits.
    """
    if not 0 <= tile < _INDIRECT_COUNT:  # another tile would run in its place
        raise ValueError("igemm_panels: this tile is not compiled for this CPU")
    n_images = x.shape[0]
    pixels = out.shape[0] // n_images
    taps = table.shape[1]
    k = panels.shape[1]
    n = out.shape[1]
    n_panels = panels.shape[0]
    nr = panels.shape[2]
    mr = MR[tile]
    in_registers = on_registers(act)
    register_act = act if in_registers else ACT_NONE
    x_addr = np.int64(x.ctypes.data)
    t_addr = np.int64(table.ctypes.data)
    z_addr = np.int64(zero.ctypes.data)
    w_addr = np.int64(panels.ctypes.data)
    b_addr = np.int64(bias.ctypes.data)
    c_addr = np.int64(out.ctypes.data)
    row_tiles = _cdiv(pixels, tile_rows)
    col_tiles = _cdiv(n_panels, panels_per_tile)
    scratches = _scratch(act, n_images * row_tiles * col_tiles, mr, nr)
    for task in prange(n_images * row_tiles * col_tiles):
        image = task // (row_tiles * col_tiles)
        within = task % (row_tiles * col_tiles)
        r0 = (within // col_tiles) * tile_rows
        r1 = min(pixels, r0 + tile_rows)
        p0 = (within % col_tiles) * panels_per_tile
        image_addr = x_addr + 4 * image * x.shape[1]
        scratch = scratches[task % scratches.shape[0]]
        s_addr = np.int64(scratch.ctypes.data)
        for p in range(p0, min(n_panels, p0 + panels_per_tile)):
            c0 = p * nr
            cols = min(nr, n - c0)
            w_p = w_addr + 4 * p * k * nr
            for i in range(r0, r1, mr):
                rows = min(mr, r1 - i)
                row = image * pixels + i
                dest, ld = s_addr, nr
                if in_registers:
                    dest, ld = c_addr + 4 * (row * n + c0), n
                _run_indirect_tile(tile, image_addr, t_addr + 4 * i * taps, taps, z_addr, rows, w_p,
                                   b_addr + 4 * c0, dest, ld, register_act, np.int64(0), ld,
                                   cols if in_registers else nr)
                if not in_registers:
                    _activate_into(scratch, out, act, NO_RESIDUAL, False, row, rows, c0, cols)
