"""Pointwise (1x1) convolution and dense layers as one GEMM with a fused epilogue.

    pointwise_conv2d(x, kernel, bias, out, act, residual=None)
    dense(x, kernel, bias, out, act)

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

Two implementations of the same contract:
- ``pointwise_conv2d`` / ``dense``: the product by BLAS (NumPy's OpenBLAS, ``np.matmul(out=...)``),
  then a Numba epilogue over the freshly written rows. Used by default: measured at MobileNetV2
  shapes it is 2-3x faster than the Numba GEMM below (see bench/kernels.py), because OpenBLAS has
  hand-written AVX-512 microkernels that keep a register tile of C in registers; Numba cannot
  express that (LLVM will not keep an accumulator tile that lives in an array in registers).
  The product and the epilogue go block by block over rows so each block of ``out`` is still in
  cache when the epilogue reads it back.
- ``pointwise_conv2d_numba``: the whole thing in Numba (4 rows at a time, the epilogue fused per
  block). Slower per call, but it never wakes OpenBLAS's thread pool; kept for the
  "one pool owns the cores" comparison in bench/kernels.py and as the fallback if BLAS is absent.

Threads: with BLAS doing the product, BLAS's own thread count decides the parallelism of the
product (set it with kernels.threads.set_threads); the epilogue is serial on purpose -- a Numba
prange right after an OpenBLAS call lands on cores where OpenBLAS's workers are still spinning.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .activations import ACT_NONE, bias_act_row

# Rows of the GEMM per block: the block's output (rows x Cout floats) should stay in L2 until the
# epilogue reads it back, and blocks should be few enough that the per-call overhead of
# np.matmul (~2 us) stays small.
_BLOCK_BYTES = 512 * 1024


@njit(cache=True)
def _epilogue(out, bias, act, residual, row_start, row_stop):
    """out[r] = act(out[r] + bias) (+ residual[r]) for rows [row_start, row_stop) of a 2-D GEMM.

    The rows are contiguous, so they are processed as one flat run in chunks of several rows, with
    the bias repeated to the chunk's length: with 16 or 24 output channels, a loop per row would
    spend more time starting loops than adding (the vector loop runs once or twice per row).
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
            rp = res[start:stop]
            for c in range(part.shape[0]):
                part[c] = part[c] + rp[c]


def gemm(a: np.ndarray, w: np.ndarray, bias: np.ndarray, out: np.ndarray, act: int,
         residual: np.ndarray | None) -> None:
    """out = act(a @ w + bias) (+ residual) for 2-D a [M, K], w [K, N]: BLAS product, Numba epilogue."""
    m, cout = out.shape
    rows = max(16, _BLOCK_BYTES // (4 * max(cout, a.shape[1])))
    for start in range(0, m, rows):
        stop = min(m, start + rows)
        np.matmul(a[start:stop], w, out=out[start:stop])
        _epilogue(out, bias, act, residual, start, stop)


def pointwise_conv2d(
    x: np.ndarray,
    kernel: np.ndarray,
    bias: np.ndarray,
    out: np.ndarray,
    act: int = ACT_NONE,
    residual: np.ndarray | None = None,
) -> None:
    """out = act(x @ kernel + bias) (+ residual), over the last axis of NHWC ``x``; BLAS product."""
    cin, cout = kernel.shape
    a = x.reshape(-1, cin)
    o = out.reshape(-1, cout)
    r = None if residual is None else residual.reshape(-1, cout)
    gemm(a, kernel, bias, o, act, r)


def dense(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray, out: np.ndarray, act: int = ACT_NONE) -> None:
    """out = act(x @ kernel + bias) for x [M, features] (softmax is a separate step: activations.softmax)."""
    gemm(x, kernel, bias, out, act, None)


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
                res = residual[i]
                for c in range(row.shape[0]):
                    row[c] = row[c] + res[c]


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
