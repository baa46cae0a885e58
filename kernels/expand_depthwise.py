"""A 1x1 convolution and the depthwise convolution that reads it, in one pass over bands of rows.

    expand_depthwise(x, packed, expand_act, kernel, bias, out, stride_h, stride_w, pad_top, pad_left, act, scratch)
    call = expand_depthwise.bind(...)       # checked once (what a plan does), then call() (kernels/entry.py)

x        [N, H, W, Cin]   float32, C-contiguous: the block's input
packed   the 1x1 layer's [Cin, C] weights and bias, packed for the microkernel's ``TILE`` (kernels/gemm.py ``pack``)
kernel   [K, K, C]        float32, the depthwise kernel (K = 3 or 5), bias [C]
out      [N, OH, OW, C]   float32, C-contiguous, preallocated
scratch  [T, R*W, C]      float32: one band of R rows of the 1x1 layer's output per thread (``band_rows``)

out = act(depthwise(expand_act(x @ w + b), kernel) + bias): the expand and depthwise layers of an
inverted residual block (MobileNet V2, V3), or V1's pointwise layer and the depthwise layer after it.

Why: the 1x1 layer's output is the widest tensor of the block (six times its input at MobileNetV2's
112x112 and 56x56 maps: 1.8-4.8 MB per image). Written whole, it leaves the core's L2 cache, and the
depthwise layer, which does little arithmetic per value it reads, then waits on L3 for it. Here each
thread computes the 1x1 layer's output a few rows at a time into its own band of scratch (sized to
stay in L2) and runs the depthwise rows that read them straight away; the rows the next band needs
again (the window's overlap) are moved up, not recomputed.

Same bits as the two layers run one after the other (tests/test_expand_depthwise.py): each value of
the 1x1 layer is the microkernel's FMA chain whatever the rows around it (kernels/gemm.py), and each
depthwise output is ``vector_row``'s (kernels/depthwise_drivers.py), reading the same values from elsewhere.
The threads take equal runs of output rows (numbered over the batch's images); the answer does not
depend on how many.

The NumPy twin is the two reference kernels in a row: reference.pointwise_conv2d, then
reference.depthwise_conv2d.

(Numba's on-disk cache is checked against each kernel file alone: this file's compiled code inlines
depthwise_drivers.py's ``vector_row`` and gemm_drivers.py's ``register_tiles``, so after editing those,
clear kernels/__pycache__/*.nb* in a checkout.
An install replaces every file, and ``npmobile build-kernels`` keys its module on all of them.)
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np

from . import huge_pages
from .backend import njit, prange
from .depthwise_drivers import RowLayer, vector_row, whole_columns
from .depthwise_loops import tap_range
from .depthwise_row_kernels import row_kernel
from .depthwise_rules import VECTOR_ACTS, VECTOR_SIZES, by_pixel_order
from .entry import entry
from .gemm import COMPILED_TILES, PackedWeights, register_tiles
from .threads import jit_thread_count

# The microkernel tile of the 1x1 layer's product, a constant: the kernel compiles that tile alone
# (every tile gives the same bits; each costs seconds of first-run compile time). ``pack`` for it.
TILE = COMPILED_TILES[0]
_TILE_INDEX = COMPILED_TILES.index(TILE)  # how the compiled drivers know it

# Bytes of the 1x1 layer's output each thread holds: well inside a 1 MB L2 beside the weights, the
# input rows and the output rows (a fixed size, so the cut depends only on the layer's shape).
BAND_BYTES = 256 * 1024


def band_rows(w: int, c: int, k: int, stride: int) -> tuple[int, int]:
    """(output rows per band, input rows the scratch holds) for a map ``w`` wide with ``c`` channels."""
    fit = BAND_BYTES // (4 * w * c)
    band = max(1, (fit - k) // stride + 1)
    return band, (band - 1) * stride + k


def scratch_for(threads: int, w: int, c: int, k: int, stride: int) -> np.ndarray:
    """The scratch ``expand_depthwise`` needs on up to ``threads`` threads."""
    return huge_pages.zeros(threads * band_rows(w, c, k, stride)[1] * w * c).reshape(threads, -1, c)


@njit(inline="always")
def _bands(row, k, x2, h, w, panels, e_bias, e_act, kernel, bias, out, stride_h, stride_w, pad_top, pad_left,
           act, band, scratch, job_lo, job_hi):
    """Output rows job_lo .. job_hi - 1 (numbered over (image, row)), a band at a time, through ``scratch``."""
    oh, ow, c = out.shape[1], out.shape[2], out.shape[3]
    n_panels, cin, nr = panels.shape
    x_addr = np.int64(x2.ctypes.data)
    w_addr = np.int64(panels.ctypes.data)
    e_addr = np.int64(e_bias.ctypes.data)
    s_addr = np.int64(scratch.ctypes.data)
    o_addr = np.int64(out.ctypes.data)
    j_lo, j_hi = whole_columns(ow, w, k, stride_w, pad_left)
    layer = RowLayer(row, k, h, w, c, np.int64(kernel.ctypes.data), np.int64(bias.ctypes.data), ow, stride_h,
                     stride_w, pad_top, pad_left, act, j_lo, j_hi)
    row_floats = w * c
    flat = scratch.reshape(scratch.size)
    held_image, held_lo, held_hi = -1, 0, 0  # the 1x1 layer's rows [held_lo, held_hi) of that image, in scratch
    job = job_lo
    while job < job_hi:
        n = job // oh
        i0 = job % oh
        i1 = min(oh, i0 + band, i0 + job_hi - job)
        need_lo = tap_range(i0, stride_h, pad_top, k, h)[0]
        need_lo = max(0, need_lo)
        need_hi = min(h, (i1 - 1) * stride_h - pad_top + k)
        start = need_lo
        if n == held_image and held_lo <= need_lo < held_hi:
            # The rows this band shares with the last one move up, to the band's first rows
            # (destination before source: a forward copy is right even where they overlap).
            shift = (need_lo - held_lo) * row_floats
            if shift > 0:
                for f in range((held_hi - need_lo) * row_floats):
                    flat[f] = flat[shift + f]
            start = held_hi
        if start < need_hi:
            register_tiles(x_addr + 4 * ((n * h + start) * w * cin), cin, w_addr, nr, e_addr,
                           s_addr + 4 * ((start - need_lo) * row_floats), c, e_act, np.int64(0), _TILE_INDEX, 0,
                           (need_hi - start) * w, 0, n_panels)
        held_image, held_lo, held_hi = n, need_lo, need_hi
        for i in range(i0, i1):
            vector_row(layer, s_addr, need_lo, o_addr + 4 * ((n * oh + i) * ow * c), i)
        job += i1 - i0


@njit(inline="always")
def _split(row, k, x2, h, w, panels, e_bias, e_act, tile, kernel, bias, out, stride_h, stride_w, pad_top, pad_left,
           act, band, scratch):
    """Equal runs of output rows, one per thread, each through its own band of scratch."""
    if tile != _TILE_INDEX:  # another tile would run in its place
        raise ValueError("expand_depthwise: weights not packed for this kernel's tile")
    threads = min(jit_thread_count(), scratch.shape[0])
    jobs = out.shape[0] * out.shape[1]
    for t in prange(threads):
        _bands(row, k, x2, h, w, panels, e_bias, e_act, kernel, bias, out, stride_h, stride_w, pad_top,
               pad_left, act, band, scratch[t], jobs * t // threads, jobs * (t + 1) // threads)


@njit(parallel=True, cache=True)
def _expand_depthwise(row, x2, h, w, panels, e_bias, e_act, tile, kernel, bias, out, stride_h, stride_w, pad_top,
                      pad_left, act, band, scratch):
    _split(row, kernel.shape[0], x2, h, w, panels, e_bias, e_act, tile, kernel, bias, out, stride_h, stride_w,
           pad_top, pad_left, act, band, scratch)


_FLOAT32 = np.dtype(np.float32)


def fits(k: int, h: int, w: int, oh: int, stride_h: int, pad_top: int, expand_act: int, act: int) -> bool:
    """Whether a layer pair of these sizes runs here: square 3x3/5x5 windows whose every output row
    has a kernel row inside the image (no padding taller than the window), activations applied on the
    registers."""
    last_row = (oh - 1) * stride_h - pad_top
    return (k in VECTOR_SIZES and 0 <= pad_top < k and last_row < h and last_row + k > 0
            and expand_act in VECTOR_ACTS and act in VECTOR_ACTS)


@entry
def expand_depthwise(x: np.ndarray, packed: PackedWeights, expand_act: int, kernel: np.ndarray, bias: np.ndarray,
                     out: np.ndarray, stride_h: int, stride_w: int, pad_top: int, pad_left: int, act: int,
                     scratch: np.ndarray) -> Callable[[], None]:
    """out = act(depthwise(expand_act(x @ w + b), kernel) + bias); see the module docstring."""
    n, h, w, cin = x.shape if x.ndim == 4 else (0, 0, 0, 0)
    c = packed.n
    k = kernel.shape[0] if kernel.ndim == 3 else 0
    band, held = band_rows(w, c, k, stride_h) if k else (0, 0)
    if (x.ndim != 4 or packed.k != cin or kernel.shape != (k, k, c) or bias.shape != (c,) or out.ndim != 4
            or out.shape[0] != n or out.shape[3] != c or scratch.ndim != 3 or scratch.shape[1:] != (held * w, c)
            or scratch.shape[0] < 1 or not fits(k, h, w, out.shape[1], stride_h, pad_top, expand_act, act)):
        raise ValueError(f"expand_depthwise: shapes do not fit: x {x.shape} @ packed [{packed.k}, {packed.n}], "
                         f"kernel {kernel.shape}, bias {bias.shape}, out {out.shape}, scratch {scratch.shape}")
    # The kernels work on raw addresses: another dtype or layout must be refused, not compiled for.
    if not all(a.dtype == _FLOAT32 and a.flags.c_contiguous for a in (x, kernel, bias, out, scratch)):
        raise ValueError("expand_depthwise: arrays must be C-contiguous float32")
    if packed.tile != TILE:
        raise ValueError(f"expand_depthwise: weights packed for the {packed.tile.name} tile, not this "
                         f"kernel's {TILE.name}")
    row = row_kernel(k, act, by_pixel_order(k, c, w, out.shape[2]))
    return partial(_expand_depthwise, row, x.reshape(n * h * w, cin), h, w, packed.panels, packed.bias,
                   expand_act, _TILE_INDEX, kernel, bias, out, stride_h, stride_w, pad_top, pad_left, act, band,
                   scratch)


# What a model's first run through this operator compiles (kernels/first_run.py ``kernels_cached``):
# the fused expand + depthwise driver.
FIRST_RUN_KERNELS = (_expand_depthwise,)
