"""A register-tiled GEMM microkernel for 1x1 convolutions and dense layers, written as LLVM vector IR.

    packed = pack(w, bias, rows)                          # once, when the plan is made
    gemm_packed(a, packed, out, act, residual)            # every call (or .bind: see kernels/entry.py)

a [M, K], out and residual [M, N]: float32, C-contiguous. out = act(a @ w + bias) (+ residual), the
contract of kernels/pointwise.py; kernels/reference.py ``dense`` is the twin it is tested against.

    igemm_packed(x, table, packed, out, act)              # the indirect GEMM of a 3-channel conv

The same tile with another way of reading A (``_igemm_sums``): row p of A is output pixel p's
receptive field, read in place from the image through an indirection table (kernels/conv.py
``indirection_table``; twin: kernels/reference.py ``indirect_conv2d``) instead of an im2col copy.

Why LLVM IR: a GEMM is fast when a tile of the output (MR rows x NR columns) stays in registers for
the whole loop over K, each loaded weight vector feeding MR multiply-adds and each broadcast input
value NR of them. Numba compiles array code, and LLVM will not keep an accumulator tile that lives
in an array in registers (a scalar-unrolled 6x16 tile did not even vectorize). It does keep SSA
values of vector type in registers, so the tile is emitted directly through
``numba.extending.intrinsic`` and llvmlite's IR builder: MR x (NR / VW) accumulators of type
``<VW x float>`` as phi nodes of one loop over K, the input value broadcast with a shufflevector,
``llvm.fma`` on whole vectors, then bias, activation and residual applied before the store (on the
registers themselves for the common tile).

The types are generic LLVM vectors: every variant compiles and gives the same answers on any
x86-64 (LLVM splits a <16 x float> into two AVX2 registers); the CPU's features decide which
variants are fast (``choose_variant``), and the drivers are compiled with those only
(``COMPILED_VARIANTS``: the others would add seconds to every first run for code that never runs).

Weights are packed once into column panels: panel p holds columns [p*NR, p*NR + NR) of w as K rows
of NR contiguous floats, zero-padded past N, so the microkernel streams one panel front to back.

Determinism: every output value is one FMA chain over k = 0..K-1 starting from zero, then + bias,
then the activation, then + residual, whatever tile, thread or batch position it falls in. Edge
tiles run the very same instructions (rows past M re-read the last row and are not stored; columns
past N are computed from the zero padding and masked out of the stores), so how the product is cut
never changes an answer.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np

from .activations import ACT_HARD_SWISH, ACT_NONE, ACT_RELU, ACT_RELU6, apply_activation
from .backend import AOT, intrinsic, njit, prange, target_has_avx512
from .entry import entry, no_work

if not AOT:  # the LLVM IR below is emitted only when Numba compiles a kernel (kernels/backend.py)
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils

_FLOAT32 = np.dtype(np.float32)
if not AOT:
    _F32 = ir.FloatType()
    _I64 = ir.IntType(64)
    _PTR = ir.PointerType()


def _emit_loop(builder: ir.IRBuilder, count, acc: list, body, name: str) -> list:
    """A loop of ``count`` iterations carrying the accumulator tile ``acc`` as phi nodes.

    body(index, acc) emits one iteration and returns the new tile (it may emit a loop of its own).
    Returns the tile after the loop: ``acc`` itself when ``count`` <= 0.
    """
    entry = builder.block
    loop = builder.append_basic_block(name)
    done = builder.append_basic_block(name + ".done")
    builder.cbranch(builder.icmp_signed(">", count, ir.Constant(_I64, 0)), loop, done)
    builder.position_at_end(loop)
    index = builder.phi(_I64)
    index.add_incoming(ir.Constant(_I64, 0), entry)
    phis = [[builder.phi(v.type) for v in row] for row in acc]
    for row, start in zip(phis, acc):
        for phi, v in zip(row, start):
            phi.add_incoming(v, entry)
    new = body(index, phis)
    following = builder.add(index, ir.Constant(_I64, 1))
    body_end = builder.block
    index.add_incoming(following, body_end)
    for row, values in zip(phis, new):
        for phi, v in zip(row, values):
            phi.add_incoming(v, body_end)
    builder.cbranch(builder.icmp_signed("<", following, count), loop, done)
    builder.position_at_end(done)
    after = []
    for start, values in zip(acc, new):
        after.append([])
        for s, v in zip(start, values):
            phi = builder.phi(v.type)
            phi.add_incoming(s, entry)
            phi.add_incoming(v, body_end)
            after[-1].append(phi)
    return after


def _gemm_sums(builder: ir.IRBuilder, a_args, rows, weights, fma_row, zeros: list) -> list:
    """The tile's sums over k, A read as rows of a matrix: a[i, k] at a + i*lda + k."""
    a_addr, lda, k = a_args
    a = builder.inttoptr(a_addr, _PTR)
    last = builder.sub(rows, ir.Constant(_I64, 1))
    # Rows past ``rows`` re-read the last row: the same instructions run, the values are not stored.
    a_rows = []
    for i in range(len(zeros)):
        row = builder.select(builder.icmp_signed("<", ir.Constant(_I64, i), rows), ir.Constant(_I64, i), last)
        a_rows.append(builder.gep(a, [builder.mul(row, lda)], source_etype=_F32))

    def step(kk, acc):
        wv = weights(kk)
        return [fma_row(acc_row, builder.gep(a_row, [kk], source_etype=_F32), wv)
                for acc_row, a_row in zip(acc, a_rows)]

    return _emit_loop(builder, k, zeros, step, "tile.k")


def _igemm_sums(builder: ir.IRBuilder, a_args, rows, weights, fma_row, zeros: list, cin: int) -> list:
    """The tile's sums over k = tap*cin + c, A read through an indirection table (the indirect GEMM).

    Row i of A is output pixel i's receptive field, never copied out: the tile's table [taps, MR]
    holds, for each kernel tap and row, the offset in x of the input pixel that tap sees (its
    ``cin`` channels are contiguous), or -1 when the tap falls in the padding and reads the ``cin``
    zeros at ``zero``. (Rows past the pixels read -1: computed like the others, not stored.)

    ``cin`` is fixed when the code is made, so that each row's ``cin`` values are read right after
    its table entry: a tile of 28 rows has no room to keep 28 addresses in registers over a loop.
    """
    x_addr, table_addr, taps, zero_addr = a_args
    x = builder.inttoptr(x_addr, _PTR)
    zero = builder.inttoptr(zero_addr, _PTR)
    table = builder.inttoptr(table_addr, _PTR)
    i32 = ir.IntType(32)
    mr = len(zeros)

    def tap(t, acc):
        first_k = builder.mul(t, ir.Constant(_I64, cin))
        wvs = [weights(builder.add(first_k, ir.Constant(_I64, c))) for c in range(cin)]
        # The tile's MR entries for tap t are contiguous: one address, the rows at fixed displacements.
        entries = builder.gep(table, [builder.mul(t, ir.Constant(_I64, mr))], source_etype=i32)
        new = []
        for i, acc_row in enumerate(acc):
            entry = builder.gep(entries, [ir.Constant(_I64, i)], source_etype=i32)
            offset = builder.sext(builder.load(entry, typ=i32, align=4), _I64)
            inside = builder.icmp_signed(">=", offset, ir.Constant(_I64, 0))
            pixel = builder.select(inside, builder.gep(x, [offset], source_etype=_F32), zero)
            for c in range(cin):
                acc_row = fma_row(acc_row, builder.gep(pixel, [ir.Constant(_I64, c)], source_etype=_F32), wvs[c])
            new.append(acc_row)
        return new

    return _emit_loop(builder, taps, zeros, tap, "tile.tap")


def _emit_tile(builder: ir.IRBuilder, a_sums, a_args, args, mr: int, nr: int, vw: int, prefetch=None) -> None:
    """The IR of one MR x NR tile: see the module docstring. ``a_sums`` emits the loop over K, reading
    A as ``a_args`` locate it (``_gemm_sums`` or ``_igemm_sums``); ``args`` are the intrinsic's other
    int64 values. ``prefetch``: an address; step k of the loop also asks for the cache line at
    prefetch + k * NR floats to be brought into L2 (``rows_times_panels`` says which)."""
    rows, w_addr, bias_addr, c_addr, ldc, act, r_addr, ldr, cols = args
    vec = ir.VectorType(_F32, vw)
    nv = nr // vw
    module = builder.module
    fma = cgutils.get_or_insert_function(module, ir.FunctionType(vec, [vec, vec, vec]), f"llvm.fma.v{vw}f32")
    w = builder.inttoptr(w_addr, _PTR)
    mask = ir.Constant(ir.VectorType(ir.IntType(32), vw), [0] * vw)
    zero = ir.Constant(vec, [0.0] * vw)

    if prefetch is not None:
        prefetch_line = cgutils.get_or_insert_function(
            module, ir.FunctionType(ir.VoidType(), [_PTR, ir.IntType(32), ir.IntType(32), ir.IntType(32)]),
            "llvm.prefetch.p0")
        ahead = builder.inttoptr(prefetch, _PTR)

    def weights(kk):
        """Row k of the panel: NR / VW vectors."""
        w_row = builder.gep(w, [builder.mul(kk, ir.Constant(_I64, nr))], source_etype=_F32)
        if prefetch is not None:  # a read (0), kept in L2 (locality 2), of data (1)
            line = builder.gep(ahead, [builder.mul(kk, ir.Constant(_I64, nr))], source_etype=_F32)
            builder.call(prefetch_line, [line] + [ir.Constant(ir.IntType(32), v) for v in (0, 2, 1)])
        return [builder.load(builder.gep(w_row, [ir.Constant(_I64, j * vw)], source_etype=_F32), typ=vec, align=4)
                for j in range(nv)]

    def fma_row(acc_row, a_ptr, wv):
        """acc_row + a[i, k] * (row k of the panel): the A value broadcast, one FMA per vector."""
        x = builder.load(a_ptr, typ=_F32, align=4)
        xv = builder.shuffle_vector(builder.insert_element(ir.Constant(vec, ir.Undefined), x, ir.Constant(_I64, 0)),
                                    ir.Constant(vec, ir.Undefined), mask)
        return [builder.call(fma, [xv, wv[j], acc_row[j]]) for j in range(nv)]

    sums = a_sums(builder, a_args, rows, weights, fma_row, [[zero] * nv for _ in range(mr)])

    bias = builder.inttoptr(bias_addr, _PTR)
    bv = [builder.load(builder.gep(bias, [ir.Constant(_I64, j * vw)], source_etype=_F32), typ=vec, align=4)
          for j in range(nv)]
    values = [[builder.fadd(sums[i][j], bv[j]) for j in range(nv)] for i in range(mr)]
    c = builder.inttoptr(c_addr, _PTR)
    r = builder.inttoptr(r_addr, _PTR)
    zero_v, three, six = (ir.Constant(vec, [v] * vw) for v in (0.0, 3.0, 6.0))

    def clamp(v, low, high):  # NaN stays NaN (both comparisons are false), as np.maximum/minimum keep it
        v = builder.select(builder.fcmp_ordered("<", v, low), low, v)
        return builder.select(builder.fcmp_ordered(">", v, high), high, v)

    # None, ReLU and ReLU6 are one clamp with bounds chosen by ``act`` (-inf and inf leave v as it is),
    # so they share one epilogue; hard swish has its own.
    inf = ir.Constant(vec, [float("inf")] * vw)
    is_relu = builder.or_(builder.icmp_signed("==", act, ir.Constant(_I64, ACT_RELU)),
                          builder.icmp_signed("==", act, ir.Constant(_I64, ACT_RELU6)))
    low = builder.select(is_relu, zero_v, builder.fneg(inf))
    high = builder.select(builder.icmp_signed("==", act, ir.Constant(_I64, ACT_RELU6)), six, inf)

    def hard_swish(v):  # x * (relu6(x + 3) / 6): a division, as Keras writes it
        return builder.fmul(v, builder.fdiv(clamp(builder.fadd(v, three), zero_v, six), six))

    # Columns past ``cols`` (the zero padding of the last panel) are computed like the others but
    # neither read from the residual nor stored: masked loads and stores.
    masks = []
    splat_cols = builder.shuffle_vector(
        builder.insert_element(ir.Constant(ir.VectorType(_I64, vw), ir.Undefined), cols, ir.Constant(_I64, 0)),
        ir.Constant(ir.VectorType(_I64, vw), ir.Undefined), mask)
    for j in range(nv):
        lanes = ir.Constant(ir.VectorType(_I64, vw), list(range(j * vw, (j + 1) * vw)))
        masks.append(builder.icmp_signed("<", lanes, splat_cols))
    mask_type = ir.VectorType(ir.IntType(1), vw)
    align = ir.Constant(ir.IntType(32), 4)
    masked_store = cgutils.get_or_insert_function(
        module, ir.FunctionType(ir.VoidType(), [vec, _PTR, ir.IntType(32), mask_type]),
        f"llvm.masked.store.v{vw}f32.p0")
    masked_load = cgutils.get_or_insert_function(
        module, ir.FunctionType(vec, [_PTR, ir.IntType(32), mask_type, vec]), f"llvm.masked.load.v{vw}f32.p0")

    def store_rows(fn, residual, masked):
        """Rows [0, rows) of the tile, through ``fn`` (+ the residual), into c: one loop over the rows."""
        before = builder.block
        row_loop = builder.append_basic_block("tile.rows")
        rows_done = builder.append_basic_block("tile.rows.done")
        builder.branch(row_loop)
        builder.position_at_end(row_loop)
        i = builder.phi(_I64)
        i.add_incoming(ir.Constant(_I64, 0), before)
        c_row = builder.gep(c, [builder.mul(i, ldc)], source_etype=_F32)
        r_row = builder.gep(r, [builder.mul(i, ldr)], source_etype=_F32)
        first = builder.mul(i, ir.Constant(_I64, nv))
        for j in range(nv):
            slot = builder.gep(tile, [builder.add(first, ir.Constant(_I64, j))], source_etype=vec)
            v = fn(builder.load(slot, typ=vec, align=4))
            off = [ir.Constant(_I64, j * vw)]
            if residual:
                r_ptr = builder.gep(r_row, off, source_etype=_F32)
                v = builder.fadd(v, builder.call(masked_load, [r_ptr, align, masks[j], zero]) if masked
                                 else builder.load(r_ptr, typ=vec, align=4))
            c_ptr = builder.gep(c_row, off, source_etype=_F32)
            if masked:
                builder.call(masked_store, [v, c_ptr, align, masks[j]])
            else:
                builder.store(v, c_ptr, align=4)
        next_i = builder.add(i, ir.Constant(_I64, 1))
        i.add_incoming(next_i, builder.block)
        builder.cbranch(builder.icmp_signed("<", next_i, rows), row_loop, rows_done)
        builder.position_at_end(rows_done)

    def store_all(fn):
        with builder.if_else(builder.icmp_signed("!=", r_addr, ir.Constant(_I64, 0))) as (with_res, without):
            for residual in (True, False):
                with (with_res if residual else without):
                    if vw == 16:  # AVX-512 variants: a masked store costs what a plain one does
                        store_rows(fn, residual, True)
                        continue
                    full = builder.icmp_signed(">=", cols, ir.Constant(_I64, nr))
                    with builder.if_else(full) as (whole, part):
                        with whole:
                            store_rows(fn, residual, False)
                        with part:
                            store_rows(fn, residual, True)

    # The common tile (all MR rows and NR columns, no residual, an activation the registers take) is
    # stored straight from the registers. Every other goes through a stack array, so that its
    # epilogue is one loop over the rows rather than MR unrolled copies in each of its eight
    # branches (a fraction of the compile time; the reads back come from L1). Both paths apply the
    # same operations.
    common = builder.and_(builder.and_(builder.icmp_signed("==", rows, ir.Constant(_I64, mr)),
                                       builder.icmp_signed(">=", cols, ir.Constant(_I64, nr))),
                          builder.icmp_signed("==", r_addr, ir.Constant(_I64, 0)))
    with builder.if_else(common) as (direct, through_stack):
        with direct:
            with builder.if_else(builder.icmp_signed("==", act, ir.Constant(_I64, ACT_HARD_SWISH))) as (swish, clamped):
                for fn, branch in ((hard_swish, swish), (lambda v: clamp(v, low, high), clamped)):
                    with branch:
                        for i in range(mr):
                            c_row = builder.gep(c, [builder.mul(ir.Constant(_I64, i), ldc)], source_etype=_F32)
                            for j in range(nv):
                                builder.store(fn(values[i][j]),
                                              builder.gep(c_row, [ir.Constant(_I64, j * vw)], source_etype=_F32),
                                              align=4)
        with through_stack:
            tile = cgutils.alloca_once(builder, vec, size=mr * nv)
            for i in range(mr):
                for j in range(nv):
                    builder.store(values[i][j], builder.gep(tile, [ir.Constant(_I64, i * nv + j)], source_etype=vec),
                                  align=4)
            with builder.if_else(builder.icmp_signed("==", act, ir.Constant(_I64, ACT_HARD_SWISH))) as (swish, clamped):
                with swish:
                    store_all(hard_swish)
                with clamped:
                    store_all(lambda v: clamp(v, low, high))


def _tile_intrinsic(mr: int, nr: int, vw: int):
    """A Numba intrinsic computing one MR x NR tile (arguments: addresses and strides in floats, as int64).

    tile(a, lda, rows, w_panel, k, bias, c, ldc, act, residual, ldr, cols, prefetch): rows [0, rows) and
    columns [0, cols) of the tile at ``c`` = act(a[rows, :k] @ w_panel[:k, :NR] + bias[:NR]) (+ residual
    when its address is not 0); ``prefetch`` as ``_emit_tile`` says.
    """

    def tile(typingctx, a, lda, rows, w, k, bias, c, ldc, act, residual, ldr, cols, prefetch):
        sig = types.void(*([types.int64] * 13))

        def codegen(context, builder, signature, args):
            a, lda, rows, w, k, *epilogue, prefetch = args
            _emit_tile(builder, _gemm_sums, (a, lda, k), (rows, w, *epilogue), mr, nr, vw, prefetch)
            return context.get_dummy_value()

        return sig, codegen

    tile.__name__ = f"tile_{mr}x{nr}_v{vw}"
    return intrinsic(tile)


def _indirect_tile_intrinsic(mr: int, nr: int, vw: int, cin: int):
    """The same tile with A read through an indirection table (``_igemm_sums``), K = taps * ``cin``.

    tile(x, table, taps, zero, rows, w_panel, bias, c, ldc, act, residual, ldr, cols).
    """

    def indirect_tile(typingctx, x, table, taps, zero, rows, w, bias, c, ldc, act, residual, ldr, cols):
        sig = types.void(*([types.int64] * 13))

        def codegen(context, builder, signature, args):
            x, table, taps, zero, *rest = args

            def sums(*a):
                return _igemm_sums(*a, cin=cin)

            _emit_tile(builder, sums, (x, table, taps, zero), rest, mr, nr, vw)
            return context.get_dummy_value()

        return sig, codegen

    indirect_tile.__name__ = f"indirect_tile_{mr}x{nr}_v{vw}_c{cin}"
    return intrinsic(indirect_tile)


# Whether the code may use AVX-512: the JIT's target CPU, or what the AOT module was built for.
AVX512 = target_has_avx512()


# (MR, NR, VW) per variant, the index being what ``pack`` records and the driver dispatches on.
# 6x16 of <8 x float>: twelve accumulators of AVX2's sixteen registers. 8x32 and 28x16 of
# <16 x float>: 16 and 28 of AVX-512's 32; 28x16 for outputs whose width is closer to a multiple of
# 16 than of 32 (16, 40, 80, 112, 144 channels). 1x128: a matrix-vector product (a dense layer on
# one image), where the rows of a taller tile would be computed and thrown away. 7x32: products of
# 49 or 196 rows (7x7 and 14x14 maps, one image), which 8-row tiles would pad by 14% and 2%.
VARIANTS = ((6, 16, 8), (8, 32, 16), (28, 16, 16), (1, 128, 16), (7, 32, 16))
MR = tuple(v[0] for v in VARIANTS)
_tile0 = _tile_intrinsic(*VARIANTS[0])
_tile1 = _tile_intrinsic(*VARIANTS[1])
_tile2 = _tile_intrinsic(*VARIANTS[2])
_tile3 = _tile_intrinsic(*VARIANTS[3])
_tile4 = _tile_intrinsic(*VARIANTS[4])
# The indirect GEMM's tiles, for convolutions on INDIRECT_CIN input channels: the stems of image
# models (RGB). Other convolutions take im2col and the tiles above (kernels/conv.py). Only the tiles
# a stem's product is given (INDIRECT_VARIANTS, below: AVX2's, or AVX-512's two for many pixels),
# since each costs compile time on every first run: not the 1x128 matrix-vector tile nor the 7-row
# one (1x1 layers of 7x7 and 14x14 maps); a stem packed for those is packed again for 8x32.
INDIRECT_CIN = 3
_indirect_tile0 = _indirect_tile_intrinsic(*VARIANTS[0], INDIRECT_CIN)
_indirect_tile1 = _indirect_tile_intrinsic(*VARIANTS[1], INDIRECT_CIN)
_indirect_tile2 = _indirect_tile_intrinsic(*VARIANTS[2], INDIRECT_CIN)


# The drivers are compiled with the tiles ``choose_variant`` picks on the target CPU only: AVX-512's
# four, or AVX2's one. The target is part of Numba's cache key, so a cache never mixes the two; the
# tests of the other CPU's tiles run in a process compiled for it (tests/test_gemm.py).
if AVX512:
    COMPILED_VARIANTS = (1, 2, 3, 4)
    INDIRECT_VARIANTS = (1, 2)

    @njit(inline="always")
    def _tile(variant, a, lda, rows, w, k, bias, c, ldc, act, res, ldr, cols, ahead):
        if variant == 1:
            _tile1(a, lda, rows, w, k, bias, c, ldc, act, res, ldr, cols, ahead)
        elif variant == 2:
            _tile2(a, lda, rows, w, k, bias, c, ldc, act, res, ldr, cols, ahead)
        elif variant == 3:
            _tile3(a, lda, rows, w, k, bias, c, ldc, act, res, ldr, cols, ahead)
        else:
            _tile4(a, lda, rows, w, k, bias, c, ldc, act, res, ldr, cols, ahead)

    @njit(inline="always")
    def _indirect_tile(variant, x, table, taps, zero, rows, w, bias, c, ldc, act, res, ldr, cols):
        if variant == 1:
            _indirect_tile1(x, table, taps, zero, rows, w, bias, c, ldc, act, res, ldr, cols)
        else:
            _indirect_tile2(x, table, taps, zero, rows, w, bias, c, ldc, act, res, ldr, cols)

else:
    COMPILED_VARIANTS = (0,)
    INDIRECT_VARIANTS = (0,)

    @njit(inline="always")
    def _tile(variant, a, lda, rows, w, k, bias, c, ldc, act, res, ldr, cols, ahead):
        _tile0(a, lda, rows, w, k, bias, c, ldc, act, res, ldr, cols, ahead)

    @njit(inline="always")
    def _indirect_tile(variant, x, table, taps, zero, rows, w, bias, c, ldc, act, res, ldr, cols):
        _indirect_tile0(x, table, taps, zero, rows, w, bias, c, ldc, act, res, ldr, cols)


@njit(inline="always")
def _cdiv(x, y):
    return (x + y - 1) // y


@njit(inline="always")
def on_registers(act):
    """Whether the tile applies ``act`` on its registers before the store (else after, from a scratch tile)."""
    return act == ACT_NONE or act == ACT_RELU or act == ACT_RELU6 or act == ACT_HARD_SWISH


@njit(inline="always")
def rows_times_panels(a, panels, bias, out, act, residual, variant, r0, r1, p0, p1, scratch):
    """Rows [r0, r1) of out = act(a @ w + bias) (+ residual), for panels [p0, p1) of w, MR rows at a time.

    ``residual``: shaped like ``out``, or empty for none (one compiled kernel serves both).

    ``scratch`` [MR, NR] takes the tiles whose activation is applied here rather than on the
    registers (the sigmoid family).
    """
    k = a.shape[1]
    n = out.shape[1]
    nr = panels.shape[2]
    mr = MR[variant]
    in_registers = on_registers(act)
    register_act = act if in_registers else ACT_NONE
    a_addr = np.int64(a.ctypes.data)
    w_addr = np.int64(panels.ctypes.data)
    b_addr = np.int64(bias.ctypes.data)
    c_addr = np.int64(out.ctypes.data)
    s_addr = np.int64(scratch.ctypes.data)
    has_residual = residual.size > 0
    r_addr = np.int64(residual.ctypes.data) if has_residual else np.int64(0)
    n_panels = panels.shape[0]
    lines = max(1, nr // 16)  # cache lines in one row of a panel
    for p in range(p0, p1):
        c0 = p * nr
        cols = min(nr, n - c0)
        w_p = w_addr + 4 * p * k * nr
        for i in range(r0, r1, mr):
            rows = min(mr, r1 - i)
            # While the rows of this panel are worked, the next panel comes from memory: each row
            # tile asks for one cache line of every row of it, in turn. (Past this task's panels: the
            # thread's next task starts there when the cut is by panels; the last panel: its own lines.)
            ahead = w_p + 4 * k * nr * (p + 1 < n_panels) + 64 * (((i - r0) // mr) % lines)
            # One call site (each inlines every variant): into out, or into scratch for the copy below.
            dest, ld, res = s_addr, nr, np.int64(0)
            if in_registers:
                dest, ld = c_addr + 4 * (i * n + c0), n
                if r_addr != 0:
                    res = r_addr + 4 * (i * n + c0)
            _tile(variant, a_addr + 4 * i * k, k, rows, w_p, k, b_addr + 4 * c0, dest, ld, register_act, res, ld,
                  cols if in_registers else nr, ahead)
            if not in_registers:
                _activate_into(scratch, out, act, residual, has_residual, i, rows, c0, cols)


@njit(inline="always")
def register_tiles(a_addr, k, w_addr, nr, b_addr, c_addr, n, act, r_addr, variant, r0, r1, p0, p1):
    """Rows [r0, r1) of C = act(A @ w + bias) (+ R), panels [p0, p1), for an activation applied on the
    registers (``on_registers``), on raw addresses: A rows of k floats, C and R rows of n floats (R at
    0: none), w packed in panels of nr columns. A constant ``variant`` compiles that tile alone.

    ``rows_times_panels`` keeps its own loop rather than calling this one for its on-register case: a
    second call site of ``_tile`` in gemm_panels compiles every tile twice (3.6 -> 4.9 s first compile)."""
    mr = MR[variant]
    for p in range(p0, p1):
        c0 = p * nr
        cols = min(nr, n - c0)
        w_p = w_addr + 4 * p * k * nr
        for i in range(r0, r1, mr):
            res = r_addr + 4 * (i * n + c0) if r_addr != 0 else np.int64(0)
            _tile(variant, a_addr + 4 * i * k, k, min(mr, r1 - i), w_p, k, b_addr + 4 * c0, c_addr + 4 * (i * n + c0),
                  n, act, res, n, cols, w_p)


@njit(inline="always")
def _activate_into(scratch, out, act, residual, has_residual, r0, rows, c0, cols):
    """out[r0 + r, c0 + c] = act(scratch[r, c]) (+ residual) for a tile whose activation is not on the registers."""
    for rr in range(rows):
        for cc in range(cols):
            v = apply_activation(scratch[rr, cc], act)
            if has_residual:
                v = v + residual[r0 + rr, c0 + cc]
            out[r0 + rr, c0 + cc] = v


NO_RESIDUAL = np.zeros((0, 0), np.float32)


@njit(inline="always")
def _scratch(act, tasks, mr, nr):
    """[tasks, MR, NR] for the tiles whose activation is applied after the store (one per task, made
    before the parallel loop: an allocation inside it costs microseconds), or [1, 1, 1] when every
    activation is applied on the registers."""
    if on_registers(act):
        return np.empty((1, 1, 1), np.float32)
    return np.empty((tasks, mr, nr), np.float32)


@njit(parallel=True, cache=True)
def gemm_panels(a, panels, bias, out, act, residual, variant, tile_rows, panels_per_tile):
    """out = act(a @ w + bias) (+ residual), w and bias packed by ``pack`` (``panels``, ``bias``).

    ``residual``: shaped like ``out``, or ``NO_RESIDUAL``.

    The product is cut into tiles of ``tile_rows`` rows x ``panels_per_tile`` panels, spread over
    Numba's threads; within a tile, panel by panel (it stays in cache), MR rows at a time.
    """
    if variant not in COMPILED_VARIANTS:  # another tile would run in its place
        raise ValueError("gemm_panels: this tile is not compiled for this CPU")
    m = a.shape[0]
    n_panels = panels.shape[0]
    row_tiles = _cdiv(m, tile_rows)
    col_tiles = _cdiv(n_panels, panels_per_tile)
    scratch = _scratch(act, row_tiles * col_tiles, MR[variant], panels.shape[2])
    for t in prange(row_tiles * col_tiles):
        r0 = (t // col_tiles) * tile_rows
        p0 = (t % col_tiles) * panels_per_tile
        rows_times_panels(a, panels, bias, out, act, residual, variant, r0, min(m, r0 + tile_rows),
                          p0, min(n_panels, p0 + panels_per_tile), scratch[t % scratch.shape[0]])


@njit(parallel=True, cache=True)
def igemm_panels(x, table, zero, panels, bias, out, act, variant, tile_rows, panels_per_tile):
    """out = act(A @ w + bias) where row p of A is read through ``table``: a convolution, without im2col.

    x [N, H*W*Cin]: each image's pixels, flat. table [ceil(P/MR), taps, MR] int32: for output pixel
    p = tile*MR + i and kernel tap t, the offset in an image of the Cin values that tap sees, or -1
    for the padding (read from ``zero``, Cin zeros). w [taps*Cin, Cout] and bias packed by ``pack``;
    out [N*P, Cout]. ``tile_rows`` is a multiple of MR.

    Each image is cut alike into tiles of ``tile_rows`` pixels x ``panels_per_tile`` panels, spread
    over Numba's threads; within a tile, panel by panel, MR pixels at a time. Every output is the
    FMA chain over k = tap*Cin + c that the GEMM on im2col's patch rows runs, so the answers are
    those bits.
    """
    if variant not in INDIRECT_VARIANTS:  # another tile would run in its place
        raise ValueError("igemm_panels: this tile is not compiled for this CPU")
    n_images = x.shape[0]
    pixels = out.shape[0] // n_images
    taps = table.shape[1]
    k = panels.shape[1]
    n = out.shape[1]
    n_panels = panels.shape[0]
    nr = panels.shape[2]
    mr = MR[variant]
    in_registers = on_registers(act)
    register_act = act if in_registers else ACT_NONE
    x_addr = np.int64(x.ctypes.data)
    t_addr = np.int64(table.ctypes.data)
    z_addr = np.int64(zero.ctypes.data)
    w_addr = np.int64(panels.ctypes.data)
    b_addr = np.int64(bias.ctypes.data)
    c_addr = np.int64(out.ctypes.data)
    row_tiles = _cdiv(pixels, tile_rows)
    col_tiles = _cdiv(n_panels, panels_per_tile)
    scratches = _scratch(act, n_images * row_tiles * col_tiles, mr, nr)
    for task in prange(n_images * row_tiles * col_tiles):
        image = task // (row_tiles * col_tiles)
        within = task % (row_tiles * col_tiles)
        r0 = (within // col_tiles) * tile_rows
        r1 = min(pixels, r0 + tile_rows)
        p0 = (within % col_tiles) * panels_per_tile
        image_addr = x_addr + 4 * image * x.shape[1]
        scratch = scratches[task % scratches.shape[0]]
        s_addr = np.int64(scratch.ctypes.data)
        for p in range(p0, min(n_panels, p0 + panels_per_tile)):
            c0 = p * nr
            cols = min(nr, n - c0)
            w_p = w_addr + 4 * p * k * nr
            for i in range(r0, r1, mr):
                rows = min(mr, r1 - i)
                row = image * pixels + i
                dest, ld = s_addr, nr
                if in_registers:
                    dest, ld = c_addr + 4 * (row * n + c0), n
                _indirect_tile(variant, image_addr, t_addr + 4 * i * taps, taps, z_addr, rows, w_p,
                               b_addr + 4 * c0, dest, ld, register_act, np.int64(0), ld, cols if in_registers else nr)
                if not in_registers:
                    _activate_into(scratch, out, act, NO_RESIDUAL, False, row, rows, c0, cols)


# --------------------------------------------------------------------------------------------------
# Choosing a variant, packing, cutting the work
# --------------------------------------------------------------------------------------------------


def choose_variant(m: int, n: int, avx512: bool = AVX512) -> int:
    """The fastest variant for an [m, k] x [k, n] product on this CPU (bench/kernels.py).

    Every variant gives bit-identical answers (each output is the same FMA chain), so the choice is
    free to follow the whole product's shape, batch included.
    """
    if not avx512:
        return 0
    if m == 1:
        return 3
    if _round_up(n, 16) < _round_up(n, 32):
        return 2
    # 7-row tiles where they pad fewer rows: 0.87-0.89x the 8x32 tile's time at every 49-row MobileNet
    # product, 0.97-0.98x at 196 rows (one thread, AVX-512).
    return 4 if _round_up(m, 7) < _round_up(m, 8) else 1


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


class PackedWeights:
    """A [K, N] weight matrix and its bias, packed once for one variant of the microkernel.

    panels [P, K, NR]: panel p holds columns p*NR .. p*NR+NR-1, zero past N; bias [P*NR], zero past N.
    """

    __slots__ = ("panels", "bias", "k", "n", "variant", "cuts")

    def __init__(self, kernel: np.ndarray, bias: np.ndarray, variant: int):
        k, n = kernel.shape
        if bias.shape != (n,):
            raise ValueError(f"pack: bias {bias.shape} does not fit kernel {kernel.shape}")
        nr = VARIANTS[variant][1]
        count = -(-n // nr)
        # 64-byte aligned, so that each weight vector is one cache line (or half of one).
        flat = np.zeros(count * k * nr + 16, np.float32)
        start = (-flat.ctypes.data % 64) // 4
        panels = flat[start:start + count * k * nr].reshape(count, k, nr)
        padded = np.zeros((k, count * nr), np.float32)
        padded[:, :n] = kernel
        panels[...] = padded.reshape(k, count, nr).transpose(1, 0, 2)
        self.panels = panels
        self.bias = np.zeros(count * nr, np.float32)
        self.bias[:n] = bias
        self.k, self.n, self.variant = k, n, variant
        self.cuts: dict[int, tuple[int, int]] = {}  # rows of a product -> its ``tiling``


def pack(kernel: np.ndarray, bias: np.ndarray, rows: int, variant: int | None = None) -> PackedWeights:
    """Weights packed for products of ``rows`` rows (the variant that is fast for them, unless given)."""
    return PackedWeights(kernel, bias, choose_variant(rows, kernel.shape[1]) if variant is None else variant)


# Tasks the cut aims for: a few per core on up to four cores, so that unequal tiles even out.
TASKS = 8


def tiling(m: int, k: int, panels: int, mr: int) -> tuple[int, int]:
    """Rows and panels per task for an [m, k] product over ``panels`` panels.

    The rows of a task (times K) stay in L2 while each of its panels passes over them. The cut
    changes no answer (see the module docstring); it only spreads the work.
    """
    rows = mr * max(1, min(128, 65536 // max(k, 1)) // mr)
    row_tiles = -(-m // rows)
    if row_tiles >= TASKS:  # rows alone make enough tasks: tiles that the threads share evenly
        return _even_rows(m, rows, mr), panels
    col_tiles = min(panels, -(-TASKS // row_tiles))
    per_task = -(-panels // col_tiles)
    col_tiles = -(-panels // per_task)
    if row_tiles * col_tiles < TASKS and m > mr:
        rows = max(mr, _round_up(-(-m // -(-TASKS // col_tiles)), mr))
    # Row tiles of one height (a multiple of MR), as many as above but none left short: the tasks go
    # to the threads in equal runs (Numba's static schedule), so equal tasks finish together. At
    # batch 1 on two threads, MobileNet V1 0.92x and V2 0.98x the time of the unequal cut.
    row_tiles = -(-m // rows)
    return max(mr, _round_up(-(-m // row_tiles), mr)), per_task


def _even_rows(m: int, rows: int, mr: int) -> int:
    """The height (a multiple of ``mr``, at most ``rows``) of the row tiles of an [m, k] product cut by rows
    alone, chosen so that two threads, each given an equal run of tiles (Numba's static schedule), get the
    most even share of rows; then the fewest tiles (each task reads all the weights).

    At batch 8 a 14x14 map's product has 1568 rows: thirteen 128-row tiles give one thread 896 rows and
    the other 672 (its 1x1 layers ran 1.70x faster on two threads than on one); fourteen of 112 give
    each 784.
    """
    fewest = -(-m // rows)
    best_key, best = None, rows
    for count in range(fewest, 2 * fewest + 1):
        height = _round_up(-(-m // count), mr)
        tiles = -(-m // height)
        key = (-(-tiles // 2) * height, tiles)
        if best_key is None or key < best_key:
            best_key, best = key, height
    return best


@entry
def gemm_packed(a: np.ndarray, packed: PackedWeights, out: np.ndarray, act: int,
                residual: np.ndarray | None = None) -> Callable[[], None]:
    """out = act(a @ w + bias) (+ residual), w and bias as packed; a [M, K], out/residual [M, N]."""
    m, k = a.shape
    if k != packed.k or out.shape != (m, packed.n) or (residual is not None and residual.shape != out.shape):
        raise ValueError(f"gemm_packed: shapes do not fit: a {a.shape} @ packed [{packed.k}, {packed.n}] -> out "
                         f"{out.shape}" + ("" if residual is None else f" + residual {residual.shape}"))
    if m == 0 or packed.n == 0:
        return no_work
    if residual is None:
        residual = NO_RESIDUAL
    # The kernel works on raw addresses: another dtype or layout must be refused, not compiled for.
    if not (a.dtype is _FLOAT32 and out.dtype is _FLOAT32 and residual.dtype is _FLOAT32
            and a.flags.c_contiguous and out.flags.c_contiguous and residual.flags.c_contiguous):
        raise ValueError("gemm_packed: arrays must be C-contiguous float32")
    if packed.variant not in COMPILED_VARIANTS:
        raise ValueError(f"gemm_packed: the {VARIANTS[packed.variant][:2]} tile is not compiled for this CPU "
                         f"(its tiles: {[VARIANTS[v][:2] for v in COMPILED_VARIANTS]})")
    cut = packed.cuts.get(m)
    if cut is None:
        cut = packed.cuts[m] = tiling(m, k, packed.panels.shape[0], MR[packed.variant])
    return partial(gemm_panels, a, packed.panels, packed.bias, out, act, residual, packed.variant, *cut)


_PADDING_ZEROS = np.zeros(INDIRECT_CIN, np.float32)  # what a tap in the padding reads; never written


@entry
def igemm_packed(x: np.ndarray, table: np.ndarray, packed: PackedWeights, out: np.ndarray,
                 act: int) -> Callable[[], None]:
    """out = act(A @ w + bias), A's rows read through ``table`` (see ``igemm_panels``), w and bias as packed.

    x [N, H*W*Cin], table [ceil(P/MR), taps, MR] int32, out [N*P, Cout]. The table is trusted (its
    offsets are read as addresses): make it with conv.indirection_table for x's geometry and this MR.
    """
    taps = packed.k // INDIRECT_CIN
    mr = MR[packed.variant]
    n_images = x.shape[0] if x.ndim == 2 else 0
    pixels = out.shape[0] // max(n_images, 1)
    if (x.ndim != 2 or packed.k != taps * INDIRECT_CIN or out.shape != (n_images * pixels, packed.n)
            or table.shape != (-(-pixels // mr), taps, mr) or packed.variant not in INDIRECT_VARIANTS):
        raise ValueError(f"igemm_packed: shapes do not fit: x {x.shape}, table {table.shape} @ packed "
                         f"[{packed.k}, {packed.n}] -> out {out.shape}")
    if out.size == 0:
        return no_work
    # The kernel works on raw addresses: another dtype or layout must be refused, not compiled for.
    if not (x.dtype is _FLOAT32 and out.dtype is _FLOAT32 and table.dtype == np.int32
            and x.flags.c_contiguous and out.flags.c_contiguous and table.flags.c_contiguous):
        raise ValueError("igemm_packed: x and out must be C-contiguous float32, table C-contiguous int32")
    cut = packed.cuts.get(-pixels)  # per image; negative keys keep these apart from the GEMM's row counts
    if cut is None:
        cut = packed.cuts[-pixels] = tiling(pixels, packed.k, packed.panels.shape[0], mr)
    return partial(igemm_panels, x, table, _PADDING_ZEROS, packed.panels, packed.bias, out, act, packed.variant, *cut)
