"""Dense (the classifier), with its softmax when it has one."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from npmobile.kernels import reference as ref
from npmobile.ops.activation import apply_activation, epilogue_code, validate_activation
from npmobile.ops.common import bias_or_zeros, pixels
from npmobile.ops.record import Binder, LayerType, register

if TYPE_CHECKING:
    from npmobile.nodes import Node


def dense_weights(config: dict, in_channels: int | None) -> dict[str, tuple]:
    shapes = {"kernel": (in_channels, int(config["units"]))}
    if config.get("use_bias", True):
        shapes["bias"] = (int(config["units"]),)
    return shapes


def dense_output_shape(node: Node, inputs: list) -> tuple:
    x = next(s for s in inputs if s is not None)
    return (*x[:-1], int(node.config["units"]))


def dense_reference(node: Node, inputs, keras_version: int) -> np.ndarray:
    y = ref.dense(inputs[0], node.weights["kernel"], node.weights.get("bias"))
    return apply_activation(y, node, keras_version)


def dense_prepare(node: Node, in_shapes, out_shape, keras_version: int) -> Binder | None:
    from npmobile.kernels import activations as act_kernels
    from npmobile.kernels.entry import in_order
    from npmobile.kernels.pointwise import dense, prepare_weights

    softmax = node.config.get("activation") == "softmax"  # the classifier: product, then softmax in place
    act = act_kernels.ACT_NONE if softmax else epilogue_code(node, keras_version)
    if act is None or len(in_shapes[0]) != 2:
        return None
    bias = bias_or_zeros(node, node.weights["kernel"].shape[1])
    kernel = prepare_weights(node.weights["kernel"], bias, out_shape[0])  # packed once per plan

    def bind(args, out):
        product = dense.bind(args[0], kernel, bias, out, act)
        if not softmax:
            return product
        return in_order(product, act_kernels.softmax.bind(out, out))

    return bind


def dense_macs(node: Node, in_shape: tuple, out_shape: tuple) -> int:
    return pixels(out_shape) * in_shape[-1] * out_shape[-1]


register(LayerType(name="Dense", reference=dense_reference, output_shape=dense_output_shape, weights=dense_weights,
                   validate=validate_activation, prepare=dense_prepare, macs=dense_macs, kind=lambda node: "dense",
                   activation=True))
