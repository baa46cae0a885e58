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
four buffers.

How it runs: four phases. Every value is summed in one fixed order that depends only on the
shapes; the thread count only decides which phases run in prange and where the runs of outputs
handed to each thread are cut, and no sum depends on a cut.
1. pool: an image row is W*C contiguous floats, so the kernel sees x as [N, H, W*C] ("flat rows")
   and sums the H rows elementwise, top to bottom -- long contiguous vector adds even at C = 16 --;
   then each channel's W column sums are added left to right and divided by H*W. (NumPy's mean adds
   in yet another order; both are float32 sums of the same values.)
2. reduce: z = relu(s @ W1 + b1);
3. expand: gate = relu6(z @ W2 + b2 + 3) * (1/6). Both dense layers add their products in input
   order, as ((acc + a0*w0) + a1*w1) + ..., four inputs per pass over the accumulator row (same
   order, a quarter of the loads and stores), every image of the batch while a weight row is in
   cache (the weights are read once per call, not once per image), and products and sums rounded
   separately (no FMA), as before. At MobileNet's sizes these layers are bound by reading their
   weights (0.9 MB each at C = 960), which in a whole model come from memory, so they prefetch.
4. scale: out = x * gate over each flat row, against the gate repeated along a run of pixels (one
   contiguous vector loop even at C = 16).
On one thread all of it is plain loops. With more, a parallel loop costs a start and a join (a
few microseconds; a scheduler time slice when another process holds a core), so there is one, the
scale by rows, unless the dense layers are big (from _PARALLEL_DENSE weights, where reading them
is most of the time) and there is one image: then the reduce layer runs with each thread a run of
its outputs, and expand and scale together with each thread a run of the channels. (Pooling in
parallel too was measured and dropped: no gain at these sizes for a third start and join.)
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np

from .activations import ACT_RELU, bias_act_row
from .backend import intrinsic, njit, prange
from .entry import entry
from .threads import jit_thread_count
from .vector_ir import cgutils, ir, types

_SIXTH = np.float32(1.0 / 6.0)
_POOL_CHUNK = 2048  # floats of a flat row per pool job (8 KB of sums: stays in L1 while the rows stream by)
_PREFETCH_FLOATS = 2048  # how far ahead the dense layers prefetch their weights (8 KB)
_TILE = 256  # floats of the gate repeated along a row: long vector loops at small C, still in L1

# Smallest work (floats read) for which a phase runs in prange when it has more than one thread.
# Each parallel loop is a start and a join: a few microseconds, a scheduler time slice when another
# process holds the second core; so one per call (the scale), two when the dense layers are big.
_PARALLEL_DENSE = 65536
_PARALLEL_SCALE = 16384
_SPLIT_CHANNELS = 256  # channels from which expand + scale are cut by channels, not rows


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


@njit(cache=True)
def _pool_chunk(rows, n, k0, k1, flat):
    """flat[n, k0:k1] = sum over the image's rows of rows[n, i, k0:k1], top to bottom."""
    # Slices indexed from 0 (not k0..k1): Numba then knows no index is negative, and LLVM vectorizes.
    acc = flat[n, k0:k1]
    first = rows[n, 0, k0:k1]
    for k in range(k1 - k0):
        acc[k] = first[k]
    for i in range(1, rows.shape[1]):
        row = rows[n, i, k0:k1]
        for k in range(k1 - k0):
            acc[k] += row[k]


@njit(cache=True)
def _pool_run(rows, n, k0, k1, flat):
    """flat[n, k0:k1] = the column sums of that run of the image's flat rows, _POOL_CHUNK floats at a time."""
    for c0 in range(k0, k1, _POOL_CHUNK):
        _pool_chunk(rows, n, c0, min(k1, c0 + _POOL_CHUNK), flat)


@njit(cache=True)
def _pool_columns(flat, c_count, count, pooled):
    """pooled[n, c] = (sum over columns j, left to right, of flat[n, j*C + c]) / count."""
    w = flat.shape[1] // c_count
    for n in range(flat.shape[0]):
        s = pooled[n]
        acc = flat[n]
        for c in range(c_count):
            s[c] = acc[c]
        for j in range(1, w):
            column = acc[j * c_count:(j + 1) * c_count]
            for c in range(c_count):
                s[c] += column[c]
        for c in range(c_count):
            s[c] = s[c] / count


@intrinsic
def _prefetch(typingctx, array, index):
    """Ask the cache for the line holding array[index] (llvm.prefetch: read, keep in all levels)."""

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        byte_ptr = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [byte_ptr, i32, i32, i32]),
                                            "llvm.prefetch.p0i8")
        address = builder.bitcast(builder.gep(data, [args[1]]), byte_ptr)
        builder.call(fn, [address, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(array, index), codegen


@njit(inline="always")
def _prefetch_row(row):
    """Prefetch every cache line of a 1-D run of floats."""
    for o in range(0, row.shape[0], 16):
        _prefetch(row, o)
    if row.shape[0] > 0:
        _prefetch(row, row.shape[0] - 1)


@njit(cache=True)
def _dense_block(a, kernel, o0, o1, acc):
    """acc[:, o0:o1] = a @ kernel[:, o0:o1], each sum taken over the inputs in order.

    Four inputs per pass over the accumulator row: ((acc + a0*w0) + a1*w1) + ... is the same
    order as one input per pass, each product and sum rounded, with a quarter of the loads and stores.
    The weights are what this layer waits for (read once, often from memory: the model's weights
    do not stay in cache between predictions), so the rows ~8 KB ahead are prefetched: the hardware
    prefetchers stop at each 4 KB page.
    """
    n_images, k_count = a.shape
    width = o1 - o0
    for n in range(n_images):
        row = acc[n, o0:o1]
        for o in range(width):
            row[o] = np.float32(0.0)
    ahead = (_PREFETCH_FLOATS + width - 1) // width  # rows
    k = 0
    while k + 4 <= k_count:
        for kk in range(k + ahead, min(k + ahead + 4, k_count)):
            _prefetch_row(kernel[kk, o0:o1])
        w0, w1, w2, w3 = kernel[k, o0:o1], kernel[k + 1, o0:o1], kernel[k + 2, o0:o1], kernel[k + 3, o0:o1]
        for n in range(n_images):
            a0, a1, a2, a3 = a[n, k], a[n, k + 1], a[n, k + 2], a[n, k + 3]
            row = acc[n, o0:o1]
            for o in range(width):
                row[o] = (((row[o] + a0 * w0[o]) + a1 * w1[o]) + a2 * w2[o]) + a3 * w3[o]
        k += 4
    while k < k_count:
        wk = kernel[k, o0:o1]
        for n in range(n_images):
            ak = a[n, k]
            row = acc[n, o0:o1]
            for o in range(width):
                row[o] = row[o] + ak * wk[o]
        k += 1


@njit(cache=True)
def _reduce_block(pooled, reduce_kernel, reduce_bias, o0, o1, reduced):
    """reduced[:, o0:o1] = relu(pooled @ W1 + b1) on those outputs."""
    _dense_block(pooled, reduce_kernel, o0, o1, reduced)
    for n in range(reduced.shape[0]):
        bias_act_row(reduced[n, o0:o1], reduce_bias[o0:o1], ACT_RELU)


@njit(cache=True)
def _expand_block(reduced, expand_kernel, expand_bias, o0, o1, gate):
    """gate[:, o0:o1] = relu6(reduced @ W2 + b2 + 3) * (1/6) on those outputs."""
    _dense_block(reduced, expand_kernel, o0, o1, gate)
    bias = expand_bias[o0:o1]
    for n in range(gate.shape[0]):
        g = gate[n, o0:o1]
        for o in range(o1 - o0):
            v = g[o] + bias[o]
            g[o] = min(max(v + np.float32(3.0), np.float32(0.0)), np.float32(6.0)) * _SIXTH


@njit(cache=True)
def _repeat_gate(gate, tile):
    """tile[n, j*C + c] = gate[n, c]: the gate laid out like a run of tile.shape[1] // C pixels."""
    c_count = gate.shape[1]
    for n in range(gate.shape[0]):
        g = gate[n]
        for j in range(tile.shape[1] // c_count):
            pixel = tile[n, j * c_count:(j + 1) * c_count]
            for c in range(c_count):
                pixel[c] = g[c]


@njit(inline="always")  # a call per row costs as much as a short row's work
def _scale_row(rows, tile, n, i, out_rows):
    """out_rows[n, i] = rows[n, i] * the gate, a tile's run of pixels at a time."""
    xr = rows[n, i]
    orow = out_rows[n, i]
    g = tile[n]
    run = g.shape[0]
    for k0 in range(0, xr.shape[0], run):
        k1 = min(k0 + run, xr.shape[0])
        xs = xr[k0:k1]
        os = orow[k0:k1]
        for k in range(k1 - k0):
            os[k] = xs[k] * g[k]


@njit(cache=True)
def _scale_channels(rows, gate, c0, c1, c_count, out_rows):
    """out[..., c0:c1] = x[..., c0:c1] * gate[:, c0:c1] for every pixel (x and out as flat rows)."""
    n_images, h, row_len = rows.shape
    for n in range(n_images):
        g = gate[n, c0:c1]
        for i in range(h):
            xr = rows[n, i]
            orow = out_rows[n, i]
            for base in range(0, row_len, c_count):
                xs = xr[base + c0:base + c1]
                os = orow[base + c0:base + c1]
                for c in range(c1 - c0):
                    os[c] = xs[c] * g[c]


@njit(inline="always")
def _part(width, parts, b):
    """Outputs [o0, o1) of part b when ``width`` outputs are cut into ``parts`` runs of whole vectors."""
    block = ((width + 15) // 16 + parts - 1) // parts * 16
    o0 = min(width, b * block)
    return o0, min(width, o0 + block)


@njit(parallel=True, cache=True)
def _squeeze_excite(x, reduce_kernel, reduce_bias, expand_kernel, expand_bias, out):
    """squeeze_excite's phases, on shapes already checked."""
    n_images, h, w, c_count = x.shape
    cr = reduce_kernel.shape[1]
    row_len = w * c_count
    rows = x.reshape(n_images, h, row_len)  # views: both are C-contiguous
    out_rows = out.reshape(n_images, h, row_len)
    flat = np.empty((n_images, row_len), np.float32)  # the pool's column sums
    pooled = np.empty((n_images, c_count), np.float32)
    reduced = np.empty((n_images, cr), np.float32)
    gate = np.empty((n_images, c_count), np.float32)
    parts = jit_thread_count()
    size = n_images * h * row_len
    weights = c_count * cr

    # 1. pool
    for n in range(n_images):
        _pool_run(rows, n, 0, row_len, flat)
    _pool_columns(flat, c_count, np.float32(w * h), pooled)

    # 2. reduce (each thread a run of the outputs: no answer depends on where the runs are cut)
    # (one image only: with a batch the weights are read once for all of it, and cutting expand + scale
    # by channels measured slower than the one parallel scale)
    parallel_dense = parts > 1 and weights >= _PARALLEL_DENSE and n_images == 1
    if parallel_dense:
        for b in prange(parts):
            o0, o1 = _part(cr, parts, b)
            _reduce_block(pooled, reduce_kernel, reduce_bias, o0, o1, reduced)
    else:
        _reduce_block(pooled, reduce_kernel, reduce_bias, 0, cr, reduced)

    # 3. expand and 4. scale: with many channels, each thread its run of the channels for both
    if parallel_dense and c_count >= _SPLIT_CHANNELS:
        for b in prange(parts):
            c0, c1 = _part(c_count, parts, b)
            _expand_block(reduced, expand_kernel, expand_bias, c0, c1, gate)
            _scale_channels(rows, gate, c0, c1, c_count, out_rows)
        return
    _expand_block(reduced, expand_kernel, expand_bias, 0, c_count, gate)
    tile = np.empty((n_images, max(1, _TILE // c_count) * c_count), np.float32)  # the gate, repeated
    _repeat_gate(gate, tile)
    if parts > 1 and size >= _PARALLEL_SCALE:
        for job in prange(n_images * h):
            _scale_row(rows, tile, job // h, job % h, out_rows)
    else:
        for job in range(n_images * h):
            _scale_row(rows, tile, job // h, job % h, out_rows)


# What a model's first run through this operator compiles (kernels/first_run.py ``kernels_cached``):
# the fused squeeze-and-excite kernel.
FIRST_RUN_KERNELS = (_squeeze_excite,)
