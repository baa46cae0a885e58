"""The depthwise drivers: compiled loops that walk a layer's output rows through a vector row kernel
(kernels/depthwise_row_kernels.py), one call per row, spread over Numba's threads.

    vector_depthwise(row, x, kernel, bias, out, stride_h, stride_w, pad_top, pad_left, act)          # parallel
    vector_depthwise_serial(...)                                                                     # one thread
    vector_row(layer, src, src_row0, o_row, i)      one row, for kernels that hold the input elsewhere
                                                    (kernels/expand_depthwise.py)

``row`` is the address ``row_kernel`` gives. The operator (kernels/depthwise.py) checks shapes and chooses;
these loops trust them.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .activations import bias_act_row
from .backend import njit, prange
from .depthwise_loops import clipped_taps, tap_range
from .depthwise_row_kernels import call_row


class RowLayer(NamedTuple):
    """What every output row of a layer shares (int64): the address of its row kernel (``row_kernel``), the
    window size ``k``, the input's height ``h``, width ``w`` and channels ``cs``, the addresses of the kernel
    and the bias, the output's width ``ow``, strides, top and left padding, the activation code, and the output
    columns [j_lo, j_hi) whose windows lie wholly inside the image (``whole_columns``)."""

    row: int
    k: int
    h: int
    w: int
    cs: int
    kernel: int
    bias: int
    ow: int
    stride_h: int
    stride_w: int
    pad_top: int
    pad_left: int
    act: int
    j_lo: int
    j_hi: int


@njit(inline="always")
def whole_columns(ow, w, k, stride_w, pad_left):
    """Output columns [j_lo, j_hi) whose windows have all their taps inside the image's width."""
    j_lo = min(ow, (pad_left + stride_w - 1) // stride_w)
    return j_lo, max(j_lo, min(ow, (w + pad_left - k) // stride_w + 1))


@njit(inline="always")
def vector_row(layer, src, src_row0, o_row, i):
    """Output row ``i`` of one image (at address ``o_row``) through the layer's row kernel. ``src``: the
    address of the image's input row ``src_row0`` (rows of w*cs floats; the image itself, or a band of its
    rows held elsewhere, kernels/expand_depthwise.py). Returns False, computing nothing, when no kernel row
    of the window lies inside the image."""
    k, w, cs = layer.k, layer.w, layer.cs
    ih0, di_lo, di_hi = tap_range(i, layer.stride_h, layer.pad_top, k, layer.h)
    rows = di_hi - di_lo
    if rows <= 0:
        return False
    x_row = src + 4 * ((ih0 + di_lo - src_row0) * w * cs)
    k_row = layer.kernel + 4 * (di_lo * k * cs)
    call_row(layer.row, x_row, w * cs, cs, k_row, layer.bias, o_row, layer.ow, layer.stride_w, rows, layer.act,
             layer.pad_left, w, layer.j_lo, layer.j_hi)
    return True


@njit(inline="always")
def _vector_rows(row, x, kernel, bias, out, stride_h, stride_w, pad_top, pad_left, act, job_lo, job_hi):
    """Output rows job_lo .. job_hi - 1 (numbered over (image, row)) through ``vector_row`` and the
    row kernel at address ``row``, border pixels included. Only an output row with no kernel row inside
    the image (padding taller than the kernel) takes ``clipped_taps``: act(bias)."""
    n_images, h, w, cs = x.shape
    k = kernel.shape[0]
    oh, ow = out.shape[1], out.shape[2]
    x_addr = np.int64(x.ctypes.data)
    o_addr = np.int64(out.ctypes.data)
    j_lo, j_hi = whole_columns(ow, w, k, stride_w, pad_left)
    layer = RowLayer(row, k, h, w, cs, np.int64(kernel.ctypes.data), np.int64(bias.ctypes.data), ow, stride_h,
                     stride_w, pad_top, pad_left, act, j_lo, j_hi)
    for job in range(job_lo, job_hi):
        n = job // oh
        i = job % oh
        if vector_row(layer, x_addr + 4 * (n * h * w * cs), 0, o_addr + 4 * (job * ow * cs), i):
            continue
        ih0 = i * stride_h - pad_top
        second = np.empty(cs, np.float32)
        for j in range(ow):
            iw0, dj_lo, dj_hi = tap_range(j, stride_w, pad_left, k, w)
            acc = out[n, i, j]
            clipped_taps(acc, second, x, n, ih0, iw0, kernel, 0, 0, dj_lo, dj_hi, cs)
            bias_act_row(acc, bias, act)


@njit(parallel=True, cache=True)
def vector_depthwise(row, x, kernel, bias, out, stride_h, stride_w, pad_top, pad_left, act):
    """Depthwise through the vector row kernel at ``row``, on checked shapes: one task per (image, output row)."""
    for job in prange(x.shape[0] * out.shape[1]):
        _vector_rows(row, x, kernel, bias, out, stride_h, stride_w, pad_top, pad_left, act, job, job + 1)


@njit(cache=True)
def vector_depthwise_serial(row, x, kernel, bias, out, stride_h, stride_w, pad_top, pad_left, act):
    """``vector_depthwise`` on one thread: all rows in a plain loop."""
    _vector_rows(row, x, kernel, bias, out, stride_h, stride_w, pad_top, pad_left, act, 0, x.shape[0] * out.shape[1])
