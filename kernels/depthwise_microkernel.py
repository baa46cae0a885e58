"""The depthwise microkernel: the LLVM IR of one output row of a 3x3 or 5x5 depthwise convolution, every
channel, for a given ``RowTile`` (window size, vector width, order, epilogue), and the intrinsic that holds it.

The plain loops (kernels/depthwise_loops.py) leave the accumulators in memory and re-load the kernel for
every pixel. Here a block of VW channels (<VW x float>) is carried through one output row: the KxK kernel
vectors of the block are loaded once into registers, each output pixel is one register accumulator fed by
K*K FMAs, and bias + activation run on that register before its only store (kernels/vector_ir.py says why
this is written as IR).

Summation order of one output value: its taps row by row, left to right, the first a multiply, the others
FMAs (the plain loops' order; a 5-wide window as two such sums, see ``split_column``, which also gives each
group of pixels twice the independent FMA chains). Kernel rows outside the image are skipped (a copy of the
loops per count of rows inside); columns outside it are loaded as zeros by a masked load that reads no
memory, so a border window runs the same FMA chains as an interior one, and an outside tap adds an exact
zero (x + 0*w == x): the sum of the taps inside, bit for bit (up to the sign of an exact zero), whichever
the pixel or the CPU.

The row's arguments, all int64 (addresses, strides in floats), are ``RowArgs``: for j < n_out and channels
[0, cs),
    out[j*cs + c] = act(bias[c] + sum over r < rows, t < K of
                        x[r*x_rs + (j*sw - pad_left + t)*cs + c] * kernel[(r*K + t)*cs + c])
where x points at input column 0 of the first kernel row inside the image (kernel at that row), and input
columns outside [0, width) count as zeros. Pixels [j_lo, j_hi) are those whose windows lie wholly inside
the image.

Numba's on-disk cache is checked against each kernel file alone: the row kernels (kernels/depthwise_row_kernels.py)
hold this file's IR in their cached code, so after editing it (or kernels/vector_ir.py) clear
kernels/__pycache__/*.nb* in a checkout. (An install replaces every file, and ``npmobile build-kernels`` keys its
module on all of them.)
"""

from __future__ import annotations

from typing import NamedTuple

from .backend import intrinsic
from .depthwise_loops import split_column
from .vector_ir import (
    F32,
    PTR,
    activation_bounds,
    cgutils,
    clamp,
    fma,
    hard_swish,
    i64,
    ir,
    lanes_below,
    masked_load,
    masked_store,
    types,
    vector,
)


class RowTile(NamedTuple):
    """What one compiled row kernel is: ``k`` x ``k`` windows, blocks of ``vw`` channels, and

    - ``by_pixel``: every channel block of a group of pixels before the next group (True), or each block over
      the whole row, its kernel loaded once (False); ``by_pixel_order`` (kernels/depthwise_rules.py) says
      which. The same FMAs either way: the same bits.
    - ``hard_swish``: the activation is hard swish (``act`` is not read), else none, ReLU or ReLU6 (one clamp,
      its bounds from ``act``): each kernel holds the one epilogue it runs, half the code to compile.
    """

    k: int
    vw: int
    by_pixel: bool
    hard_swish: bool

    @property
    def name(self) -> str:
        return (f"depthwise_row_k{self.k}_v{self.vw}{'_by_pixel' if self.by_pixel else ''}"
                f"{'_hard_swish' if self.hard_swish else ''}")


class RowArgs(NamedTuple):
    """A row kernel's 14 int64 arguments (see the module docstring), in the order of its C signature."""

    x: object
    x_rs: object
    cs: object
    kernel: object
    bias: object
    out: object
    n_out: object
    sw: object
    rows: object
    act: object
    pad_left: object
    width: object
    j_lo: object
    j_hi: object


# Pixels per step of the stride-1/2 loops (registers: 9 kernel vectors + 4 accumulators at 3x3).
GROUP = {(3, 1): 4, (3, 2): 4, (5, 1): 3, (5, 2): 2}
# Fewer pixels than this in whole groups (a fixed rule of the row's width): none take the plain-load loop.
MIN_WHOLE_PIXELS = {3: 0, 5: 16}


def emit_row(builder, tile: RowTile, args: RowArgs) -> None:
    """The IR of one output row for ``tile``: see the module docstring."""
    k, vw, by_pixel = tile.k, tile.vw, tile.by_pixel
    cs, x_rs, n_out, sw, rows, act, pad_left, width = (args.cs, args.x_rs, args.n_out, args.sw, args.rows, args.act,
                                                       args.pad_left, args.width)
    j_lo, j_hi = args.j_lo, args.j_hi
    vec = vector(vw)
    multiply_add = fma(builder, vw)
    mask_type = vector(vw, ir.IntType(1))
    no_lanes = ir.Constant(mask_type, [0] * vw)
    all_lanes = ir.Constant(mask_type, [1] * vw)
    x0 = builder.inttoptr(args.x, PTR)
    k0 = builder.inttoptr(args.kernel, PTR)
    b0 = builder.inttoptr(args.bias, PTR)
    o0 = builder.inttoptr(args.out, PTR)
    k_rs = builder.mul(cs, i64(k))
    whole = builder.mul(builder.sdiv(cs, i64(vw)), i64(vw))  # channels in whole blocks of VW
    tail_mask = lanes_below(builder, builder.sub(cs, whole), vw)  # the lanes of the last, partial block

    def at(base, offset):
        return builder.gep(base, [offset], source_etype=F32)

    def load(ptr, mask):
        """A vector of floats at ptr: the lanes of ``mask`` (None: all, a plain load), zeros elsewhere."""
        if mask is None:
            return builder.load(ptr, typ=vec, align=4)
        return masked_load(builder, ptr, mask, vw)

    low, high = activation_bounds(builder, act, vw)

    def finish(acc, bias, ptr, lanes):
        """act(acc + bias) stored at ptr: None/ReLU/ReLU6 are one clamp (bounds from ``act``)."""
        v = builder.fadd(acc, bias)
        v = hard_swish(builder, v, vw) if tile.hard_swish else clamp(builder, v, low, high)
        if lanes is not None:
            masked_store(builder, v, ptr, lanes, vw)
        else:
            builder.store(v, ptr, align=4)

    def kernel_block(c0, lanes, n_rows):
        """The kernel's ``n_rows`` rows and the bias for channels [c0, c0 + VW) (``lanes`` of them: None for all)."""
        w = [[load(at(k0, builder.add(builder.add(builder.mul(i64(r), k_rs), builder.mul(i64(t), cs)), c0)), lanes)
              for t in range(k)] for r in range(n_rows)]
        return w, load(at(b0, c0), lanes)

    def windows(n_rows, c0=None, lanes=None):
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
                        acc[q][part] = (builder.fmul(v, w[r][t]) if a is None
                                        else builder.call(multiply_add, [v, w[r][t], a]))
            for q in range(count):
                total = acc[q][0] if acc[q][1] is None else builder.fadd(acc[q][0], acc[q][1])
                ptr = at(o0, builder.add(builder.mul(builder.add(j0, i64(q)), cs), c0))
                finish(total, bias, ptr, lanes)

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
                body(c0, lanes_below(builder, builder.sub(cs, c0), vw))
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
                windows(n_rows)
            else:
                for_each_block(lambda c0, lanes, n=n_rows: windows(n, c0, lanes))


def row_intrinsic(tile: RowTile):
    """A Numba intrinsic computing one output row for ``tile``: row(x, x_rs, cs, kernel, bias, out, n_out, sw,
    rows, act, pad_left, width, j_lo, j_hi), all int64 (``RowArgs``)."""

    def row(typingctx, x, x_rs, cs, kernel, bias, out, n_out, sw, rows, act, pad_left, width, j_lo, j_hi):
        sig = types.void(*([types.int64] * len(RowArgs._fields)))

        def codegen(context, builder, signature, args):
            emit_row(builder, tile, RowArgs(*args))
            return context.get_dummy_value()

        return sig, codegen

    row.__name__ = tile.name
    return intrinsic(row)
