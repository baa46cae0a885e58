"""Pooling: global average (the head of every MobileNet) and max, windowed average and max."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from npmobile.kernels import reference as ref
from npmobile.ops.common import check_channels_last, conv_padding, pair, spatial_output
from npmobile.ops.record import Binder, LayerType, register

if TYPE_CHECKING:
    from npmobile.nodes import Node


def global_pool_output_shape(node: Node, inputs: list) -> tuple:
    x = next(s for s in inputs if s is not None)
    return (None, 1, 1, x[-1]) if node.config.get("keepdims") else (None, x[-1])


def global_average_pool_reference(node: Node, inputs, keras_version: int) -> np.ndarray:
    check_channels_last(node)
    return ref.global_average_pool(inputs[0], bool(node.config.get("keepdims", False)))


def global_average_pool_prepare(node: Node, in_shapes, out_shape, keras_version: int) -> Binder | None:
    from npmobile.kernels.pooling import global_average_pool

    if node.config.get("data_format") not in (None, "channels_last") or len(in_shapes[0]) != 4:
        return None

    def bind(args, out):
        return global_average_pool.bind(args[0], out.reshape(out.shape[0], out.shape[-1]))

    return bind


def global_max_pool_reference(node: Node, inputs, keras_version: int) -> np.ndarray:
    check_channels_last(node)
    return ref.global_max_pool(inputs[0], bool(node.config.get("keepdims", False)))


def _window(node: Node) -> tuple[tuple[int, int], tuple[int, int]]:
    pool = pair(node.config.get("pool_size", 2))
    strides = node.config.get("strides")
    return pool, pool if strides is None else pair(strides)


def pool_output_shape(node: Node, inputs: list) -> tuple:
    x = next(s for s in inputs if s is not None)
    pool, strides = _window(node)
    h, w = spatial_output(node, x, pool, strides, (1, 1))
    return (None, h, w, x[-1])


def _pool_params(node: Node, x: np.ndarray):
    check_channels_last(node)
    pool, strides = _window(node)
    return pool, strides, conv_padding(node, x.shape[1:3], pool, strides, (1, 1))


def average_pool_reference(node: Node, inputs, keras_version: int) -> np.ndarray:
    pool, strides, padding = _pool_params(node, inputs[0])
    return ref.average_pool2d(inputs[0], pool, strides, padding)


def max_pool_reference(node: Node, inputs, keras_version: int) -> np.ndarray:
    pool, strides, padding = _pool_params(node, inputs[0])
    return ref.max_pool2d(inputs[0], pool, strides, padding)


register(
    LayerType(name="GlobalAveragePooling2D", reference=global_average_pool_reference,
              output_shape=global_pool_output_shape, prepare=global_average_pool_prepare,
              aliases=("GlobalAvgPool2D",), global_pool="average"),
    LayerType(name="GlobalMaxPooling2D", reference=global_max_pool_reference, output_shape=global_pool_output_shape,
              aliases=("GlobalMaxPool2D",), global_pool="max"),
    LayerType(name="AveragePooling2D", reference=average_pool_reference, output_shape=pool_output_shape,
              aliases=("AvgPool2D",), window="pool"),
    LayerType(name="MaxPooling2D", reference=max_pool_reference, output_shape=pool_output_shape,
              aliases=("MaxPool2D",), window="pool"),
)
