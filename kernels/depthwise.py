"""The depthwise convolution operator: the math is reference.depthwise_conv2d, this file is how it runs fast.

    depthwise_conv2d(x, kernel, bias, out, stride_h, stride_w, pad_top, pad_left, act)
    call = depthwise_conv2d.bind(x, kernel, bias, out, ...)   # checked once (what a plan does), then
    call()                                                    # every call (kernels/entry.py)

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
multiply zeros). kernels/reference.py ``conv_output_size`` computes OH/OW from the four pads.

Two implementations with one contract, read in this order after kernels/reference.py:
- kernels/depthwise_loops.py: plain Numba loops, for every shape and activation;
- kernels/depthwise_microkernel.py: the vector row kernel, LLVM vector IR over blocks of 16 channels (8
  without AVX-512), the kernel block held in registers, one register accumulator per pixel, border pixels
  included; for square 3x3 and 5x5 kernels with none/ReLU/ReLU6/hard swish (every MobileNet depthwise
  layer). kernels/depthwise_row_kernels.py compiles it once per kind of row, kernels/depthwise_drivers.py
  walks the output rows through it, kernels/depthwise_rules.py says which layers and which order.
Both add each output's taps row by row, left to right (a 5-wide window in two sums, columns 0-2 and 3-4,
added at the end: ``split_column``), and give the same bits; which path runs depends only on the layer's
shape and the CPU: the answer does not depend on threads or batch.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np

from .depthwise_drivers import vector_depthwise, vector_depthwise_serial
from .depthwise_loops import plain_depthwise_conv2d
from .depthwise_row_kernels import ROW_KERNELS, row_kernel
from .depthwise_rules import by_pixel_order, takes_vector_kernel
from .entry import ByThreads, entry

__all__ = ["ROW_KERNELS", "depthwise_conv2d"]

# The vector driver under the name kernels/threads.py's ``kernels_cached`` checks Numba's cache for.
_depthwise_vector = vector_depthwise


@entry
def depthwise_conv2d(x, kernel, bias, out, stride_h, stride_w, pad_top, pad_left, act) -> Callable[[], None]:
    """out = act(depthwise(x, kernel) + bias); see the module docstring for the contract."""
    # Numba does not check indices: shapes that do not fit would read past an array, not raise.
    c_count = x.shape[3]
    if (x.ndim != 4 or out.ndim != 4 or out.shape[0] != x.shape[0] or out.shape[3] != c_count
            or kernel.shape[2:] != (c_count,) or bias.shape != (c_count,)):
        raise ValueError(f"depthwise_conv2d shapes do not fit: x {x.shape}, kernel {kernel.shape}, "
                         f"bias {bias.shape}, out {out.shape}")
    args = (x, kernel, bias, out, stride_h, stride_w, pad_top, pad_left, act)
    # The vector kernel works on raw addresses: another dtype or layout takes the plain loops. On one
    # thread its rows run in a plain loop (ByThreads), each row computed the same way either way.
    if takes_vector_kernel(kernel.shape[0], kernel.shape[1], act) and all(map(_plain, (x, out, kernel, bias))):
        k = kernel.shape[0]
        row = row_kernel(k, act, by_pixel_order(k, c_count, x.shape[2], out.shape[2]))
        return ByThreads(partial(vector_depthwise_serial, row, *args), partial(vector_depthwise, row, *args))
    return partial(plain_depthwise_conv2d, *args)


_FLOAT32 = np.dtype(np.float32)


def _plain(a) -> bool:
    """A float32 array in C order: what the vector kernel's raw addresses assume."""
    return a.dtype == _FLOAT32 and a.flags.c_contiguous
