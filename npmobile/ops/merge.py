"""Merging layers: Add (residual connections; constant adds from op nodes and TFOpLambda), Multiply,
Concatenate. A constant operand is a number or a per-channel vector (npmobile.ops.arithmetic)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from npmobile.errors import ModelFileError
from npmobile.ops import Binder, LayerType, register

if TYPE_CHECKING:
    from npmobile.graph import Node


def broadcast_shape(node: Node, inputs: list) -> tuple:
    """NumPy broadcasting of the tensor inputs' shapes (scalars take no part)."""
    shapes = [s for s in inputs if s is not None]
    rank = max(len(s) for s in shapes)
    out = []
    for axis in range(rank):
        dims = {s[axis - rank + len(s)] for s in shapes if axis - rank + len(s) >= 0} - {1}
        known = {d for d in dims if d is not None}
        if len(known) > 1:
            raise ModelFileError(f"layer {node.name!r} ({node.op}) combines tensors of shapes {shapes}")
        out.append(known.pop() if known else (None if None in dims else 1))
    return (None, *out[1:])


def add_reference(node: Node, inputs, keras_version: int) -> np.ndarray:
    from npmobile.ops.arithmetic import binary_reference

    return binary_reference(np.add)(node, inputs, keras_version)


def add_prepare(node: Node, in_shapes, out_shape, keras_version: int) -> Binder | None:
    """The Add merge layer of two same-shaped tensors (no broadcasting); a tensor plus a constant as one
    NumPy call."""
    from npmobile.kernels import activations as act_kernels
    from npmobile.ops.arithmetic import ufunc_prepare

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
    from npmobile.ops.arithmetic import binary_reference

    return binary_reference(np.multiply)(node, inputs, keras_version)


def multiply_prepare(node: Node, in_shapes, out_shape, keras_version: int) -> Binder | None:
    from npmobile.ops.arithmetic import ufunc_prepare

    return ufunc_prepare(np.multiply)(node, in_shapes, out_shape, keras_version)


def _elementwise_shape(node: Node, inputs: list) -> tuple:
    from npmobile.ops.arithmetic import elementwise_shape

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
    LayerType("Add", add_reference, _elementwise_shape, prepare=add_prepare),
    LayerType("Multiply", multiply_reference, _elementwise_shape, prepare=multiply_prepare),
    LayerType("Concatenate", concatenate_reference, concatenate_output_shape),
)
