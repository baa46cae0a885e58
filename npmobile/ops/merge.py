"""Merging layers: Add (residual connections; constant adds from op nodes and TFOpLambda), Multiply,
Concatenate. A constant operand is a number or a per-channel vector (npmobile.ops.arithmetic)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from npmobile.ops.arithmetic import binary_reference, elementwise_shape, ufunc_prepare, with_constant
from npmobile.ops.record import Binder, LayerType, register

if TYPE_CHECKING:
    from npmobile.nodes import Node


def add_reference(node: Node, inputs, keras_version: int) -> np.ndarray:
    return binary_reference(np.add)(node, inputs, keras_version)


def add_prepare(node: Node, in_shapes, out_shape, keras_version: int) -> Binder | None:
    """The Add merge layer of two same-shaped tensors (no broadcasting); a tensor plus a constant as one
    NumPy call."""
    from npmobile.kernels import activations as act_kernels

    if len(node.inputs) != 2:
        return None
    if not all(isinstance(i, str) for i in node.inputs):
        return ufunc_prepare(np.add)(node, in_shapes, out_shape, keras_version)
    if any(tuple(s) != tuple(out_shape) for s in in_shapes):
        return None

    def bind(args, out):
        return act_kernels.add.bind(args[0], args[1], out, act_kernels.ACT_NONE)

    return bind


def multiply_reference(node: Node, inputs, keras_version: int) -> np.ndarray:
    return binary_reference(np.multiply)(node, inputs, keras_version)


def multiply_prepare(node: Node, in_shapes, out_shape, keras_version: int) -> Binder | None:

    return ufunc_prepare(np.multiply)(node, in_shapes, out_shape, keras_version)


def _elementwise_shape(node: Node, inputs: list) -> tuple:

    return elementwise_shape(node, inputs)


def concatenate_output_shape(node: Node, inputs: list) -> tuple:
    x = next(s for s in inputs if s is not None)
    axis = int(node.config.get("axis", -1))
    out = list(x)
    out[axis] = None if any(s[axis] is None for s in inputs) else sum(s[axis] for s in inputs)
    return tuple(out)


def concatenate_reference(node: Node, inputs, keras_version: int) -> np.ndarray:
    return np.concatenate(inputs, axis=int(node.config.get("axis", -1)))


register(
    LayerType(name="Add", reference=add_reference, output_shape=_elementwise_shape, prepare=add_prepare,
              preprocessing=with_constant),
    LayerType(name="Multiply", reference=multiply_reference, output_shape=_elementwise_shape,
              prepare=multiply_prepare, multiplies=True, preprocessing=with_constant),
    LayerType(name="Concatenate", reference=concatenate_reference, output_shape=concatenate_output_shape),
)
