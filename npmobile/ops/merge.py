"""Merging layers: Add (residual connections; scalar adds from TFOpLambda), Multiply, Concatenate."""

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
    y = inputs[0]
    for other in inputs[1:]:
        y = y + other  # a scalar operand is a Python float: NumPy rounds it to y's dtype
    return y


def add_prepare(node: Node, in_shapes, out_shape, keras_version: int) -> Binder | None:
    """The Add merge layer of two same-shaped tensors (no broadcasting, no scalars)."""
    from npmobile.kernels import activations as act_kernels

    if len(node.inputs) != 2 or not all(isinstance(i, str) for i in node.inputs):
        return None
    if any(tuple(s) != tuple(out_shape) for s in in_shapes):
        return None

    def bind(args, out):
        return act_kernels.add.bind(args[0], args[1], out, act_kernels.ACT_NONE)

    return bind


def multiply_reference(node: Node, inputs, keras_version: int) -> np.ndarray:
    y = inputs[0]
    for other in inputs[1:]:
        y = y * other
    return y


def concatenate_output_shape(node: Node, inputs: list) -> tuple:
    x = next(s for s in inputs if s is not None)
    axis = int(node.config.get("axis", -1))
    out = list(x)
    out[axis] = None if any(s[axis] is None for s in inputs) else sum(s[axis] for s in inputs)
    return tuple(out)


def concatenate_reference(node: Node, inputs, keras_version: int) -> np.ndarray:
    return np.concatenate(inputs, axis=int(node.config.get("axis", -1)))


register(
    LayerType("Add", add_reference, broadcast_shape, prepare=add_prepare),
    LayerType("Multiply", multiply_reference, broadcast_shape),
    LayerType("Concatenate", concatenate_reference, concatenate_output_shape),
)
