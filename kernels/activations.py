"""Activation epilogues shared by every fast kernel, and the elementwise kernels.

Contract (same for every module in kernels/ except reference.py):
- arrays are C-contiguous float32, activations NHWC;
- the caller preallocates ``out`` (right shape, C-contiguous float32) and the kernel writes every
  element of it; nothing is returned;
- elementwise kernels (this file) may write in place (``out`` may be ``x``); kernels that read a
  neighbourhood (convolutions, pooling) need ``out`` distinct from their input.

An activation is chosen by a small int code (ACT_*) instead of a Python function, so one compiled
kernel serves every activation and the choice costs one branch per row, not a call per element.

Numerics follow kernels/reference.py operation by operation, because float32 rounding follows the
order of operations: hard_swish is x * (relu6(x + 3) / 6) -- a division by 6, as Keras writes it,
not a multiplication by 1/6. That is also why nothing here is compiled with fastmath: the 'arcp'
flag would let LLVM turn that division into a multiplication.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np

from .backend import njit, prange
from .entry import entry

ACT_NONE = 0
ACT_RELU = 1
ACT_RELU6 = 2
ACT_HARD_SWISH = 3
ACT_HARD_SIGMOID = 4  # Keras 3: relu6(x + 3) / 6
ACT_SIGMOID = 5
ACT_SWISH = 6

# The plan reads names here; npmobile/activations.py's table is the one list of activations (a test checks
# that every name it gives an epilogue code has the same code here).
ACTIVATION_CODES: dict[str | None, int] = {
    None: ACT_NONE,
    "linear": ACT_NONE,
    "relu": ACT_RELU,
    "relu6": ACT_RELU6,
    "hard_swish": ACT_HARD_SWISH,
    "hard_silu": ACT_HARD_SWISH,
    "hard_sigmoid": ACT_HARD_SIGMOID,
    "hard_sigmoid_keras3": ACT_HARD_SIGMOID,  # npmobile's name for Keras 3's in a Keras 2 file (a mapped function)
    "sigmoid": ACT_SIGMOID,
    "swish": ACT_SWISH,
    "silu": ACT_SWISH,
}


def activation_code(name: str | None) -> int:
    """The ACT_* code for a Keras activation name (Keras 3 meaning of hard_sigmoid).

    Raises KeyError for a name no kernel epilogue implements (softmax, tanh, Keras 2's
    hard_sigmoid...): those stay separate steps.
    """
    return ACTIVATION_CODES[name]


_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)
_THREE = np.float32(3.0)
_SIX = np.float32(6.0)


@njit(inline="always")
def _relu6(v):
    return min(max(v, _ZERO), _SIX)


@njit(inline="always")
def _sigmoid(v):
    # Split by sign so exp never overflows (as reference.sigmoid does).
    e = np.exp(-abs(v))
    if v >= _ZERO:
        return _ONE / (_ONE + e)
    return e / (_ONE + e)


@njit(inline="always")
def apply_activation(v, act):
    """One float32 value through activation ``act``. Kernels call this in their epilogue."""
    if act == ACT_RELU:
        return max(v, _ZERO)
    if act == ACT_RELU6:
        return _relu6(v)
    if act == ACT_HARD_SWISH:
        return v * (_relu6(v + _THREE) / _SIX)
    if act == ACT_HARD_SIGMOID:
        return _relu6(v + _THREE) / _SIX
    if act == ACT_SIGMOID:
        return _sigmoid(v)
    if act == ACT_SWISH:
        return v * _sigmoid(v)
    return v


@njit(inline="always")
def bias_act_row(row, bias, act):
    """row[c] = act(row[c] + bias[c]) in place, for one contiguous row of channels.

    The branch on ``act`` sits outside the channel loop so each loop body is branch-free and LLVM
    vectorizes it (the sigmoid family keeps a per-element branch; those layers are rare).
    """
    n = row.shape[0]
    if act == ACT_NONE:
        for c in range(n):
            row[c] = row[c] + bias[c]
    elif act == ACT_RELU:
        for c in range(n):
            row[c] = max(row[c] + bias[c], _ZERO)
    elif act == ACT_RELU6:
        for c in range(n):
            row[c] = _relu6(row[c] + bias[c])
    elif act == ACT_HARD_SWISH:
        for c in range(n):
            v = row[c] + bias[c]
            row[c] = v * (_relu6(v + _THREE) / _SIX)
    else:
        for c in range(n):
            row[c] = apply_activation(row[c] + bias[c], act)


_NO_OPERAND = np.zeros(0, np.float32)  # ``_elementwise``'s b for act(a) alone


@entry
def activate(x, out, act) -> Callable[[], None]:
    """out = act(x), elementwise, any shape; ``out`` may be ``x``."""
    # Numba does not check indices: sizes that do not fit would run past an array, not raise.
    if out.size != x.size:
        raise ValueError(f"activate: out {out.shape} does not fit x {x.shape}")
    return partial(_elementwise, x, _NO_OPERAND, out, act)


@entry
def add(a, b, out, act) -> Callable[[], None]:
    """out = act(a + b), elementwise, same shapes; ``out`` may be ``a`` or ``b``."""
    # Numba does not check indices: sizes that do not fit would run past an array, not raise.
    if not a.size == b.size == out.size:
        raise ValueError(f"add: shapes do not fit: {a.shape} + {b.shape} -> {out.shape}")
    return partial(_elementwise, a, b, out, act)


@njit(parallel=True, cache=True)
def _elementwise(a, b, out, act):
    """out = act(a + b), or act(a) where ``b`` is empty (``_NO_OPERAND``), elementwise; ``out`` may be ``a`` or
    ``b``. Blocks of 16384 values spread over Numba's threads; the choice of form is made per block, outside
    the loop over its values."""
    af = a.reshape(-1)
    bf = b.reshape(-1)
    of = out.reshape(-1)
    n = af.shape[0]
    block = 16384
    for blk in prange((n + block - 1) // block):
        lo, hi = blk * block, min(n, (blk + 1) * block)
        if bf.shape[0] == 0:
            for i in range(lo, hi):
                of[i] = apply_activation(af[i], act)
        else:
            for i in range(lo, hi):
                of[i] = apply_activation(af[i] + bf[i], act)


@entry
def softmax(x, out) -> Callable[[], None]:
    """Softmax over the last axis of a 2-D [N, classes] array; ``out`` may be ``x`` (see _softmax)."""
    if x.ndim != 2 or out.shape != x.shape or x.shape[1] == 0:
        raise ValueError(f"softmax: x {x.shape} and out {out.shape} must be the same 2-D shape")
    return partial(_softmax, x, out)


@njit(cache=True)
def _softmax(x, out):
    """Softmax over the last axis of a 2-D [N, classes] array, as reference.softmax computes it.

    exp(x - max) / sum(exp(x - max)), the sum accumulated in float32 left to right (NumPy sums
    pairwise; for 1000 classes of values in (0, 1] the two differ by a few ulps).
    """
    n, k = x.shape
    for i in range(n):
        m = x[i, 0]
        for j in range(1, k):
            m = max(m, x[i, j])
        s = _ZERO
        for j in range(k):
            e = np.exp(x[i, j] - m)
            out[i, j] = e
            s += e
        for j in range(k):
            out[i, j] = out[i, j] / s
