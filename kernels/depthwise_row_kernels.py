"""The compiled depthwise row kernels (kernels/depthwise_microkernel.py), one per ``RowTile`` this CPU runs,
as C functions called by address.

Why C functions: every kernel that runs rows -- the depthwise drivers (kernels/depthwise_drivers.py) and
kernels/expand_depthwise.py -- calls the same machine code instead of compiling its own copy (Numba links a
called function's IR into each caller and compiles it again there: seconds apiece on every first run). One
indirect call per output row, every channel block inside it: a call per block costs too much on 7x7 and
14x14 maps, where a block's row is a few pixels of work.

Why written out, one plain function per kernel: a cfunc is cached (and exported by kernels/build.py) under
its own function's name and source, which functions made by a factory would share.
"""

from __future__ import annotations

from .activations import ACT_HARD_SWISH
from .backend import int64_cfunc, intrinsic
from .depthwise_microkernel import RowArgs, RowTile, row_intrinsic
from .depthwise_rules import VECTOR_WIDTH
from .vector_ir import I64, ir, types

_ROW_ARGS = len(RowArgs._fields)

_row_k3 = row_intrinsic(RowTile(3, VECTOR_WIDTH, by_pixel=False, hard_swish=False))
_row_k5 = row_intrinsic(RowTile(5, VECTOR_WIDTH, by_pixel=False, hard_swish=False))
_row_k3_by_pixel = row_intrinsic(RowTile(3, VECTOR_WIDTH, by_pixel=True, hard_swish=False))
_row_k3_hard_swish = row_intrinsic(RowTile(3, VECTOR_WIDTH, by_pixel=False, hard_swish=True))
_row_k5_hard_swish = row_intrinsic(RowTile(5, VECTOR_WIDTH, by_pixel=False, hard_swish=True))
_row_k3_by_pixel_hard_swish = row_intrinsic(RowTile(3, VECTOR_WIDTH, by_pixel=True, hard_swish=True))


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


def row_kernel(k: int, act: int, by_pixel: bool = False) -> int:
    """The address of the compiled row kernel for k x k windows and activation ``act`` (one of
    VECTOR_ACTS), in the order ``by_pixel`` says (``by_pixel_order``; 3x3 only): compiled, or loaded from
    Numba's cache, on first use (a model never compiles one it does not run), or the AOT module's."""
    return int64_cfunc(ROW_KERNELS[k, by_pixel and k == 3, act == ACT_HARD_SWISH], _ROW_ARGS)


@intrinsic
def call_row(typingctx, address, x, x_rs, cs, kernel, bias, out, n_out, sw, rows, act, pad_left, width, j_lo, j_hi):
    """Calls the row kernel at ``address`` (``row_kernel``) with the row's 14 int64 arguments (``RowArgs``)."""
    sig = types.void(*([types.int64] * (_ROW_ARGS + 1)))

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.VoidType(), [I64] * _ROW_ARGS)
        builder.call(builder.inttoptr(args[0], fnty.as_pointer()), args[1:])
        return context.get_dummy_value()

    return sig, codegen
