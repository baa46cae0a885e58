"""Pointwise (1x1) convolution and dense layers as one GEMM with a fused epilogue.

    pointwise_conv2d(x, kernel, bias, out, act, residual=None)
    dense(x, kernel, bias, out, act)
    pointwise_conv2d.bind(...), dense.bind(...)   checked once, run by the call they return (kernels/entry.py)

x         [N, H, W, Cin] (or [M, Cin] for dense)   float32, C-contiguous
kernel    [Cin, Cout]    float32, C-contiguous (a Keras 1x1 kernel with its two leading 1s dropped)
bias      [Cout]         float32 (zeros if the layer has none)
out       [N, H, W, Cout] (or [M, Cout])           float32, C-contiguous, preallocated, not aliasing x
act       an ACT_* code from kernels.activations
residual  None or an array shaped like ``out``, aliasing neither x nor out

out = act(x @ kernel + bias), then + residual:  y = (x @ W + b) + shortcut, with no activation after
the add -- exactly the MobileNetV2/V3 ``project -> BN -> Add`` sequence, so the interpreter can fuse
the Add into the projection (act is ACT_NONE there; an activation with a residual is applied before
the add, matching Keras's order for a conv whose activation is fused and an Add that follows).

Four implementations of the same contract:
- ``pointwise_conv2d`` / ``dense`` / ``gemm``: by default the register-tiled microkernel of
  kernels/gemm.py, on weights packed into panels (``prepare_weights``, once per plan; a plain
  ``kernel`` array is packed on each call). ``use_microkernel`` says where it is used: everywhere on
  AVX-512, and on AVX2 except for the big square products where OpenBLAS was measured faster.
- elsewhere a Numba kernel that cuts the product into
  tiles of ``out`` (blocks of rows, and of columns when there are few rows) and, on each of its
  workers, asks BLAS's sgemm for one tile, then runs the epilogue on that tile while it is still
  in cache. BLAS because OpenBLAS's hand-written microkernels keep a register tile of the output
  in registers, which plain Numba loops cannot (kernels/gemm_microkernel.py does it in LLVM IR). Tiles
  because OpenBLAS's own threads would fight Numba's for the cores (kernels/threads.py): this way
  Numba's pool owns the cores and every product still uses all of them.
- the same, with ``np.matmul`` for the product, when kernels/blas.py finds no sgemm to call from
  Numba (a NumPy built on another BLAS) and the arrays do not suit the microkernel: one thread for
  the product, the epilogue block by block.
- ``pointwise_conv2d_numba``: the whole thing in Numba (4 rows at a time, the epilogue fused per
  block). Slower, but it needs no BLAS at all; kept for the comparison in bench/kernels.py.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np

from . import blas
from .activations import ACT_NONE, bias_act_row
from .backend import njit, prange
from .entry import calls_blas, entry, no_work
from .gemm import AVX512, NO_RESIDUAL, PackedWeights, gemm_packed, pack

# np.matmul fallback: rows of the GEMM per block, so that the block's output (rows x Cout floats)
# is still in L2 when the epilogue reads it back, and blocks are few enough that the per-call
# overhead of each np.matmul call stays small.
_BLOCK_BYTES = 512 * 1024


@njit(inline="always")
def add_into(row, other):
    """row += other, element by element: the residual add, after the bias and activation."""
    for c in range(row.shape[0]):
        row[c] = row[c] + other[c]


@njit(inline="always")
def epilogue_rows(out, bias, act, residual, row_start, row_stop, col_start, col_stop):
    """out[r, cols] = act(out[r, cols] + bias[cols]) (+ residual[r, cols]) for rows [row_start, row_stop);
    ``residual`` None or NO_RESIDUAL (no rows) adds nothing."""
    b = bias[col_start:col_stop]
    for r in range(row_start, row_stop):
        row = out[r, col_start:col_stop]
        bias_act_row(row, b, act)
        if residual is not None:
            if residual.shape[0]:
                add_into(row, residual[r, col_start:col_stop])


@njit(parallel=True, cache=True)
def gemm_tiles(a, w, bias, out, act, residual, rows_per_image, tile_rows, tile_cols):
    """out = act(a @ w + bias) (+ residual), one BLAS call per tile of out, tiles spread over the cores.

    All arrays C-contiguous 2-D; a [M, K], w [K, N], out and residual [M, N] (or NO_RESIDUAL, or None); M is a
    whole number of images of ``rows_per_image`` rows each, and no tile spans two images (see ``tile_shape``).
    """
    m, k = a.shape
    n = w.shape[1]
    images = m // rows_per_image
    row_tiles = (rows_per_image + tile_rows - 1) // tile_rows
    col_tiles = (n + tile_cols - 1) // tile_cols
    a_address = np.int64(a.ctypes.data)
    w_address = np.int64(w.ctypes.data)
    out_address = np.int64(out.ctypes.data)
    for tile in prange(images * row_tiles * col_tiles):
        image = tile // (row_tiles * col_tiles)
        within = tile % (row_tiles * col_tiles)
        image_start = image * rows_per_image
        r0 = image_start + (within // col_tiles) * tile_rows
        c0 = (within % col_tiles) * tile_cols
        r1 = min(image_start + rows_per_image, r0 + tile_rows)
        c1 = min(n, c0 + tile_cols)
        # Row-major: a tile of out is rows r0..r1 of a times columns c0..c1 of w; the leading
        # dimensions stay those of the whole arrays.
        blas.sgemm(blas.ROW_MAJOR, blas.NO_TRANS, blas.NO_TRANS, r1 - r0, c1 - c0, k,
                   np.float32(1.0), a_address + 4 * r0 * k, k, w_address + 4 * c0, n,
                   np.float32(0.0), out_address + 4 * (r0 * n + c0), n)
        epilogue_rows(out, bias, act, residual, r0, r1, c0, c1)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


# Tiles per image the cut aims for: enough to keep up to four cores busy on one image. A constant,
# never the thread count, so that every output value is summed in the same order whatever the
# thread count (see tile_shape).
TILES_PER_IMAGE = 4


def tile_shape(rows: int, k: int, n: int) -> tuple[int, int]:
    """Rows and columns of ``out`` per BLAS call, for one image's [rows, k] x [k, n] product.

    A function of the shape alone. BLAS may round a product differently when its shape differs
    (OpenBLAS's Haswell kernels do), so the cut must not depend on the thread count nor on the
    batch: each image is cut the same way wherever it sits in a batch, and every output value is
    then summed in the same order -- the same answer bit for bit on 1 core or 4, alone or in a batch.

    - each call repacks its columns of the weights, so tiles are few and tall: 256 rows when the
      product is deep (k >= 128: the weights are big and the product, not the epilogue, is the
      work); when it is shallow, blocks whose output (~32 KiB) is still in cache for the epilogue,
      but at least 64 rows;
    - at least TILES_PER_IMAGE tiles where the image has the rows for it; when it has too few rows
      (7x7 layers, dense), columns are split too, never narrower than 32.
    """
    row_tiles = -(-rows // (256 if k >= 128 else max(64, 8192 // n)))
    cols = 4 if rows < 16 else 1  # a matrix-vector product: BLAS is slow on one very wide tile
    if row_tiles < TILES_PER_IMAGE:
        if rows >= 64 * TILES_PER_IMAGE:
            row_tiles = TILES_PER_IMAGE
        else:
            cols = max(cols, -(-TILES_PER_IMAGE // row_tiles))
    tile_cols = n if cols == 1 else min(n, max(32, _round_up(-(-n // cols), 16)))
    col_tiles = -(-n // tile_cols)
    if row_tiles * col_tiles < TILES_PER_IMAGE:  # columns this narrow ran out: cut the rows too
        row_tiles = min(rows, -(-TILES_PER_IMAGE // col_tiles))
    return -(-rows // row_tiles), tile_cols


@njit(cache=True)
def _epilogue(out, bias, act, residual, row_start, row_stop):
    """out[r] = act(out[r] + bias) (+ residual[r]) for rows [row_start, row_stop) of a 2-D GEMM.

    (The np.matmul fallback's epilogue.) The rows are contiguous, so they are processed as one
    flat run in chunks of several rows, with the bias repeated to the chunk's length: with 16 or
    24 output channels, a loop per row would spend more time starting loops than adding.
    """
    cout = out.shape[1]
    rows_per_chunk = max(1, 512 // cout)
    tiled_bias = np.empty(rows_per_chunk * cout, dtype=np.float32)
    for i in range(tiled_bias.shape[0]):
        tiled_bias[i] = bias[i % cout]
    flat = out[row_start:row_stop].reshape(-1)
    res = flat if residual is None else residual[row_start:row_stop].reshape(-1)
    chunk = tiled_bias.shape[0]
    for start in range(0, flat.shape[0], chunk):
        stop = min(flat.shape[0], start + chunk)
        part = flat[start:stop]
        bias_act_row(part, tiled_bias, act)
        if residual is not None:
            add_into(part, res[start:stop])


def _contiguous(*arrays) -> bool:
    return all(x is None or x.flags.c_contiguous for x in arrays)


def use_microkernel(k: int, n: int, avx512: bool = AVX512) -> bool:
    """Whether a layer's [*, k] x [k, n] product runs on the microkernel (else OpenBLAS tiles).

    A fixed rule of the layer's shape and the CPU, so a layer always takes the same path and gives
    the same answer. On AVX-512 the microkernel is faster than OpenBLAS's tiles at every MobileNet 1x1
    shape and on matrix-vector products. On AVX2 the 6x16 tile is faster at MobileNetV2's shapes but
    not on square products of 256 channels and more each way: those stay with OpenBLAS (the
    measurements: bench/README.md, "GEMM tiles and cuts"). Without a BLAS to call, always the microkernel.
    """
    return avx512 or not blas.AVAILABLE or k < 256 or n < 256


def prepare_weights(kernel: np.ndarray, bias: np.ndarray, rows: int) -> PackedWeights | np.ndarray:
    """A layer's weights in the form its product runs fastest from, made once (per plan).

    ``rows``: the rows of the product (pixels times images). Packed panels for the microkernel, or
    ``kernel`` as a C-contiguous array for OpenBLAS, by ``use_microkernel``.
    """
    kernel = np.ascontiguousarray(kernel, np.float32)
    if use_microkernel(*kernel.shape):
        return pack(kernel, np.ascontiguousarray(bias, np.float32), rows)
    return kernel


@entry
def gemm(a: np.ndarray, w: np.ndarray | PackedWeights, bias: np.ndarray | None, out: np.ndarray, act: int,
         residual: np.ndarray | None, rows_per_image: int | None = None) -> Callable[[], None]:
    """out = act(a @ w + bias) (+ residual) for 2-D a [M, K], w [K, N], on Numba's threads.

    ``w`` may be what ``prepare_weights`` made of it (packed weights hold their bias: ``bias`` is
    then not read). ``rows_per_image``: the rows of one image (H*W for a convolution, 1 for a dense
    layer; default all of M): BLAS's product is cut image by image, so an image's answer does not
    depend on its batch (the microkernel's answers depend on no cut at all).
    """
    if isinstance(w, PackedWeights):
        return gemm_packed.bind(a, w, out, act, residual)
    m, cout = out.shape
    rows_per_image = m if rows_per_image is None else rows_per_image
    # BLAS is handed raw addresses: a wrong shape would read or write past an array, not raise.
    if a.shape != (m, w.shape[0]) or w.shape[1] != cout or bias.shape != (cout,) or (
            residual is not None and residual.shape != out.shape):
        raise ValueError(f"gemm shapes do not fit: a {a.shape} @ w {w.shape} + bias {bias.shape} -> out {out.shape}"
                         + ("" if residual is None else f" + residual {residual.shape}"))
    if m and (rows_per_image < 1 or m % rows_per_image):
        raise ValueError(f"gemm: {m} rows are not a whole number of images of {rows_per_image} rows")
    if m == 0:
        return no_work
    if use_microkernel(*w.shape) and _contiguous(a, out, residual) and a.dtype == out.dtype == np.float32:
        packed = pack(np.ascontiguousarray(w, np.float32), np.ascontiguousarray(bias, np.float32), m)
        return gemm_packed.bind(a, packed, out, act, residual)
    if blas.AVAILABLE and _contiguous(a, w, out, residual) and a.dtype == w.dtype == out.dtype == np.float32:
        tile_rows, tile_cols = tile_shape(rows_per_image, a.shape[1], cout)
        # NO_RESIDUAL, never None: the built module exports no signature with a None argument (kernels/build.py).
        shortcut = NO_RESIDUAL if residual is None else residual
        return calls_blas(partial(gemm_tiles, a, w, bias, out, act, shortcut, rows_per_image, tile_rows, tile_cols))
    return calls_blas(partial(gemm_matmul, a, w, bias, out, act, residual, rows_per_image))


def gemm_matmul(a: np.ndarray, w: np.ndarray, bias: np.ndarray, out: np.ndarray, act: int,
                residual: np.ndarray | None, rows_per_image: int | None = None) -> None:
    """``gemm`` with the product by np.matmul (one thread), the epilogue block by block.

    Blocks never span two images and are cut the same way in each, as in ``gemm``.
    """
    m, cout = out.shape
    rows_per_image = m if rows_per_image is None else rows_per_image
    rows = max(16, _BLOCK_BYTES // (4 * max(cout, a.shape[1])))
    for image_start in range(0, m, max(1, rows_per_image)):
        image_stop = min(m, image_start + rows_per_image)
        for start in range(image_start, image_stop, rows):
            stop = min(image_stop, start + rows)
            np.matmul(a[start:stop], w, out=out[start:stop])
            _epilogue(out, bias, act, residual, start, stop)


@entry
def pointwise_conv2d(
    x: np.ndarray,
    kernel: np.ndarray | PackedWeights,
    bias: np.ndarray | None,
    out: np.ndarray,
    act: int = ACT_NONE,
    residual: np.ndarray | None = None,
) -> Callable[[], None]:
    """out = act(x @ kernel + bias) (+ residual), over the last axis of NHWC ``x``.

    ``kernel`` may be what ``prepare_weights`` made of it (then holding the bias).
    """
    cin, cout = (kernel.k, kernel.n) if isinstance(kernel, PackedWeights) else kernel.shape
    a = x.reshape(-1, cin)
    o = out.reshape(-1, cout)
    r = None if residual is None else residual.reshape(-1, cout)
    return gemm.bind(a, kernel, bias, o, act, r, rows_per_image=x.shape[1] * x.shape[2] if x.ndim == 4 else None)


@entry
def dense(x: np.ndarray, kernel: np.ndarray | PackedWeights, bias: np.ndarray | None, out: np.ndarray,
          act: int = ACT_NONE) -> Callable[[], None]:
    """out = act(x @ kernel + bias) for x [M, features] (softmax is a separate step: activations.softmax).

    ``kernel`` may be what ``prepare_weights`` made of it (then holding the bias).
    """
    return gemm.bind(x, kernel, bias, out, act, None, rows_per_image=1)


# --------------------------------------------------------------------------------------------------
# The all-Numba GEMM
# --------------------------------------------------------------------------------------------------

_ROWS = 4  # rows of A per step: each W row loaded from cache feeds 4 FMAs instead of 1.


@njit(inline="always")
def _rows_times_w(a, w, out, i0, n_rows):
    """out[i0:i0+n_rows] = a[i0:i0+n_rows] @ w, accumulating in the output rows (in L1).

    Loop order i-k-j: the inner loop runs along a row of W and of out (both contiguous), so it
    vectorizes; 4 rows share each W load.
    """
    k = a.shape[1]
    n = w.shape[1]
    if n_rows == _ROWS:
        o0 = out[i0]
        o1 = out[i0 + 1]
        o2 = out[i0 + 2]
        o3 = out[i0 + 3]
        for j in range(n):
            o0[j] = np.float32(0.0)
            o1[j] = np.float32(0.0)
            o2[j] = np.float32(0.0)
            o3[j] = np.float32(0.0)
        for p in range(k):
            a0 = a[i0, p]
            a1 = a[i0 + 1, p]
            a2 = a[i0 + 2, p]
            a3 = a[i0 + 3, p]
            wr = w[p]
            for j in range(n):
                wv = wr[j]
                o0[j] += a0 * wv
                o1[j] += a1 * wv
                o2[j] += a2 * wv
                o3[j] += a3 * wv
    else:
        for i in range(i0, i0 + n_rows):
            o = out[i]
            for j in range(n):
                o[j] = np.float32(0.0)
            for p in range(k):
                av = a[i, p]
                wr = w[p]
                for j in range(n):
                    o[j] += av * wr[j]


@njit(parallel=True, cache=True, fastmath={"contract"})
def gemm_numba(a, w, bias, out, act, residual):
    """out = act(a @ w + bias) (+ residual) for 2-D a [M, K], w [K, N]; residual None or [M, N]."""
    m = a.shape[0]
    for blk in prange((m + _ROWS - 1) // _ROWS):
        i0 = blk * _ROWS
        n_rows = min(_ROWS, m - i0)
        _rows_times_w(a, w, out, i0, n_rows)
        for i in range(i0, i0 + n_rows):
            row = out[i]
            bias_act_row(row, bias, act)
            if residual is not None:
                add_into(row, residual[i])


def pointwise_conv2d_numba(
    x: np.ndarray,
    kernel: np.ndarray,
    bias: np.ndarray,
    out: np.ndarray,
    act: int = ACT_NONE,
    residual: np.ndarray | None = None,
) -> None:
    """Same contract as ``pointwise_conv2d``, computed entirely in Numba (prange over row blocks)."""
    cin, cout = kernel.shape
    r = None if residual is None else residual.reshape(-1, cout)
    gemm_numba(x.reshape(-1, cin), kernel, bias, out.reshape(-1, cout), act, r)
