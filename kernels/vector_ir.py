"""LLVM vector IR helpers shared by the microkernels (kernels/gemm_microkernel.py, kernels/depthwise_microkernel.py,
kernels/squeeze_excite.py): the types, constants, intrinsic declarations and epilogues each would otherwise repeat.

Why IR at all: a kernel is fast when its accumulators stay in registers for a whole loop. Numba compiles array
code, and LLVM will not keep an accumulator tile that lives in an array in registers; it does keep SSA values of
vector type there. So the microkernels emit ``<VW x float>`` values directly through ``numba.extending.intrinsic``
and llvmlite's IR builder. The vector types are generic: every kernel compiles and answers the same on any
x86-64 (LLVM splits a <16 x float> into two AVX2 registers); the CPU only decides which widths are fast.

llvmlite and Numba's code-generation modules are imported only when Numba compiles kernels. In AOT mode
(kernels/backend.py) nothing is compiled: ``ir``, ``types`` and ``cgutils`` are None and only functions that
build IR, never called then, name them.
"""

from __future__ import annotations

from .activations import ACT_RELU, ACT_RELU6
from .backend import AOT

if AOT:
    ir = types = cgutils = None
    F32 = I32 = I64 = PTR = None
else:
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils

    F32 = ir.FloatType()
    I32 = ir.IntType(32)
    I64 = ir.IntType(64)
    PTR = ir.PointerType()

__all__ = ["F32", "I32", "I64", "PTR", "activation_bounds", "cgutils", "clamp", "counted_loop", "fma", "hard_swish",
           "i32", "i64", "ir", "lanes_below", "masked_load", "masked_store", "splat", "splat_float", "types", "vector"]


def i64(value: int):
    """An i64 constant."""
    return ir.Constant(I64, value)


def i32(value: int):
    """An i32 constant."""
    return ir.Constant(I32, value)


def vector(vw: int, element=None):
    """The type <vw x element> (float by default)."""
    return ir.VectorType(F32 if element is None else element, vw)


def splat(builder, value, vw: int):
    """``value`` (a scalar) in every lane of a vector of ``vw``: inserted in lane 0, then shuffled everywhere."""
    undefined = ir.Constant(vector(vw, value.type), ir.Undefined)
    return builder.shuffle_vector(builder.insert_element(undefined, value, i64(0)), undefined,
                                  ir.Constant(vector(vw, I32), [0] * vw))


def splat_float(value: float, vw: int):
    """A vector constant with ``value`` in every lane."""
    return ir.Constant(vector(vw), [value] * vw)


def lanes_below(builder, count, vw: int, first: int = 0):
    """The mask of the lanes l whose number ``first + l`` is below ``count`` (an i64)."""
    numbers = ir.Constant(vector(vw, I64), list(range(first, first + vw)))
    return builder.icmp_signed("<", numbers, splat(builder, count, vw))


def _declare(builder, name: str, returns, arguments: list):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(returns, arguments), name)


def fma(builder, vw: int):
    """llvm.fma on vectors of ``vw`` floats: fma(a, b, c) = a * b + c, rounded once."""
    vec = vector(vw)
    return _declare(builder, f"llvm.fma.v{vw}f32", vec, [vec, vec, vec])


def masked_load(builder, ptr, mask, vw: int):
    """The lanes of ``mask`` loaded from ``ptr``, zeros in the others: lanes outside the mask read no memory."""
    vec = vector(vw)
    function = _declare(builder, f"llvm.masked.load.v{vw}f32.p0", vec, [PTR, I32, vector(vw, ir.IntType(1)), vec])
    return builder.call(function, [ptr, i32(4), mask, splat_float(0.0, vw)])


def masked_store(builder, value, ptr, mask, vw: int) -> None:
    """The lanes of ``mask`` of ``value`` stored at ``ptr``: the others leave memory as it is."""
    function = _declare(builder, f"llvm.masked.store.v{vw}f32.p0", ir.VoidType(),
                        [vector(vw), PTR, I32, vector(vw, ir.IntType(1))])
    builder.call(function, [value, ptr, i32(4), mask])


def clamp(builder, v, low, high):
    """v limited to [low, high]. NaN stays NaN (both comparisons are false), as np.maximum/minimum keep it."""
    v = builder.select(builder.fcmp_ordered("<", v, low), low, v)
    return builder.select(builder.fcmp_ordered(">", v, high), high, v)


def activation_bounds(builder, act, vw: int):
    """(low, high) for ``clamp``: none, ReLU and ReLU6 are one clamp whose bounds the activation code ``act``
    (an i64) chooses at run time, -inf and inf leaving v as it is; so the three share one epilogue."""
    zero, six, inf = splat_float(0.0, vw), splat_float(6.0, vw), splat_float(float("inf"), vw)
    is_relu = builder.or_(builder.icmp_signed("==", act, i64(ACT_RELU)), builder.icmp_signed("==", act, i64(ACT_RELU6)))
    low = builder.select(is_relu, zero, builder.fneg(inf))
    high = builder.select(builder.icmp_signed("==", act, i64(ACT_RELU6)), six, inf)
    return low, high


def hard_swish(builder, v, vw: int):
    """x * (relu6(x + 3) / 6): a division, as Keras writes it."""
    zero, three, six = splat_float(0.0, vw), splat_float(3.0, vw), splat_float(6.0, vw)
    return builder.fmul(v, builder.fdiv(clamp(builder, builder.fadd(v, three), zero, six), six))


def counted_loop(builder, count, acc: list, body, name: str) -> list:
    """A loop of ``count`` iterations carrying the accumulator tile ``acc`` (rows of values) as phi nodes.

    body(index, acc) emits one iteration and returns the new tile (it may emit a loop of its own).
    Returns the tile after the loop: ``acc`` itself when ``count`` <= 0.
    """
    entry = builder.block
    loop = builder.append_basic_block(name)
    done = builder.append_basic_block(name + ".done")
    builder.cbranch(builder.icmp_signed(">", count, i64(0)), loop, done)
    builder.position_at_end(loop)
    index = builder.phi(I64)
    index.add_incoming(i64(0), entry)
    phis = [[builder.phi(v.type) for v in row] for row in acc]
    for row, start in zip(phis, acc):
        for phi, v in zip(row, start):
            phi.add_incoming(v, entry)
    new = body(index, phis)
    following = builder.add(index, i64(1))
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
