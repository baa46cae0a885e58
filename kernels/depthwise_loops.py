"""Depthwise convolution as plain Numba loops: the learner's step between kernels/reference.py
``depthwise_conv2d`` (the math, in NumPy) and the vector row kernel (kernels/depthwise_microkernel.py).

    plain_depthwise_conv2d(x, kernel, bias, out, stride_h, stride_w, pad_top, pad_left, act)

The contract is kernels/depthwise.py's (which checks the shapes and chooses this path or the vector one).
These loops take every shape: any kernel size, any stride, any activation; the vector kernel takes the
square 3x3 and 5x5 windows of every MobileNet with the activations it applies on its registers. Both add
each output's taps row by row, left to right (a 5-wide window in two sums, columns 0-2 and 3-4, added at
the end: ``split_column``), and give the same bits.

Why the loops are laid out this way:
- Work is split over (image, output row) pairs with prange: enough pieces for 2 cores even at
  7x7, and each piece writes its own output row, so threads never share a cache line of ``out``.
- The innermost loop runs over channels, the contiguous axis of x, kernel and out, so LLVM turns
  it into SIMD loads and FMAs; the taps are outer loops.
- What bounds the simple loop is one load + store of the accumulator per tap. Interior 3x3 windows
  (all taps inside the image) are summed in a single pass over the channels -- four adjacent ones
  at a time at stride 1, sharing their input columns and kernel loads --, 5x5 windows one kernel
  row per pass; border pixels (and other kernel sizes) loop over the clipped tap range.
- The accumulator is the output row itself (in L1), and bias + activation run on it right after
  the last tap, while it is still in cache: the epilogue costs no extra pass over memory.
"""

from __future__ import annotations

import numpy as np

from .activations import bias_act_row
from .backend import njit, prange


@njit(inline="always")
def split_column(kw):
    """Where a window's sum is cut in two: taps in columns [0, split) add up in one chain, the
    others in a second, each row by row, left to right, and the two are added at the end.

    5-wide windows only (columns 0-2 and 3-4): a chain of 25 dependent FMAs per output keeps
    too few independent ones in flight; two chains half as long run faster. Every path (vector or
    plain loops, border or interior pixel) sums in this order.
    """
    return 3 if kw == 5 else kw


@njit(inline="always")
def tap_range(o, stride, pad, k, size):
    """Kernel taps [lo, hi) of output position ``o`` that land inside the image (0 <= i < size)."""
    start = o * stride - pad
    lo = max(0, -start)
    hi = min(k, size - start)
    return start, lo, hi


@njit(inline="always")
def _window_3x3(acc, x, n, ih0, iw0, kernel, c_count):
    """acc[c] = sum of the 9 taps of a 3x3 window that lies wholly inside the image.

    The common case (most pixels of most MobileNet layers), so it gets one pass over the channels
    with the 9 input and 9 kernel rows hoisted: one store per output value instead of one per tap,
    which is what bounds the simpler loop. Taps are still added one at
    a time in the reference's order (row by row, left to right).
    """
    x00 = x[n, ih0, iw0]
    x01 = x[n, ih0, iw0 + 1]
    x02 = x[n, ih0, iw0 + 2]
    x10 = x[n, ih0 + 1, iw0]
    x11 = x[n, ih0 + 1, iw0 + 1]
    x12 = x[n, ih0 + 1, iw0 + 2]
    x20 = x[n, ih0 + 2, iw0]
    x21 = x[n, ih0 + 2, iw0 + 1]
    x22 = x[n, ih0 + 2, iw0 + 2]
    k00 = kernel[0, 0]
    k01 = kernel[0, 1]
    k02 = kernel[0, 2]
    k10 = kernel[1, 0]
    k11 = kernel[1, 1]
    k12 = kernel[1, 2]
    k20 = kernel[2, 0]
    k21 = kernel[2, 1]
    k22 = kernel[2, 2]
    for c in range(c_count):
        a = np.float32(0.0) + x00[c] * k00[c]  # see _taps_3x3
        a += x01[c] * k01[c]
        a += x02[c] * k02[c]
        a += x10[c] * k10[c]
        a += x11[c] * k11[c]
        a += x12[c] * k12[c]
        a += x20[c] * k20[c]
        a += x21[c] * k21[c]
        a += x22[c] * k22[c]
        acc[c] = a


@njit(inline="always")
def _four_windows_3x3(out_row, j, x, n, ih0, iw0, kernel, c_count):
    """out_row[j + q] for q = 0..3: four adjacent stride-1 windows, all inside the image.

    Their 4 x 3 taps read only 6 input columns per row, so one channel pass loads 18 input values
    and 9 kernel values for 4 outputs (the one-window pass loads 18 for 1), and the per-pixel set-up
    is paid once for four, which counts most with few channels. Each output still adds its taps in
    the reference's order.
    """
    r0, r1, r2 = x[n, ih0], x[n, ih0 + 1], x[n, ih0 + 2]
    a0, a1, a2, a3, a4, a5 = r0[iw0], r0[iw0 + 1], r0[iw0 + 2], r0[iw0 + 3], r0[iw0 + 4], r0[iw0 + 5]
    b0, b1, b2, b3, b4, b5 = r1[iw0], r1[iw0 + 1], r1[iw0 + 2], r1[iw0 + 3], r1[iw0 + 4], r1[iw0 + 5]
    d0, d1, d2, d3, d4, d5 = r2[iw0], r2[iw0 + 1], r2[iw0 + 2], r2[iw0 + 3], r2[iw0 + 4], r2[iw0 + 5]
    k00, k01, k02 = kernel[0, 0], kernel[0, 1], kernel[0, 2]
    k10, k11, k12 = kernel[1, 0], kernel[1, 1], kernel[1, 2]
    k20, k21, k22 = kernel[2, 0], kernel[2, 1], kernel[2, 2]
    o0, o1, o2, o3 = out_row[j], out_row[j + 1], out_row[j + 2], out_row[j + 3]
    for c in range(c_count):
        w00, w01, w02 = k00[c], k01[c], k02[c]
        w10, w11, w12 = k10[c], k11[c], k12[c]
        w20, w21, w22 = k20[c], k21[c], k22[c]
        x0, x1, x2, x3, x4, x5 = a0[c], a1[c], a2[c], a3[c], a4[c], a5[c]
        y0, y1, y2, y3, y4, y5 = b0[c], b1[c], b2[c], b3[c], b4[c], b5[c]
        z0, z1, z2, z3, z4, z5 = d0[c], d1[c], d2[c], d3[c], d4[c], d5[c]
        o0[c] = _taps_3x3(x0, x1, x2, y0, y1, y2, z0, z1, z2, w00, w01, w02, w10, w11, w12, w20, w21, w22)
        o1[c] = _taps_3x3(x1, x2, x3, y1, y2, y3, z1, z2, z3, w00, w01, w02, w10, w11, w12, w20, w21, w22)
        o2[c] = _taps_3x3(x2, x3, x4, y2, y3, y4, z2, z3, z4, w00, w01, w02, w10, w11, w12, w20, w21, w22)
        o3[c] = _taps_3x3(x3, x4, x5, y3, y4, y5, z3, z4, z5, w00, w01, w02, w10, w11, w12, w20, w21, w22)


@njit(inline="always")
def _taps_3x3(x0, x1, x2, y0, y1, y2, z0, z1, z2, w00, w01, w02, w10, w11, w12, w20, w21, w22):
    """One output value: the 9 taps added one at a time, row by row, left to right (the reference's order).

    The first product starts from zero: in ``x0*w00 + x1*w01`` LLVM may fuse either product into
    the FMA; ``0 + x0*w00`` rounds the first product as a multiply would, and the next taps fuse in
    order, as in the vector kernel (the test compares the two bit for bit).
    """
    s = np.float32(0.0) + x0 * w00
    s += x1 * w01
    s += x2 * w02
    s += y0 * w10
    s += y1 * w11
    s += y2 * w12
    s += z0 * w20
    s += z1 * w21
    s += z2 * w22
    return s


@njit(inline="always")
def _row_5(acc, second, x, n, ih, iw0, kernel, di, c_count):
    """acc[c] += the first 3 taps of kernel row ``di`` (wholly inside the image), second[c] += the
    last 2 (``split_column``), in one channel pass."""
    x0 = x[n, ih, iw0]
    x1 = x[n, ih, iw0 + 1]
    x2 = x[n, ih, iw0 + 2]
    x3 = x[n, ih, iw0 + 3]
    x4 = x[n, ih, iw0 + 4]
    k0 = kernel[di, 0]
    k1 = kernel[di, 1]
    k2 = kernel[di, 2]
    k3 = kernel[di, 3]
    k4 = kernel[di, 4]
    for c in range(c_count):
        a = acc[c]
        a += x0[c] * k0[c]
        a += x1[c] * k1[c]
        a += x2[c] * k2[c]
        acc[c] = a
        b = second[c]
        b += x3[c] * k3[c]
        b += x4[c] * k4[c]
        second[c] = b


@njit(inline="always")
def clipped_taps(acc, second, x, n, ih0, iw0, kernel, di_lo, di_hi, dj_lo, dj_hi, c_count):
    """acc[c] = sum over the taps [di_lo, di_hi) x [dj_lo, dj_hi) inside the image, one at a time,
    in two sums cut at ``split_column`` (``second`` holds the other one: C floats of scratch)."""
    split = split_column(kernel.shape[1])
    for c in range(c_count):
        acc[c] = np.float32(0.0)
        second[c] = np.float32(0.0)
    for di in range(di_lo, di_hi):
        for dj in range(dj_lo, dj_hi):
            xr = x[n, ih0 + di, iw0 + dj]
            kr = kernel[di, dj]
            sum_ = acc if dj < split else second
            for c in range(c_count):
                sum_[c] += xr[c] * kr[c]
    if split < kernel.shape[1]:
        for c in range(c_count):
            acc[c] += second[c]


@njit(parallel=True, cache=True, fastmath={"contract"})
def plain_depthwise_conv2d(x, kernel, bias, out, stride_h, stride_w, pad_top, pad_left, act):
    """depthwise_conv2d (kernels/depthwise.py) as plain loops, on shapes already checked."""
    n_images, h, w, c_count = x.shape
    kh, kw = kernel.shape[0], kernel.shape[1]
    oh, ow = out.shape[1], out.shape[2]
    quads = kh == 3 and kw == 3 and stride_w == 1
    for job in prange(n_images * oh):
        n = job // oh
        i = job % oh
        second = np.empty(c_count, np.float32)  # the second sum of split windows (split_column)
        ih0, di_lo, di_hi = tap_range(i, stride_h, pad_top, kh, h)
        full_rows = di_lo == 0 and di_hi == kh
        j = 0
        while j < ow:
            iw0, dj_lo, dj_hi = tap_range(j, stride_w, pad_left, kw, w)
            if quads and full_rows and iw0 >= 0 and iw0 + 6 <= w and j + 4 <= ow:
                _four_windows_3x3(out[n, i], j, x, n, ih0, iw0, kernel, c_count)
                for q in range(4):
                    bias_act_row(out[n, i, j + q], bias, act)
                j += 4
                continue
            acc = out[n, i, j]
            if full_rows and dj_lo == 0 and dj_hi == kw and kh == 3 and kw == 3:
                _window_3x3(acc, x, n, ih0, iw0, kernel, c_count)
            elif dj_lo == 0 and dj_hi == kw and kw == 5:
                for c in range(c_count):
                    acc[c] = np.float32(0.0)
                    second[c] = np.float32(0.0)
                for di in range(di_lo, di_hi):
                    _row_5(acc, second, x, n, ih0 + di, iw0, kernel, di, c_count)
                for c in range(c_count):
                    acc[c] += second[c]
            else:
                # Border pixels (and other kernel sizes): only the taps inside the image.
                clipped_taps(acc, second, x, n, ih0, iw0, kernel, di_lo, di_hi, dj_lo, dj_hi, c_count)
            bias_act_row(acc, bias, act)
            j += 1

