"""Rules several layer types share: integer pairs, Keras padding, channels_last, biases."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from npmobile.errors import ModelFileError, UnsupportedLayerError
from npmobile.kernels import reference as ref

if TYPE_CHECKING:
    from npmobile.nodes import Node


def pair(value) -> tuple[int, int]:
    """Keras's int-or-pair arguments (kernel_size=3, strides=(2, 2), padding=((0, 1), ...)) as a pair."""
    if isinstance(value, (list, tuple)):
        return (int(value[0]), int(value[-1]))
    return (int(value), int(value))


def conv_padding(node: Node, in_hw: tuple[int, int], kernel_hw, strides, dilation) -> ref.Padding:
    """Explicit ((top, bottom), (left, right)) padding for a conv or pooling node."""
    padding = node.config.get("padding", "valid")
    if isinstance(padding, (list, tuple)):  # already explicit (the ZeroPadding2D fusion pass writes it)
        return tuple(tuple(int(v) for v in p) for p in padding)
    if padding == "valid":
        return ref.NO_PADDING
    if padding == "same":
        return (
            ref.same_padding(in_hw[0], kernel_hw[0], strides[0], dilation[0]),
            ref.same_padding(in_hw[1], kernel_hw[1], strides[1], dilation[1]),
        )
    raise UnsupportedLayerError(f"layer {node.name!r}: padding {padding!r} is not supported")


def window_output_size(size, kernel: int, stride: int, dilation: int, padding, axis: int):
    """Output positions along one axis for a config's padding ("same", "valid" or explicit pairs)."""
    if size is None:
        return None
    if padding == "same":
        pad = ref.same_padding(size, kernel, stride, dilation)
    else:
        pad = (0, 0) if padding == "valid" else tuple(padding[axis])
    return ref.conv_output_size(size, kernel, stride, pad, dilation)


def spatial_output(node: Node, shape: tuple, kernel_hw, strides, dilation) -> tuple:
    padding = node.config.get("padding", "valid")
    return tuple(window_output_size(shape[1 + a], kernel_hw[a], strides[a], dilation[a], padding, a) for a in (0, 1))


def check_channels_last(node: Node) -> None:
    fmt = node.config.get("data_format")
    if fmt not in (None, "channels_last"):
        raise UnsupportedLayerError(f"layer {node.name!r} uses data_format={fmt!r}; npmobile runs channels_last")


def bias_or_zeros(node: Node, channels: int) -> np.ndarray:
    bias = node.weights.get("bias")
    """The layer's bias (zeros when it has none), where the kernels read their weights from (huge pages)."""
    from npmobile.kernels import huge_pages  # the engine's memory; the readers, which import this file, need none

    return huge_pages.zeros(channels) if bias is None else huge_pages.copy(bias)


def pixels(shape: tuple) -> int:
    """Output positions per image: H * W for a feature map, 1 for a vector."""
    count = 1
    for d in shape[1:-1]:
        if d is None:
            raise ValueError("unknown spatial size")
        count *= int(d)
    return count


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
