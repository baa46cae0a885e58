"""Depthwise convolution, fast: the math is reference.depthwise_conv2d, this file is how it runs fast.

    depthwise_conv2d(x, kernel, bias, out, stride_h, stride_w, pad_top, pad_left, act)

x       [N, H, W, C]     float32, C-contiguous (the input, *unpadded*)
kernel  [KH, KW, C]      float32 (a Keras depthwise kernel [KH, KW, C, 1] with the 1 dropped;
                         depth_multiplier > 1 stays on the reference path)
bias    [C]              float32 (zeros if the layer has none; BN folding usually provides one)
out     [N, OH, OW, C]   float32, C-contiguous, preallocated, must not alias x
act     an ACT_* code from kernels.activations, applied after the bias

Padding is given by its top and left amounts only: the output size (from ``out.shape``) fixes how
many rows/columns the kernel visits, so the bottom/right padding is whatever is left over. This
is how ZeroPadding2D((0, 1), (0, 1)) + padding="valid" and padding="same" both come in without a
padded copy of the input: taps that fall outside the image are simply skipped (they would
multiply zeros). ``output_size`` computes OH/OW from the four pads.

Why it is laid out this way:
- Work is split over (image, output row) pairs with prange: enough pieces for 2 cores even at
  7x7, and each piece writes its own output row, so threads never share a cache line of ``out``.
- The innermost loop runs over channels, the contiguous axis of x, kernel and out, so LLVM turns
  it into SIMD loads and FMAs; the taps are outer loops.
- What bounds the simple loop is one load + store of the accumulator per tap. Interior 3x3 windows
  (all taps inside the image) are summed in a single pass over the channels, 5x5 windows one
  kernel row per pass; border pixels (and other kernel sizes) loop over the clipped tap range.
- The accumulator is the output row itself (in L1), and bias + activation run on it right after
  the last tap, while it is still in cache: the epilogue costs no extra pass over memory.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .activations import bias_act_row


def output_size(size: int, kernel: int, stride: int, pad_before: int, pad_after: int) -> int:
    """Positions a kernel visits along one axis of an input padded with (pad_before, pad_after)."""
    return (size + pad_before + pad_after - kernel) // stride + 1


@njit(inline="always")
def _tap_range(o, stride, pad, k, size):
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
    which is what bounds the simpler loop (2x faster at 32 channels). Taps are still added one at
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
        a = x00[c] * k00[c]
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
def _row_5(acc, x, n, ih, iw0, kernel, di, c_count):
    """acc[c] += the 5 taps of kernel row ``di`` (wholly inside the image), in one channel pass."""
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
        a += x3[c] * k3[c]
        a += x4[c] * k4[c]
        acc[c] = a


@njit(inline="always")
def _clipped_taps(acc, x, n, ih0, iw0, kernel, di_lo, di_hi, dj_lo, dj_hi, c_count):
    """acc[c] = sum over the taps [di_lo, di_hi) x [dj_lo, dj_hi) inside the image, one at a time."""
    for c in range(c_count):
        acc[c] = np.float32(0.0)
    for di in range(di_lo, di_hi):
        for dj in range(dj_lo, dj_hi):
            xr = x[n, ih0 + di, iw0 + dj]
            kr = kernel[di, dj]
            for c in range(c_count):
                acc[c] += xr[c] * kr[c]


@njit(parallel=True, cache=True, fastmath={"contract"})
def depthwise_conv2d(x, kernel, bias, out, stride_h, stride_w, pad_top, pad_left, act):
    """out = act(depthwise(x, kernel) + bias); see the module docstring for the contract."""
    n_images, h, w, c_count = x.shape
    kh, kw = kernel.shape[0], kernel.shape[1]
    oh, ow = out.shape[1], out.shape[2]
    for job in prange(n_images * oh):
        n = job // oh
        i = job % oh
        ih0, di_lo, di_hi = _tap_range(i, stride_h, pad_top, kh, h)
        full_rows = di_lo == 0 and di_hi == kh
        for j in range(ow):
            iw0, dj_lo, dj_hi = _tap_range(j, stride_w, pad_left, kw, w)
            acc = out[n, i, j]
            if full_rows and dj_lo == 0 and dj_hi == kw and kh == 3 and kw == 3:
                _window_3x3(acc, x, n, ih0, iw0, kernel, c_count)
            elif dj_lo == 0 and dj_hi == kw and kw == 5:
                for c in range(c_count):
                    acc[c] = np.float32(0.0)
                for di in range(di_lo, di_hi):
                    _row_5(acc, x, n, ih0 + di, iw0, kernel, di, c_count)
            else:
                # Border pixels (and other kernel sizes): only the taps inside the image.
                _clipped_taps(acc, x, n, ih0, iw0, kernel, di_lo, di_hi, dj_lo, dj_hi, c_count)
            bias_act_row(acc, bias, act)
