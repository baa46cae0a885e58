"""The GEMM microkernel: the LLVM IR of one MR x NR register tile of C = act(A @ w + bias) (+ R), for a given
``Tile`` (kernels/gemm_rules.py), and the intrinsics that put it into the drivers (kernels/gemm_drivers.py).

One tile: MR x (NR / VW) accumulators of type <VW x float> as phi nodes of one loop over K; each step loads
row k of the weight panel (NR / VW vectors) and, for each of the MR rows, broadcasts a[i, k] and adds one FMA
per vector; then bias, activation and residual before the store (on the registers themselves for the common
tile). Each loaded weight vector feeds MR multiply-adds and each broadcast input value NR of them: that is
what makes a GEMM fast, and LLVM keeps these accumulators in registers only as SSA vector values, hence IR
(kernels/vector_ir.py).

A is read in one of two ways: as the rows of a matrix (``matrix_rows``), or through an indirection table
(``indirect_rows``: row p of A is output pixel p's receptive field, read in place from the image, the
indirect GEMM of a convolution).

Determinism: every output value is one FMA chain over k = 0..K-1 starting from zero, then + bias, then the
activation, then + residual. Edge tiles run the very same instructions (rows past ``rows`` re-read the last
row and are not stored; columns past ``cols`` are computed from the panel's zero padding and masked out of
the stores), so how the product is cut never changes an answer.

Numba's on-disk cache is checked against each kernel file alone: the drivers (kernels/gemm_drivers.py,
kernels/expand_depthwise.py) hold this file's IR, and the tiles of kernels/gemm_rules.py, in their cached
code, so after editing either of these two files (or kernels/vector_ir.py) clear kernels/__pycache__/*.nb* in
a checkout. (An install replaces every file, and ``npmobile build-kernels`` keys its module on all of them.)
"""

from __future__ import annotations

from typing import NamedTuple

from .activations import ACT_HARD_SWISH
from .backend import intrinsic
from .gemm_rules import Tile
from .vector_ir import (
    F32,
    I64,
    PTR,
    activation_bounds,
    cgutils,
    clamp,
    counted_loop,
    fma,
    hard_swish,
    i32,
    i64,
    ir,
    lanes_below,
    masked_load,
    masked_store,
    splat,
    types,
    vector,
)


class TileOutput(NamedTuple):
    """Where a tile's results go (the intrinsic's int64 arguments besides A's): rows [0, rows) and columns
    [0, cols) of C at address ``c`` (rows ``ldc`` floats apart) = act(... @ the panel at ``w`` + the ``bias``
    at its address) (+ the residual at address ``residual``, rows ``ldr`` apart, when not 0)."""

    rows: object
    w: object
    bias: object
    c: object
    ldc: object
    act: object
    residual: object
    ldr: object
    cols: object


def matrix_rows(builder, a_args, rows, weights, fma_row, zeros: list) -> list:
    """The tile's sums over k, A read as rows of a matrix: a[i, k] at a + i*lda + k."""
    a_addr, lda, k = a_args
    a = builder.inttoptr(a_addr, PTR)
    last = builder.sub(rows, i64(1))
    # Rows past ``rows`` re-read the last row: the same instructions run, the values are not stored.
    a_rows = []
    for i in range(len(zeros)):
        row = builder.select(builder.icmp_signed("<", i64(i), rows), i64(i), last)
        a_rows.append(builder.gep(a, [builder.mul(row, lda)], source_etype=F32))

    def step(kk, acc):
        wv = weights(kk)
        return [fma_row(acc_row, builder.gep(a_row, [kk], source_etype=F32), wv)
                for acc_row, a_row in zip(acc, a_rows)]

    return counted_loop(builder, k, zeros, step, "tile.k")


def indirect_rows(cin: int):
    """The tile's sums over k = tap*cin + c, A read through an indirection table (the indirect GEMM).

    Row i of A is output pixel i's receptive field, never copied out: the tile's table [taps, MR] holds, for
    each kernel tap and row, the offset in x of the input pixel that tap sees (its ``cin`` channels are
    contiguous), or -1 when the tap falls in the padding and reads the ``cin`` zeros at ``zero``. (Rows past
    the pixels read -1: computed like the others, not stored.)

    ``cin`` is fixed when the code is made, so that each row's ``cin`` values are read right after its table
    entry: a tile of 28 rows has no room to keep 28 addresses in registers over a loop.
    """

    def sums(builder, a_args, rows, weights, fma_row, zeros: list) -> list:
        x_addr, table_addr, taps, zero_addr = a_args
        x = builder.inttoptr(x_addr, PTR)
        zero = builder.inttoptr(zero_addr, PTR)
        table = builder.inttoptr(table_addr, PTR)
        i32_type = ir.IntType(32)
        mr = len(zeros)

        def tap(t, acc):
            first_k = builder.mul(t, i64(cin))
            wvs = [weights(builder.add(first_k, i64(c))) for c in range(cin)]
            # The tile's MR entries for tap t are contiguous: one address, the rows at fixed displacements.
            entries = builder.gep(table, [builder.mul(t, i64(mr))], source_etype=i32_type)
            new = []
            for i, acc_row in enumerate(acc):
                entry = builder.gep(entries, [i64(i)], source_etype=i32_type)
                offset = builder.sext(builder.load(entry, typ=i32_type, align=4), I64)
                inside = builder.icmp_signed(">=", offset, i64(0))
                pixel = builder.select(inside, builder.gep(x, [offset], source_etype=F32), zero)
                for c in range(cin):
                    acc_row = fma_row(acc_row, builder.gep(pixel, [i64(c)], source_etype=F32), wvs[c])
                new.append(acc_row)
            return new

        return counted_loop(builder, taps, zeros, tap, "tile.tap")

    return sums


def emit_tile(builder, tile: Tile, read_a, a_args, out: TileOutput, prefetch=None, streamed=None) -> None:
    """The IR of one ``tile`` (see the module docstring). ``read_a`` emits the loop over K, reading A as
    ``a_args`` locate it (``matrix_rows`` or ``indirect_rows(cin)``). ``prefetch``: an address; step k of the
    loop also asks for the cache line at prefetch + k * NR floats to be brought into L2 (the drivers say which).
    ``streamed``: an i1, true when the panel is too long to stay in L1 while the tile passes over it
    (``streams_from_l2``); the loop is then emitted a second time, in which step k also asks for row
    k + L1_AHEAD of the panel to be brought into L1."""
    mr, nr, vw = tile
    vec = vector(vw)
    nv = nr // vw
    multiply_add = fma(builder, vw)
    w = builder.inttoptr(out.w, PTR)
    zero = ir.Constant(vec, [0.0] * vw)
    prefetch_line = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [PTR, ir.IntType(32), ir.IntType(32), ir.IntType(32)]),
        "llvm.prefetch.p0")
    if prefetch is not None:
        ahead = builder.inttoptr(prefetch, PTR)

    def weights(kk, into_l1=False):
        """Row k of the panel: NR / VW vectors."""
        w_row = builder.gep(w, [builder.mul(kk, i64(nr))], source_etype=F32)
        if prefetch is not None:  # a read (0), kept in L2 (locality 2), of data (1)
            line = builder.gep(ahead, [builder.mul(kk, i64(nr))], source_etype=F32)
            builder.call(prefetch_line, [line] + [i32(v) for v in (0, 2, 1)])
        if into_l1:  # every line of row k + L1_AHEAD, kept in L1 (locality 3)
            for first in range(0, nr, _LINE_FLOATS):
                line = builder.gep(w_row, [i64(L1_AHEAD * nr + first)], source_etype=F32)
                builder.call(prefetch_line, [line] + [i32(v) for v in (0, 3, 1)])
        return [builder.load(builder.gep(w_row, [i64(j * vw)], source_etype=F32), typ=vec, align=4)
                for j in range(nv)]

    def fma_row(acc_row, a_ptr, wv):
        """acc_row + a[i, k] * (row k of the panel): the A value broadcast, one FMA per vector."""
        xv = splat(builder, builder.load(a_ptr, typ=F32, align=4), vw)
        return [builder.call(multiply_add, [xv, wv[j], acc_row[j]]) for j in range(nv)]

    def sums_with(weights_of):
        return read_a(builder, a_args, out.rows, weights_of, fma_row, [[zero] * nv for _ in range(mr)])

    if streamed is None:
        sums = sums_with(weights)
    else:
        with builder.if_else(streamed) as (far, near):
            with far:
                far_sums, far_end = sums_with(lambda kk: weights(kk, into_l1=True)), builder.block
            with near:
                near_sums, near_end = sums_with(weights), builder.block
        sums = []
        for far_row, near_row in zip(far_sums, near_sums):
            sums.append([])
            for far_v, near_v in zip(far_row, near_row):
                merged = builder.phi(far_v.type)
                merged.add_incoming(far_v, far_end)
                merged.add_incoming(near_v, near_end)
                sums[-1].append(merged)
    _emit_epilogue(builder, tile, sums, out)


# How far ahead (rows of the panel) a tile whose panel streams from L2 asks for its rows in L1; 4 to 12 measured
# alike (Rocket Lake, bench/README.md "GEMM tiles and cuts").
L1_AHEAD = 8
_LINE_FLOATS = 16  # a 64-byte cache line
# A panel longer than this is not in L1 when the tile's loop comes back to its first row: L1 holds 32 to 48 KB on
# the AVX-512 cores, beside the tile's MR rows of A.
_L1_PANEL_BYTES = 32 * 1024


def streams_from_l2(builder, k, tile: Tile):
    """An i1: whether a ``tile`` over K = ``k`` (an i64) reads a panel too long to stay in L1. Only for tiles that
    reuse their panel (MR > 1): the matrix-vector tile reads each panel once, from memory."""
    if tile.mr == 1:
        return None
    return builder.icmp_signed(">", k, i64(_L1_PANEL_BYTES // (4 * tile.nr)))


def _emit_epilogue(builder, tile: Tile, sums: list, out: TileOutput) -> None:
    """act(sums + bias) (+ residual) stored into C: the common tile straight from the registers, any other
    through a stack copy of the tile (see below)."""
    mr, nr, vw = tile
    vec = vector(vw)
    nv = nr // vw
    rows, cols, act, ldc, ldr = out.rows, out.cols, out.act, out.ldc, out.ldr
    bias = builder.inttoptr(out.bias, PTR)
    bv = [builder.load(builder.gep(bias, [i64(j * vw)], source_etype=F32), typ=vec, align=4) for j in range(nv)]
    values = [[builder.fadd(sums[i][j], bv[j]) for j in range(nv)] for i in range(mr)]
    c = builder.inttoptr(out.c, PTR)
    r = builder.inttoptr(out.residual, PTR)
    low, high = activation_bounds(builder, act, vw)
    swish = lambda v: hard_swish(builder, v, vw)  # noqa: E731
    clamped = lambda v: clamp(builder, v, low, high)  # noqa: E731
    # Columns past ``cols`` (the zero padding of the last panel) are computed like the others but neither
    # read from the residual nor stored: masked loads and stores.
    masks = [lanes_below(builder, cols, vw, j * vw) for j in range(nv)]

    def store_rows(fn, residual, masked):
        """Rows [0, rows) of the tile, through ``fn`` (+ the residual), into c: one loop over the rows."""
        before = builder.block
        row_loop = builder.append_basic_block("tile.rows")
        rows_done = builder.append_basic_block("tile.rows.done")
        builder.branch(row_loop)
        builder.position_at_end(row_loop)
        i = builder.phi(I64)
        i.add_incoming(i64(0), before)
        c_row = builder.gep(c, [builder.mul(i, ldc)], source_etype=F32)
        r_row = builder.gep(r, [builder.mul(i, ldr)], source_etype=F32)
        first = builder.mul(i, i64(nv))
        for j in range(nv):
            slot = builder.gep(stack, [builder.add(first, i64(j))], source_etype=vec)
            v = fn(builder.load(slot, typ=vec, align=4))
            off = [i64(j * vw)]
            if residual:
                r_ptr = builder.gep(r_row, off, source_etype=F32)
                v = builder.fadd(v, masked_load(builder, r_ptr, masks[j], vw) if masked
                                 else builder.load(r_ptr, typ=vec, align=4))
            c_ptr = builder.gep(c_row, off, source_etype=F32)
            if masked:
                masked_store(builder, v, c_ptr, masks[j], vw)
            else:
                builder.store(v, c_ptr, align=4)
        next_i = builder.add(i, i64(1))
        i.add_incoming(next_i, builder.block)
        builder.cbranch(builder.icmp_signed("<", next_i, rows), row_loop, rows_done)
        builder.position_at_end(rows_done)

    def store_all(fn):
        with builder.if_else(builder.icmp_signed("!=", out.residual, i64(0))) as (with_res, without):
            for residual in (True, False):
                with (with_res if residual else without):
                    if vw == 16:  # AVX-512 tiles: a masked store costs what a plain one does
                        store_rows(fn, residual, True)
                        continue
                    with builder.if_else(builder.icmp_signed(">=", cols, i64(nr))) as (whole, part):
                        with whole:
                            store_rows(fn, residual, False)
                        with part:
                            store_rows(fn, residual, True)

    # The common tile (all MR rows and NR columns, no residual, an activation the registers take) is stored
    # straight from the registers. Every other goes through a stack array, so that its epilogue is one loop
    # over the rows rather than MR unrolled copies in each of its eight branches (a fraction of the compile
    # time; the reads back come from L1). Both paths apply the same operations.
    whole = builder.and_(builder.icmp_signed("==", rows, i64(mr)), builder.icmp_signed(">=", cols, i64(nr)))
    common = builder.and_(whole, builder.icmp_signed("==", out.residual, i64(0)))
    is_swish = builder.icmp_signed("==", act, i64(ACT_HARD_SWISH))
    with builder.if_else(common) as (direct, through_stack):
        with direct:
            with builder.if_else(is_swish) as (swish_branch, clamp_branch):
                for fn, branch in ((swish, swish_branch), (clamped, clamp_branch)):
                    with branch:
                        for i in range(mr):
                            c_row = builder.gep(c, [builder.mul(i64(i), ldc)], source_etype=F32)
                            for j in range(nv):
                                builder.store(fn(values[i][j]), builder.gep(c_row, [i64(j * vw)], source_etype=F32),
                                              align=4)
        with through_stack:
            stack = cgutils.alloca_once(builder, vec, size=mr * nv)
            for i in range(mr):
                for j in range(nv):
                    builder.store(values[i][j], builder.gep(stack, [i64(i * nv + j)], source_etype=vec), align=4)
            with builder.if_else(is_swish) as (swish_branch, clamp_branch):
                with swish_branch:
                    store_all(swish)
                with clamp_branch:
                    store_all(clamped)


def _emit_switch(builder, index, tiles: tuple, emit_one) -> None:
    """emit_one(tile) for the tile at ``index`` (an i64) of ``tiles``, one case each; an index past the others
    runs the last (the drivers check it first). A single tile is emitted without a branch."""
    if len(tiles) == 1:
        emit_one(tiles[0])
        return
    blocks = [builder.append_basic_block(f"tile.{tile.name}") for tile in tiles]
    done = builder.append_basic_block("tile.done")
    switch = builder.switch(index, blocks[-1])
    for number, block in enumerate(blocks[:-1]):
        switch.add_case(i64(number), block)
    for tile, block in zip(tiles, blocks):
        builder.position_at_end(block)
        emit_one(tile)
        builder.branch(done)
    builder.position_at_end(done)


def tile_kernel(tiles: tuple):
    """A Numba intrinsic running the tile ``tiles[index]`` with A read as a matrix (arguments: addresses and
    strides in floats, as int64):

    run(index, a, lda, rows, w_panel, k, bias, c, ldc, act, residual, ldr, cols, prefetch): rows [0, rows) and
    columns [0, cols) of the tile at ``c`` = act(a[rows, :k] @ w_panel[:k, :NR] + bias[:NR]) (+ residual when
    its address is not 0); ``prefetch`` as ``emit_tile`` says. A constant ``index`` leaves only its tile.
    """

    def run(typingctx, index, a, lda, rows, w, k, bias, c, ldc, act, residual, ldr, cols, prefetch):
        sig = types.void(*([types.int64] * 14))

        def codegen(context, builder, signature, args):
            index, a, lda, rows, w, k, *epilogue, prefetch = args
            out = TileOutput(rows, w, *epilogue)
            _emit_switch(builder, index, tiles, lambda tile: emit_tile(
                builder, tile, matrix_rows, (a, lda, k), out, prefetch, streams_from_l2(builder, k, tile)))
            return context.get_dummy_value()

        return sig, codegen

    run.__name__ = "gemm_" + "_".join(tile.name for tile in tiles)
    return intrinsic(run)


def indirect_tile_kernel(tiles: tuple, cin: int):
    """The same tiles with A read through an indirection table (``indirect_rows``), K = taps * ``cin``:

    run(index, x, table, taps, zero, rows, w_panel, bias, c, ldc, act, residual, ldr, cols).
    """

    def run(typingctx, index, x, table, taps, zero, rows, w, bias, c, ldc, act, residual, ldr, cols):
        sig = types.void(*([types.int64] * 14))

        def codegen(context, builder, signature, args):
            index, x, table, taps, zero, *rest = args
            _emit_switch(builder, index, tiles, lambda tile: emit_tile(
                builder, tile, indirect_rows(cin), (x, table, taps, zero), TileOutput(*rest)))
            return context.get_dummy_value()

        return sig, codegen

    run.__name__ = f"igemm_c{cin}_" + "_".join(tile.name for tile in tiles)
    return intrinsic(run)
