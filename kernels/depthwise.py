"""Depthwise convolution, fast: the math is reference.depthwise_conv2d, this file is how it runs fast.

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
multiply zeros). ``output_size`` computes OH/OW from the four pads.

Two implementations with one contract. Square 3x3 and 5x5 kernels with none/ReLU/ReLU6/hard swish
(every MobileNet depthwise layer) run through the vector row kernel at the end of this file:
LLVM vector IR over blocks of 16 channels (8 without AVX-512), the kernel block held in registers,
one register accumulator per pixel (see "The vector kernel" below), border pixels included.
Everything else takes the plain loops first in this file. Both add each output's taps row by row,
left to right (a 5-wide window in two sums, columns 0-2 and 3-4, added at the end: ``split_column``),
and give the same bits; which path runs depends only on the layer's shape and the CPU: the answer
does not depend on threads or batch.

Why the plain loops are laid out this way:
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

import math
from collections.abc import Callable
from functools import partial

import numpy as np

from .activations import ACT_HARD_SWISH, ACT_NONE, ACT_RELU, ACT_RELU6, bias_act_row
from .backend import AOT, int64_cfunc, intrinsic, njit, prange
from .entry import ByThreads, entry
from .gemm import AVX512

if not AOT:  # the LLVM IR below is emitted only when Numba compiles a kernel (kernels/backend.py)
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils


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
    is paid once for four: 10-15% faster on MobileNet's stride-1 layers, most of all with few
    channels. Each output still adds its taps in the reference's order.
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
def _clipped_taps(acc, second, x, n, ih0, iw0, kernel, di_lo, di_hi, dj_lo, dj_hi, c_count):
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
    # The vector kernel works on raw addresses: another dtype or layout takes the loops below. On one
    # thread its rows run in a plain loop (ByThreads), each row computed the same way either way.
    if _vector_kernel_fits(kernel, bias, act) and _plain(x) and _plain(out):
        k = kernel.shape[0]
        row = row_kernel(k, act, by_pixel_order(k, c_count, x.shape[2], out.shape[2]))
        return ByThreads(partial(_depthwise_vector_serial, row, *args), partial(_depthwise_vector, row, *args))
    return partial(_depthwise_conv2d, *args)


_FLOAT32 = np.dtype(np.float32)


def _plain(a) -> bool:
    """A float32 array in C order: what the vector kernel's raw addresses assume."""
    return a.dtype == _FLOAT32 and a.flags.c_contiguous


def _vector_kernel_fits(kernel, bias, act) -> bool:
    """Square 3x3/5x5 float32 kernels and the activations the vector kernel applies."""
    return (kernel.shape[0] == kernel.shape[1] and kernel.shape[0] in (3, 5) and act in VECTOR_ACTS
            and _plain(kernel) and _plain(bias))


@njit(parallel=True, cache=True, fastmath={"contract"})
def _depthwise_conv2d(x, kernel, bias, out, stride_h, stride_w, pad_top, pad_left, act):
    """depthwise_conv2d's loop, on shapes already checked."""
    n_images, h, w, c_count = x.shape
    kh, kw = kernel.shape[0], kernel.shape[1]
    oh, ow = out.shape[1], out.shape[2]
    quads = kh == 3 and kw == 3 and stride_w == 1
    for job in prange(n_images * oh):
        n = job // oh
        i = job % oh
        second = np.empty(c_count, np.float32)  # the second sum of split windows (split_column)
        ih0, di_lo, di_hi = _tap_range(i, stride_h, pad_top, kh, h)
        full_rows = di_lo == 0 and di_hi == kh
        j = 0
        while j < ow:
            iw0, dj_lo, dj_hi = _tap_range(j, stride_w, pad_left, kw, w)
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
                _clipped_taps(acc, second, x, n, ih0, iw0, kernel, di_lo, di_hi, dj_lo, dj_hi, c_count)
            bias_act_row(acc, bias, act)
            j += 1


# --------------------------------------------------------------------------------------------------
# The vector kernel: 3x3 and 5x5 kernels, activations none/ReLU/ReLU6/hard swish
# --------------------------------------------------------------------------------------------------
#
# The loops above leave the accumulators in memory and re-load the kernel for every pixel. Here a
# block of VW channels (<VW x float>, 16 with AVX-512, 8 otherwise) is carried through one output
# row: the KxK kernel vectors of the block are loaded once into registers, each output pixel is
# one register accumulator fed by K*K FMAs, and bias + activation run on that register before its
# only store. Written as LLVM vector IR through numba.extending.intrinsic, as kernels/gemm.py is
# (generic vector types: it compiles and answers the same on any x86-64).
#
# Summation order of one output value: its taps row by row, left to right, the first a multiply,
# the others FMAs (the order of the loops above; a 5-wide window as two such sums, see split_column,
# which also gives each group of pixels twice the independent FMA chains). Kernel rows outside the
# image are skipped (a copy of the loops per count of rows inside); columns outside it are loaded as
# zeros by a masked load that reads no memory, so a border window runs the same FMA chains as an
# interior one, and an outside tap adds an exact zero (x + 0*w == x): the sum of the taps inside,
# bit for bit (up to the sign of an exact zero), whichever the pixel or the CPU.

if not AOT:
    _F32 = ir.FloatType()
    _I64 = ir.IntType(64)
    _PTR = ir.PointerType()


def _emit_row(builder: ir.IRBuilder, args, k: int, vw: int, by_pixel: bool, hard_swish: bool) -> None:
    """The IR of ``row_intrinsic``: see its docstring."""
    x_addr, x_rs, cs, k_addr, bias_addr, out_addr, n_out, sw, rows, act, pad_left, width, j_lo, j_hi = args
    vec = ir.VectorType(_F32, vw)
    module = builder.module
    fma = cgutils.get_or_insert_function(module, ir.FunctionType(vec, [vec, vec, vec]), f"llvm.fma.v{vw}f32")
    mask_type = ir.VectorType(ir.IntType(1), vw)
    align = ir.Constant(ir.IntType(32), 4)
    masked_load = cgutils.get_or_insert_function(
        module, ir.FunctionType(vec, [_PTR, ir.IntType(32), mask_type, vec]), f"llvm.masked.load.v{vw}f32.p0")
    masked_store = cgutils.get_or_insert_function(
        module, ir.FunctionType(ir.VoidType(), [vec, _PTR, ir.IntType(32), mask_type]),
        f"llvm.masked.store.v{vw}f32.p0")
    zero = ir.Constant(vec, [0.0] * vw)
    i64 = lambda v: ir.Constant(_I64, v)  # noqa: E731
    lane_numbers = ir.Constant(ir.VectorType(_I64, vw), list(range(vw)))

    def lanes_below(count):
        """The mask of lanes [0, count)."""
        undefined = ir.Constant(ir.VectorType(_I64, vw), ir.Undefined)
        splat = builder.shuffle_vector(builder.insert_element(undefined, count, i64(0)), undefined,
                                       ir.Constant(ir.VectorType(ir.IntType(32), vw), [0] * vw))
        return builder.icmp_signed("<", lane_numbers, splat)

    no_lanes = ir.Constant(mask_type, [0] * vw)
    all_lanes = ir.Constant(mask_type, [1] * vw)
    x0 = builder.inttoptr(x_addr, _PTR)
    k0 = builder.inttoptr(k_addr, _PTR)
    b0 = builder.inttoptr(bias_addr, _PTR)
    o0 = builder.inttoptr(out_addr, _PTR)
    k_rs = builder.mul(cs, i64(k))
    whole = builder.mul(builder.sdiv(cs, i64(vw)), i64(vw))  # channels in whole blocks of VW
    tail_mask = lanes_below(builder.sub(cs, whole))  # the lanes of the last, partial block

    def at(base, offset):
        return builder.gep(base, [offset], source_etype=_F32)

    def load(ptr, mask):
        """A vector of floats at ptr: the lanes of ``mask`` (None: all, a plain load), zeros elsewhere."""
        if mask is None:
            return builder.load(ptr, typ=vec, align=4)
        return builder.call(masked_load, [ptr, align, mask, zero])

    three, six = (ir.Constant(vec, [v] * vw) for v in (3.0, 6.0))
    inf = ir.Constant(vec, [float("inf")] * vw)
    is_relu = builder.or_(builder.icmp_signed("==", act, i64(ACT_RELU)), builder.icmp_signed("==", act, i64(ACT_RELU6)))
    low = builder.select(is_relu, zero, builder.fneg(inf))
    high = builder.select(builder.icmp_signed("==", act, i64(ACT_RELU6)), six, inf)

    def clamp(v, lo, hi):  # NaN stays NaN (both comparisons are false), as in kernels/gemm.py
        v = builder.select(builder.fcmp_ordered("<", v, lo), lo, v)
        return builder.select(builder.fcmp_ordered(">", v, hi), hi, v)

    def finish(acc, bias, ptr, lanes, hard_swish):
        """act(acc + bias) stored at ptr: None/ReLU/ReLU6 are one clamp (bounds from ``act``)."""
        v = builder.fadd(acc, bias)
        if hard_swish:  # x * (relu6(x + 3) / 6): a division, as Keras writes it
            v = builder.fmul(v, builder.fdiv(clamp(builder.fadd(v, three), zero, six), six))
        else:
            v = clamp(v, low, high)
        if lanes is not None:
            builder.call(masked_store, [v, ptr, align, lanes])
        else:
            builder.store(v, ptr, align=4)

    def kernel_block(c0, lanes, n_rows):
        """The kernel's ``n_rows`` rows and the bias for channels [c0, c0 + VW) (``lanes`` of them: None for all)."""
        w = [[load(at(k0, builder.add(builder.add(builder.mul(i64(r), k_rs), builder.mul(i64(t), cs)), c0)), lanes)
              for t in range(k)] for r in range(n_rows)]
        return w, load(at(b0, c0), lanes)

    def windows(hard_swish, n_rows, c0=None, lanes=None):
        """Windows whose ``n_rows`` kernel rows are inside the image: every channel block of each group of
        pixels in turn (``c0`` None), or the block at ``c0`` alone, its kernel in registers for the row."""
        row_block = None if c0 is None else kernel_block(c0, lanes, n_rows)

        def block(c0, lanes, kernel, j0, col0, count, stride, inside):
            """Channels [c0, c0 + VW) (``lanes`` of them: None for all) of ``count`` adjacent output
            pixels from j0, the first tap at input column col0, ``kernel`` the block's (in registers),
            each input vector loaded once for all the windows that share it. ``inside``: for each
            input column, whether it lies in the image (None: all do); those outside load as zeros
            (a masked load reads no memory)."""
            w, bias = kernel
            xj = at(x0, builder.add(builder.mul(col0, cs), c0))
            offsets = [q * (stride or 0) + t for q in range(count) for t in range(k)]
            columns = range(max(offsets) + 1)
            if inside is None:
                masks = [lanes] * len(columns)
            else:
                masks = [builder.select(v, all_lanes if lanes is None else lanes, no_lanes) for v in inside]
            acc = [[None, None] for _ in range(count)]  # per pixel: its two sums (see split_column)
            for r in range(n_rows):
                xr = at(xj, builder.mul(i64(r), x_rs))
                xv = [load(at(xr, builder.mul(i64(c), cs)), masks[c]) for c in columns]
                for t in range(k):
                    part = int(t >= split_column.py_func(k))
                    for q in range(count):
                        v = xv[q * (stride or 0) + t]
                        a = acc[q][part]
                        acc[q][part] = builder.fmul(v, w[r][t]) if a is None else builder.call(fma, [v, w[r][t], a])
            for q in range(count):
                total = acc[q][0] if acc[q][1] is None else builder.fadd(acc[q][0], acc[q][1])
                ptr = at(o0, builder.add(builder.mul(builder.add(j0, i64(q)), cs), c0))
                finish(total, bias, ptr, lanes, hard_swish)

        def pixels(j0, count, stride, edge):
            """``count`` adjacent output pixels from j0 (``stride``: a constant, or None for ``sw``): the
            block at ``c0``, or every block in turn. ``edge``: some of their columns may lie outside
            the image."""
            col0 = builder.sub(builder.mul(j0, sw), pad_left)  # the input column of the first tap
            n_columns = (count - 1) * (stride or 0) + k
            inside = None
            if edge:  # one unsigned compare: 0 <= column < width
                inside = [builder.icmp_unsigned("<", builder.add(col0, i64(c)), width) for c in range(n_columns)]
            if row_block is not None:
                block(c0, lanes, row_block, j0, col0, count, stride, inside)
                return

            def each_block(c, mask):
                block(c, mask, kernel_block(c, mask, n_rows), j0, col0, count, stride, inside)

            for_each_block(each_block)

        # Strides 1 and 2: GROUP pixels per step share their input columns (6 loads a row instead of
        # 12 for four 3x3 windows at stride 1); the rest one pixel at a time. Groups start at pixel
        # 0: those in [a, b) lie wholly inside the image and take the plain loads, in a loop of
        # their own (the border's masks would take registers from the kernel block); the groups
        # before a and from b on are the border ones. Every pixel adds the same taps in the same
        # order either way, so a row with few whole 5x5 groups (MIN_WHOLE_PIXELS: the 7- and
        # 14-wide maps) runs all its groups through the border loop, which was faster there.
        grouped = {}  # pixels [0, grouped) in groups, at strides 1 and 2
        for stride in (1, 2):
            size = GROUP[k, stride]
            g = i64(size)
            grouped[stride] = builder.mul(builder.sdiv(n_out, g), g)
            with builder.if_then(builder.icmp_signed("==", sw, i64(stride))):
                a = builder.mul(builder.sdiv(builder.add(j_lo, i64(size - 1)), g), g)
                a = builder.select(builder.icmp_signed("<", a, grouped[stride]), a, grouped[stride])
                room = builder.sub(j_hi, a)
                room = builder.select(builder.icmp_signed(">", room, i64(0)), room, i64(0))
                b = builder.add(a, builder.mul(builder.sdiv(room, g), g))
                if MIN_WHOLE_PIXELS[k]:  # too few whole groups: all of the row through the border loop
                    few = builder.icmp_signed("<", builder.sub(b, a), i64(MIN_WHOLE_PIXELS[k]))
                    b = builder.select(few, a, b)
                with cgutils.for_range_slice(builder, a, b, g) as (j0, _):
                    pixels(j0, size, stride, False)
                border = builder.sub(grouped[stride], builder.sub(b, a))
                with cgutils.for_range_slice(builder, i64(0), border, g) as (e, _):
                    j0 = builder.select(builder.icmp_signed("<", e, a), e, builder.add(e, builder.sub(b, a)))
                    pixels(j0, size, stride, True)
        start = builder.select(builder.icmp_signed("==", sw, i64(1)), grouped[1],
                               builder.select(builder.icmp_signed("==", sw, i64(2)), grouped[2], i64(0)))
        with cgutils.for_range_slice(builder, start, n_out, i64(1)) as (j, _):
            pixels(j, 1, None, True)

    def for_each_block(body):
        """body(c0, lanes) for each block of VW channels: on AVX-512 one loop, masked (a masked load or
        store costs what a plain one does); else the whole blocks with plain loads, then the last,
        partial one, masked."""
        if vw == 16:
            with cgutils.for_range_slice(builder, i64(0), cs, i64(vw)) as (c0, _):
                body(c0, lanes_below(builder.sub(cs, c0)))
            return
        with cgutils.for_range_slice(builder, i64(0), whole, i64(vw)) as (c0, _):
            body(c0, None)
        with builder.if_then(builder.icmp_signed("<", whole, cs)):
            body(whole, tail_mask)

    # The branches sit outside the pixel loops, each loop body straight-line. One copy per count of
    # kernel rows inside the image, so that the top and bottom output rows run as fast as the others.
    for n_rows in range(1, k + 1):
        with builder.if_then(builder.icmp_signed("==", rows, i64(n_rows))):
            if by_pixel:
                windows(hard_swish, n_rows)
            else:
                for_each_block(lambda c0, lanes, n=n_rows: windows(hard_swish, n, c0, lanes))


def _row_intrinsic(k: int, vw: int, by_pixel: bool, hard_swish: bool):
    """A Numba intrinsic computing one output row, every channel, in blocks of VW: each block over the
    whole row, its kernel loaded once (``by_pixel`` False), or every block of a group of pixels before
    the next group (True; ``by_pixel_order`` says when). The same FMAs either way: the same bits.
    ``hard_swish``: the activation is hard swish (``act`` is not read), else none, ReLU or ReLU6 (one
    clamp, its bounds from ``act``): each kernel holds the one epilogue it runs, half the code to compile.

    row(x, x_rs, cs, kernel, bias, out, n_out, sw, rows, act, pad_left, width, j_lo, j_hi),
    all int64 (addresses, strides in floats): for j < n_out and channels [0, cs),
        out[j*cs + c] = act(bias[c] + sum over r < rows, t < K of
                            x[r*x_rs + (j*sw - pad_left + t)*cs + c] * kernel[(r*K + t)*cs + c])
    where x points at input column 0 of the first kernel row inside the image (kernel at that
    row), and input columns outside [0, width) count as zeros. Pixels [j_lo, j_hi) are those whose
    windows lie wholly inside the image.
    """

    def row(typingctx, x, x_rs, cs, kernel, bias, out, n_out, sw, rows, act, pad_left, width, j_lo, j_hi):
        sig = types.void(*([types.int64] * 14))

        def codegen(context, builder, signature, args):
            _emit_row(builder, args, k, vw, by_pixel, hard_swish)
            return context.get_dummy_value()

        return sig, codegen

    row.__name__ = f"depthwise_row_k{k}_v{vw}{'_by_pixel' if by_pixel else ''}{'_hard_swish' if hard_swish else ''}"
    return intrinsic(row)


# The vector width: 16 channels fill an AVX-512 register; on AVX2 the 9 kernel vectors of 8 floats
# and the accumulators still fit its 16 registers (a rule of the CPU, never a timing). Only this
# CPU's width is built: each width's copies of the loops cost seconds of first-run compile time.
VECTOR_WIDTH = 16 if AVX512 else 8
_row_k3 = _row_intrinsic(3, VECTOR_WIDTH, False, False)
_row_k5 = _row_intrinsic(5, VECTOR_WIDTH, False, False)
_row_k3_by_pixel = _row_intrinsic(3, VECTOR_WIDTH, True, False)
_row_k3_hard_swish = _row_intrinsic(3, VECTOR_WIDTH, False, True)
_row_k5_hard_swish = _row_intrinsic(5, VECTOR_WIDTH, False, True)
_row_k3_by_pixel_hard_swish = _row_intrinsic(3, VECTOR_WIDTH, True, True)

# Pixels per step of the stride-1/2 loops (registers: 9 kernel vectors + 4 accumulators at 3x3).
GROUP = {(3, 1): 4, (3, 2): 4, (5, 1): 3, (5, 2): 2}
# Fewer pixels than this in whole groups (a fixed rule of the row's width): none take the plain-load loop.
MIN_WHOLE_PIXELS = {3: 0, 5: 16}
VECTOR_ACTS = (ACT_NONE, ACT_RELU, ACT_RELU6, ACT_HARD_SWISH)


# The row kernels are compiled once each, as C functions of their own (cfuncs), and called by
# address: every kernel that runs rows -- the depthwise kernels below and kernels/expand_depthwise.py
# -- calls the same machine code instead of compiling its own copy (Numba links a called function's
# IR into each caller and compiles it again there: seconds apiece on every first run). One indirect
# call per output row, every channel block inside it: a call per block cost 10-30% on 7x7 and 14x14
# maps, where a block's row is a few pixels of work. One plain function per kernel, written out: a
# cfunc is cached (and exported by kernels/build.py) under its function's own name and source, which
# functions made by a factory would share.
_ROW_ARGS = 14


def _row_3x3(x, x_rs, cs, kernel, bias, out, n_out, sw, rows, act, pad_left, width, j_lo, j_hi):
    """One output row, every channel (one call per row)."""
    _row_k3(x, x_rs, cs, kernel, bias, out, n_out, sw, rows, act, pad_left, width, j_lo, j_hi)


def _row_5x5(x, x_rs, cs, kernel, bias, out, n_out, sw, rows, act, pad_left, width, j_lo, j_hi):
    """``_row_3x3`` for 5x5 windows."""
    _row_k5(x, x_rs, cs, kernel, bias, out, n_out, sw, rows, act, pad_left, width, j_lo, j_hi)


def _row_3x3_by_pixel(x, x_rs, cs, kernel, bias, out, n_out, sw, rows, act, pad_left, width, j_lo, j_hi):
    """``_row_3x3``, every channel block of a group of pixels before the next group (``by_pixel_order``)."""
    _row_k3_by_pixel(x, x_rs, cs, kernel, bias, out, n_out, sw, rows, act, pad_left, width, j_lo, j_hi)


def _row_3x3_hard_swish(x, x_rs, cs, kernel, bias, out, n_out, sw, rows, act, pad_left, width, j_lo, j_hi):
    """``_row_3x3`` with hard swish after the bias."""
    _row_k3_hard_swish(x, x_rs, cs, kernel, bias, out, n_out, sw, rows, act, pad_left, width, j_lo, j_hi)


def _row_5x5_hard_swish(x, x_rs, cs, kernel, bias, out, n_out, sw, rows, act, pad_left, width, j_lo, j_hi):
    """``_row_5x5`` with hard swish after the bias."""
    _row_k5_hard_swish(x, x_rs, cs, kernel, bias, out, n_out, sw, rows, act, pad_left, width, j_lo, j_hi)


def _row_3x3_by_pixel_hard_swish(x, x_rs, cs, kernel, bias, out, n_out, sw, rows, act, pad_left, width, j_lo, j_hi):
    """``_row_3x3_by_pixel`` with hard swish after the bias."""
    _row_k3_by_pixel_hard_swish(x, x_rs, cs, kernel, bias, out, n_out, sw, rows, act, pad_left, width, j_lo, j_hi)


# (window size, by pixel, hard swish) -> the row kernel (``row_kernel``).
ROW_KERNELS = {(3, False, False): _row_3x3, (3, True, False): _row_3x3_by_pixel, (5, False, False): _row_5x5,
               (3, False, True): _row_3x3_hard_swish, (3, True, True): _row_3x3_by_pixel_hard_swish,
               (5, False, True): _row_5x5_hard_swish}


# The L1 data cache the order rule assumes: 64 sets of 64-byte lines (every x86-64 core of the last
# decade: 32 KB 8-way or 48 KB 12-way), of whose ways a block's input and output rows can count on 6
# (the kernel, the next rows and the replacement policy take the rest). With these the rule picks the
# faster order at 23 of the 29 MobileNet 3x3 layer shapes, the other 6 within 1-7% (AVX-512, one thread).
L1_SETS, L1_WAYS, LINE_FLOATS = 64, 6, 16


def by_pixel_order(k: int, channels: int, in_width: int, out_width: int) -> bool:
    """Whether a row should run every channel block of each group of pixels in turn, rather than each
    block over the whole row (a fixed rule of the layer's shape; both give the same bits).

    Block by block over the row, the loads of one block are ``channels`` floats apart: when that is a
    multiple of a cache line, they fall in L1_SETS / gcd(lines apart, L1_SETS) sets only, and the k
    input rows and the output row of a block (k * in_width + out_width lines) evict one another once
    they outnumber those sets' ways: MobileNet V1's layers (32-1024 channels) ran 10-30% slower.
    Pixel by pixel, the loads walk along each pixel's channels instead, at the cost of loading the
    block's kernel for every group of pixels, which loses where nothing conflicts (V2's and V3's
    144-960 channels). 3x3 windows only: no MobileNet 5x5 layer conflicts.
    """
    if k != 3 or channels % LINE_FLOATS or channels <= VECTOR_WIDTH:  # one block: the same loads either way
        return False
    sets = L1_SETS // math.gcd(channels // LINE_FLOATS, L1_SETS)
    return k * in_width + out_width > L1_WAYS * sets


def row_kernel(k: int, act: int, by_pixel: bool = False) -> int:
    """The address of the compiled row kernel for k x k windows and activation ``act`` (one of
    VECTOR_ACTS), in the order ``by_pixel`` says (``by_pixel_order``; 3x3 only): compiled, or loaded from
    Numba's cache, on first use (a model never compiles one it does not run), or the AOT module's."""
    return int64_cfunc(ROW_KERNELS[k, by_pixel and k == 3, act == ACT_HARD_SWISH], _ROW_ARGS)


@intrinsic
def _call_row(typingctx, address, x, x_rs, cs, kernel, bias, out, n_out, sw, rows, act, pad_left, width, j_lo, j_hi):
    """Calls the row kernel at ``address`` (``row_kernel``) with the row's 14 int64 arguments."""
    sig = types.void(*([types.int64] * (_ROW_ARGS + 1)))

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.VoidType(), [_I64] * _ROW_ARGS)
        builder.call(builder.inttoptr(args[0], fnty.as_pointer()), args[1:])
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always")
def whole_columns(ow, w, k, stride_w, pad_left):
    """Output columns [j_lo, j_hi) whose windows have all their taps inside the image's width."""
    j_lo = min(ow, (pad_left + stride_w - 1) // stride_w)
    return j_lo, max(j_lo, min(ow, (w + pad_left - k) // stride_w + 1))


@njit(inline="always")
def vector_row(row, k, src, src_row0, h, w, cs, k_addr, b_addr, o_row, i, ow, stride_h, stride_w, pad_top, pad_left,
               act, j_lo, j_hi):
    """Output row ``i`` of one image (at address ``o_row``) through the row kernel at address ``row``
    (``row_kernel``). ``src``: the address of the image's input row ``src_row0`` (rows of w*cs
    floats; the image itself, or a band of its rows held elsewhere, kernels/expand_depthwise.py).
    Returns False, computing nothing, when no kernel row of the window lies inside the image."""
    ih0, di_lo, di_hi = _tap_range(i, stride_h, pad_top, k, h)
    rows = di_hi - di_lo
    if rows <= 0:
        return False
    x_row = src + 4 * ((ih0 + di_lo - src_row0) * w * cs)
    k_row = k_addr + 4 * (di_lo * k * cs)
    _call_row(row, x_row, w * cs, cs, k_row, b_addr, o_row, ow, stride_w, rows, act, pad_left, w, j_lo, j_hi)
    return True


@njit(inline="always")
def _vector_rows(row, x, kernel, bias, out, stride_h, stride_w, pad_top, pad_left, act, job_lo, job_hi):
    """Output rows job_lo .. job_hi - 1 (numbered over (image, row)) through ``vector_row`` and the
    row kernel at address ``row`` (``row_kernel``), border pixels included. Only an output row with no
    kernel row inside the image (padding taller than the kernel) takes ``_clipped_taps``: act(bias)."""
    n_images, h, w, cs = x.shape
    k = kernel.shape[0]
    oh, ow = out.shape[1], out.shape[2]
    x_addr = np.int64(x.ctypes.data)
    k_addr = np.int64(kernel.ctypes.data)
    b_addr = np.int64(bias.ctypes.data)
    o_addr = np.int64(out.ctypes.data)
    j_lo, j_hi = whole_columns(ow, w, k, stride_w, pad_left)
    for job in range(job_lo, job_hi):
        n = job // oh
        i = job % oh
        if vector_row(row, k, x_addr + 4 * (n * h * w * cs), 0, h, w, cs, k_addr, b_addr,
                      o_addr + 4 * (job * ow * cs), i, ow, stride_h, stride_w, pad_top, pad_left, act, j_lo, j_hi):
            continue
        ih0 = i * stride_h - pad_top
        second = np.empty(cs, np.float32)
        for j in range(ow):
            iw0, dj_lo, dj_hi = _tap_range(j, stride_w, pad_left, k, w)
            acc = out[n, i, j]
            _clipped_taps(acc, second, x, n, ih0, iw0, kernel, 0, 0, dj_lo, dj_hi, cs)
            bias_act_row(acc, bias, act)


@njit(parallel=True, cache=True)
def _depthwise_vector(row, x, kernel, bias, out, stride_h, stride_w, pad_top, pad_left, act):
    """Depthwise through the vector row kernel at ``row``, on checked shapes: one task per (image, output row)."""
    for job in prange(x.shape[0] * out.shape[1]):
        _vector_rows(row, x, kernel, bias, out, stride_h, stride_w, pad_top, pad_left, act, job, job + 1)


@njit(cache=True)
def _depthwise_vector_serial(row, x, kernel, bias, out, stride_h, stride_w, pad_top, pad_left, act):
    """``_depthwise_vector`` on one thread: all rows in a plain loop."""
    _vector_rows(row, x, kernel, bias, out, stride_h, stride_w, pad_top, pad_left, act, 0, x.shape[0] * out.shape[1])
