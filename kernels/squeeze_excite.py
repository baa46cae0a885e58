"""Squeeze-and-excite (MobileNetV3) in one kernel: the math is reference.squeeze_excite.

    squeeze_excite(x, reduce_kernel, reduce_bias, expand_kernel, expand_bias, out)

x              [N, H, W, C]   float32, C-contiguous
reduce_kernel  [C, Cr]        (the 1x1 Conv2D "squeeze_excite_conv" kernel, 1x1 dims dropped)
reduce_bias    [Cr]
expand_kernel  [Cr, C]        ("squeeze_excite_conv_1")
expand_bias    [C]
out            [N, H, W, C]   preallocated, C-contiguous; may be x itself (the gate is computed
                              from all of x before any of it is overwritten)

s = mean over pixels of x; z = relu(s @ W1 + b1); g = relu6(z @ W2 + b2 + 3) * (1/6); out = x * g.
The gate multiplies by the float32 rounding of 1/6 (not a division) because MobileNetV3 builds it
from a Rescaling-like multiply, unlike the hard_sigmoid activation.

Why one kernel: the pool, the two tiny dense layers and the gate are a few thousand flops on a
vector of C values; as separate layers they would cost four passes through the interpreter and
four buffers. Only the last step (scaling every pixel) touches the whole tensor, so it is the
only parallel loop.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
from numba import njit, prange

from .entry import entry
from .pooling import average_pool_rows

_SIXTH = np.float32(1.0 / 6.0)


@njit(cache=True)
def _gates(x, reduce_kernel, reduce_bias, expand_kernel, expand_bias):
    """The [N, C] gates: pool, dense + relu, dense, relu6(z + 3) * (1/6)."""
    n_images = x.shape[0]
    c_count = x.shape[3]
    cr = reduce_kernel.shape[1]
    s = np.empty((n_images, c_count), dtype=np.float32)
    average_pool_rows(x, s)
    z = np.empty(cr, dtype=np.float32)
    gate = np.empty((n_images, c_count), dtype=np.float32)
    for n in range(n_images):
        # z = relu(s @ W1 + b1): loop over the rows of W1 so the inner loop is contiguous.
        for r in range(cr):
            z[r] = np.float32(0.0)
        for c in range(c_count):
            sv = s[n, c]
            for r in range(cr):
                z[r] += sv * reduce_kernel[c, r]
        for r in range(cr):
            z[r] = max(z[r] + reduce_bias[r], np.float32(0.0))
        g = gate[n]
        for c in range(c_count):
            g[c] = np.float32(0.0)
        for r in range(cr):
            zv = z[r]
            for c in range(c_count):
                g[c] += zv * expand_kernel[r, c]
        for c in range(c_count):
            v = g[c] + expand_bias[c]
            g[c] = min(max(v + np.float32(3.0), np.float32(0.0)), np.float32(6.0)) * _SIXTH
    return gate


@entry
def squeeze_excite(x, reduce_kernel, reduce_bias, expand_kernel, expand_bias, out) -> Callable[[], None]:
    """out = x * gate(x); see the module docstring for the contract."""
    # Numba does not check indices: shapes that do not fit would read past an array, not raise.
    c, cr = x.shape[3], reduce_kernel.shape[1]
    if (out.shape != x.shape or reduce_kernel.shape != (c, cr) or reduce_bias.shape != (cr,)
            or expand_kernel.shape != (cr, c) or expand_bias.shape != (c,)):
        raise ValueError(f"squeeze_excite shapes do not fit: x {x.shape}, reduce {reduce_kernel.shape}, "
                         f"expand {expand_kernel.shape}, out {out.shape}")
    return partial(_squeeze_excite, x, reduce_kernel, reduce_bias, expand_kernel, expand_bias, out)


@njit(parallel=True, cache=True)
def _squeeze_excite(x, reduce_kernel, reduce_bias, expand_kernel, expand_bias, out):
    """squeeze_excite's loops, on shapes already checked."""
    n_images, h, w, c_count = x.shape
    gate = _gates(x, reduce_kernel, reduce_bias, expand_kernel, expand_bias)
    for job in prange(n_images * h):
        n = job // h
        i = job % h
        g = gate[n]
        for j in range(w):
            xr = x[n, i, j]
            orow = out[n, i, j]
            for c in range(c_count):
                orow[c] = xr[c] * g[c]
