"""Elementwise arithmetic as data: the op nodes Keras 3 writes for ``x / 127.5 - 1`` (``TrueDivide``,
``Divide``, ``Subtract``, ``Negative``, ``Cast``; ``Add`` and ``Multiply`` live in merge.py) and the
TFOpLambda layers tf_keras writes for the same (npmobile.io.config maps them here).

An operand is a tensor (a node's name) or a constant: a number, or a per-channel vector (a tuple of
floats, as ``preprocess_input``'s 'torch' mode writes its mean and std). The constant may stand on
either side (``1 - x``, ``255 / x``); the inputs keep the order Keras wrote. Constants are float32
values, as Keras converts them before computing, and every operation is one IEEE float32 operation,
so the answers are Keras's bit for bit.

A division by a constant is a multiplication by the constant's float32 reciprocal: that is what Keras's
``predict`` computes (TensorFlow's graph optimizer rewrites ``x / c`` so when it builds the predict
function; measured on Keras 3.15 and tf_keras 2.21, pinned in tests/test_transfer.py), and it differs
from an IEEE division in the last bit for about half the pixels. ``x / 127.5 - 1`` is then exactly a
Rescaling, which the stem convolution reads (npmobile.passes).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from npmobile.errors import ModelFileError, UnsupportedLayerError
from npmobile.ops.common import broadcast_shape
from npmobile.ops.record import Binder, LayerType, register
from npmobile.ops.reshaping import identity_reference

if TYPE_CHECKING:
    from npmobile.nodes import Node


def operand(value, dtype) -> np.ndarray | float:
    """A node's input as NumPy computes with it: arrays as they are, a constant as a ``dtype`` value
    (a vector broadcasts over the last axis, the channels)."""
    if isinstance(value, np.ndarray):
        return value
    return np.asarray(value, dtype=np.float32).astype(dtype)


def constants(node: Node) -> list:
    return [i for i in node.inputs if not isinstance(i, str)]


def with_constant(node: Node) -> bool:
    """Whether one operand is a constant (``x / 127.5``, ``x - mean``): arithmetic on pixel values, as a
    model's own preprocessing writes it, not between two tensors."""
    return bool(constants(node))


def elementwise_shape(node: Node, inputs: list) -> tuple:
    """Broadcasting of the tensors; a vector constant must hold one value per channel (or one value)."""
    shape = broadcast_shape(node, inputs)
    for constant in constants(node):
        if isinstance(constant, tuple) and shape[-1] is not None and len(constant) not in (1, shape[-1]):
            raise ModelFileError(f"layer {node.name!r} ({node.op}): a constant of {len(constant)} values does "
                                 f"not fit {shape[-1]} channels")
    return shape


def _dtype_of(inputs) -> np.dtype:
    return next(i.dtype for i in inputs if isinstance(i, np.ndarray))


def binary_reference(function):
    """The reference of an elementwise op: ``function`` applied left to right over the inputs, constants
    as float32 values (widened to the tensors' dtype on the float64 reference path)."""

    def reference(node: Node, inputs, keras_version: int) -> np.ndarray:
        dtype = _dtype_of(inputs)
        y = operand(inputs[0], dtype)
        for other in inputs[1:]:
            y = function(y, operand(other, dtype))
        return np.asarray(y, dtype=dtype)

    return reference


def ufunc_prepare(function):
    """The fast path of an elementwise op: one NumPy ufunc call writing into the plan's buffer."""

    def prepare(node: Node, in_shapes, out_shape, keras_version: int) -> Binder | None:
        if len(node.inputs) != 2 or all(isinstance(i, str) for i in node.inputs):
            return None
        constant = next(i for i in node.inputs if not isinstance(i, str))
        if tuple(next(s for s in in_shapes)) != tuple(out_shape):
            return None
        value = operand(constant, np.float32)
        tensor_first = isinstance(node.inputs[0], str)

        def bind(args, out):
            x = next(a for a in args if isinstance(a, np.ndarray))
            if tensor_first:
                return lambda: function(x, value, out=out)
            return lambda: function(value, x, out=out)

        return bind

    return prepare


def divisor_constant(node: Node):
    """The constant ``x`` is divided by, if the node is ``x / constant`` (else None: ``255 / x``, x / y)."""
    if len(node.inputs) == 2 and isinstance(node.inputs[0], str) and not isinstance(node.inputs[1], str):
        return node.inputs[1]
    return None


def reciprocal(constant) -> float | tuple:
    """A divisor's float32 reciprocal, as TensorFlow folds it (1 / c computed in float32)."""
    values = np.float32(1.0) / np.asarray(constant, dtype=np.float32)
    return float(values) if values.ndim == 0 else tuple(float(v) for v in values)


def divide_reference(node: Node, inputs, keras_version: int) -> np.ndarray:
    divisor = divisor_constant(node)
    if divisor is not None:  # Keras's predict: x * float32(1 / c)
        return binary_reference(np.multiply)(node, [inputs[0], reciprocal(divisor)], keras_version)
    return binary_reference(np.divide)(node, inputs, keras_version)


def divide_prepare(node: Node, in_shapes, out_shape, keras_version: int) -> Binder | None:
    divisor = divisor_constant(node)
    if divisor is None:
        return ufunc_prepare(np.divide)(node, in_shapes, out_shape, keras_version)
    as_product = replace(node, inputs=[node.inputs[0], reciprocal(divisor)])
    return ufunc_prepare(np.multiply)(as_product, in_shapes, out_shape, keras_version)


def negative_reference(node: Node, inputs, keras_version: int) -> np.ndarray:
    return np.negative(inputs[0])


def _check_one_tensor(node: Node, keras_version: int) -> None:
    if len(node.inputs) != 1 or not isinstance(node.inputs[0], str):
        raise ModelFileError(f"layer {node.name!r} ({node.op}) takes one tensor, given {len(node.inputs)} inputs")


def cast_validate(node: Node, keras_version: int) -> None:
    _check_one_tensor(node, keras_version)
    dtype = node.config.get("dtype")
    if dtype != "float32":
        raise UnsupportedLayerError(f"layer {node.name!r} casts to {dtype!r}; npmobile runs float32 models and "
                                    "reads only a cast to float32 (the identity)")


register(
    LayerType(name="Subtract", reference=binary_reference(np.subtract), output_shape=elementwise_shape,
              prepare=ufunc_prepare(np.subtract), preprocessing=with_constant),
    LayerType(name="TrueDivide", reference=divide_reference, output_shape=elementwise_shape, prepare=divide_prepare,
              aliases=("Divide",), preprocessing=with_constant),
    LayerType(name="Negative", reference=negative_reference, validate=_check_one_tensor, preprocessing=True),
    LayerType(name="Cast", reference=identity_reference, validate=cast_validate, identity=True),
)
