"""Global pooling, fast.

    global_average_pool(x, out)     x [N, H, W, C] -> out [N, C]

``out`` is preallocated, C-contiguous float32, not aliasing x. For keepdims=True pass a view of
the [N, 1, 1, C] buffer: ``out.reshape(n, c)``.

The mean is computed as reference.global_average_pool does (NumPy's float32 mean over axes 1, 2):
a float32 sum over the pixels, then one division by the pixel count. The sum runs pixel by pixel
with the channel loop inside, so each step is a contiguous vector add.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np

from .backend import njit
from .entry import entry


@entry
def global_average_pool(x, out) -> Callable[[], None]:
    """out[n, c] = mean over (h, w) of x[n, h, w, c]."""
    if x.ndim != 4 or out.shape != (x.shape[0], x.shape[3]):  # Numba does not check indices
        raise ValueError(f"global_average_pool: out {out.shape} does not fit x {x.shape}")
    return partial(average_pool_rows, x, out)


@njit(cache=True)
def average_pool_rows(x, out):
    """global_average_pool's loop, on shapes already checked (callable from other Numba kernels)."""
    n_images, h, w, c_count = x.shape
    count = np.float32(h * w)
    for n in range(n_images):
        acc = out[n]
        for c in range(c_count):
            acc[c] = np.float32(0.0)
        for i in range(h):
            for j in range(w):
                px = x[n, i, j]
                for c in range(c_count):
                    acc[c] += px[c]
        for c in range(c_count):
            acc[c] = acc[c] / count
