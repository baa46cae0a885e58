"""Convolutions: Conv2D (the stem, the 1x1 expand/project layers), DepthwiseConv2D, SeparableConv2D."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from npmobile.errors import UnsupportedLayerError
from npmobile.kernels import reference as ref
from npmobile.ops.activation import apply_activation, epilogue_code, validate_activation
from npmobile.ops.common import bias_or_zeros, conv_padding, pair, pixels, spatial_output
from npmobile.ops.record import Binder, LayerType, register

if TYPE_CHECKING:
    from npmobile.nodes import Node


def _with_bias(shapes: dict, config: dict, channels) -> dict:
    if config.get("use_bias", True):
        shapes["bias"] = (channels,)
    return shapes


def window(node: Node, in_hw, kernel_hw) -> tuple[tuple[int, int], tuple[int, int], tuple]:
    """A convolution's strides, dilation and explicit padding, from its config and its input's size."""
    strides = pair(node.config.get("strides", 1))
    dilation = pair(node.config.get("dilation_rate", 1))
    return strides, dilation, conv_padding(node, in_hw, kernel_hw, strides, dilation)


# --------------------------------------------------------------------------------------------------
# Conv2D
# --------------------------------------------------------------------------------------------------


def conv2d_weights(config: dict, in_channels: int | None) -> dict[str, tuple]:
    kh, kw = pair(config["kernel_size"])
    return _with_bias({"kernel": (kh, kw, in_channels, int(config["filters"]))}, config, int(config["filters"]))


def conv2d_validate(node: Node, keras_version: int) -> None:
    if int(node.config.get("groups", 1) or 1) != 1:
        raise UnsupportedLayerError(f"layer {node.name!r}: grouped Conv2D (groups={node.config['groups']}) "
                                    "is not supported")
    validate_activation(node, keras_version)


def conv_output_shape(node: Node, inputs: list) -> tuple:
    c = node.config
    x = next(s for s in inputs if s is not None)
    h, w = spatial_output(node, x, pair(c["kernel_size"]), pair(c.get("strides", 1)), pair(c.get("dilation_rate", 1)))
    channels = x[-1] * int(c.get("depth_multiplier", 1)) if node.op == "DepthwiseConv2D" else int(c["filters"])
    return (None, h, w, channels)


def conv2d_reference(node: Node, inputs, keras_version: int) -> np.ndarray:
    x = inputs[0]
    if "input_scale" in node.config:  # a Rescaling folded in by the passes: it comes before the padding
        x = ref.rescale(x, node.config["input_scale"], node.config["input_offset"])
    kernel = node.weights["kernel"]
    strides, dilation, padding = window(node, x.shape[1:3], kernel.shape[:2])
    bias = node.weights.get("bias")
    if kernel.shape[:2] == (1, 1) and strides == (1, 1) and padding == ref.NO_PADDING:
        y = ref.pointwise_conv2d(x, kernel[0, 0], bias)
    else:
        y = ref.conv2d(x, kernel, bias, strides, padding, dilation)
    if node.config.get("residual"):  # set by the residual-add fusion pass: Keras adds after the bias
        y = y + inputs[1]
    return apply_activation(y, node, keras_version)


def input_rescaling(node: Node) -> tuple[float, float]:
    """(scale, offset) of the Rescaling the passes folded into the convolution's input; (1.0, 0.0) without one."""
    return node.config.get("input_scale", 1.0), node.config.get("input_offset", 0.0)


def conv2d_prepare(node: Node, in_shapes, out_shape, keras_version: int) -> Binder | None:
    from npmobile.kernels import huge_pages
    from npmobile.kernels.conv import conv2d, fits_indirection, indirection_table
    from npmobile.kernels.gemm import INDIRECT_TILES, pack
    from npmobile.kernels.pointwise import pointwise_conv2d, prepare_weights

    kernel = node.weights["kernel"]
    strides = pair(node.config.get("strides", 1))
    dilation = pair(node.config.get("dilation_rate", 1))
    padding = conv_padding(node, in_shapes[0][1:3], kernel.shape[:2], strides, dilation)
    act = epilogue_code(node, keras_version)
    if act is None:
        return None
    residual = bool(node.config.get("residual"))
    bias = bias_or_zeros(node, kernel.shape[3])
    scale, offset = input_rescaling(node)
    rescaled_input = (scale, offset) != (1.0, 0.0)
    if kernel.shape[:2] == (1, 1) and strides == (1, 1) and padding == ref.NO_PADDING and not rescaled_input:
        w = prepare_weights(kernel[0, 0], bias, int(np.prod(out_shape[:3])))  # packed once per plan

        def bind_pointwise(args, out):
            return pointwise_conv2d.bind(args[0], w, bias, out, act, args[1] if residual else None)

        return bind_pointwise
    if residual:
        return None
    (top, _), (left, _) = padding
    k4 = np.ascontiguousarray(kernel)
    packed = prepare_weights(k4.reshape(-1, k4.shape[3]), bias, int(np.prod(out_shape[:3])))
    packed = None if isinstance(packed, np.ndarray) else packed  # the microkernel's weights, packed once
    # Scratch and the indirection table, made once per plan (one prediction runs at a time:
    # interpreter._RUN_LOCK): the indirect GEMM's table and rescaled copy, or im2col's patch matrix.
    x_shape = in_shapes[0]
    table = patches = rescaled = None
    if packed is not None and fits_indirection(x_shape):
        if packed.tile not in INDIRECT_TILES:  # the indirect product has fewer tiles (kernels/gemm_rules.py)
            packed = pack(k4.reshape(-1, k4.shape[3]), bias, int(np.prod(out_shape[:3])), INDIRECT_TILES[0])
        (_, h, w, cin), (_, oh, ow, _) = x_shape, out_shape
        table = indirection_table(h, w, cin, oh, ow, *kernel.shape[:2], *strides, top, left, *dilation,
                                  packed.tile.mr)
        rescaled = huge_pages.zeros(int(np.prod(x_shape))) if rescaled_input else None
    else:
        patches = huge_pages.zeros(int(np.prod(out_shape[:3])) * int(np.prod(kernel.shape[:3])))

    def bind_conv(args, out):
        return conv2d.bind(args[0], k4, bias, out, strides[0], strides[1], top, left, act, dilation[0], dilation[1],
                           scale, offset, patches, packed, table, rescaled)

    return bind_conv


def conv2d_macs(node: Node, in_shape: tuple, out_shape: tuple) -> int:
    kh, kw, cin, cout = node.weights["kernel"].shape if "kernel" in node.weights else (
        *pair(node.config["kernel_size"]), in_shape[-1], out_shape[-1])
    return pixels(out_shape) * kh * kw * cin * cout


def conv2d_kind(node: Node) -> str:
    kernel = node.weights.get("kernel")
    return "pointwise" if kernel is not None and kernel.shape[:2] == (1, 1) else "conv"


# --------------------------------------------------------------------------------------------------
# DepthwiseConv2D
# --------------------------------------------------------------------------------------------------


def depthwise_weights(config: dict, in_channels: int | None) -> dict[str, tuple]:
    kh, kw = pair(config["kernel_size"])
    m = int(config.get("depth_multiplier", 1))
    return _with_bias({"depthwise_kernel": (kh, kw, in_channels, m)}, config,
                      None if in_channels is None else in_channels * m)


def depthwise_reference(node: Node, inputs, keras_version: int) -> np.ndarray:
    x = inputs[0]
    kernel = node.weights["depthwise_kernel"]
    strides, dilation, padding = window(node, x.shape[1:3], kernel.shape[:2])
    y = ref.depthwise_conv2d(x, kernel, node.weights.get("bias"), strides, padding, dilation)
    return apply_activation(y, node, keras_version)


def depthwise_prepare(node: Node, in_shapes, out_shape, keras_version: int) -> Binder | None:
    from npmobile.kernels import huge_pages
    from npmobile.kernels.depthwise import depthwise_conv2d

    kernel = node.weights["depthwise_kernel"]
    act = epilogue_code(node, keras_version)
    if kernel.shape[3] != 1 or act is None or pair(node.config.get("dilation_rate", 1)) != (1, 1):
        return None
    strides = pair(node.config.get("strides", 1))
    (top, _), (left, _) = conv_padding(node, in_shapes[0][1:3], kernel.shape[:2], strides, (1, 1))
    k3 = huge_pages.copy(kernel[:, :, :, 0])
    bias = bias_or_zeros(node, k3.shape[2])

    def bind(args, out):
        return depthwise_conv2d.bind(args[0], k3, bias, out, strides[0], strides[1], top, left, act)

    return bind


def depthwise_macs(node: Node, in_shape: tuple, out_shape: tuple) -> int:
    kh, kw = pair(node.config["kernel_size"])
    return pixels(out_shape) * kh * kw * out_shape[-1]  # each output channel reads one input channel


# --------------------------------------------------------------------------------------------------
# SeparableConv2D: depthwise, then 1x1, in one layer
# --------------------------------------------------------------------------------------------------


def separable_weights(config: dict, in_channels: int | None) -> dict[str, tuple]:
    kh, kw = pair(config["kernel_size"])
    m = int(config.get("depth_multiplier", 1))
    shapes = {
        "depthwise_kernel": (kh, kw, in_channels, m),
        "pointwise_kernel": (1, 1, None if in_channels is None else in_channels * m, int(config["filters"])),
    }
    return _with_bias(shapes, config, int(config["filters"]))


def separable_reference(node: Node, inputs, keras_version: int) -> np.ndarray:
    x = inputs[0]
    depthwise = node.weights["depthwise_kernel"]
    strides, dilation, padding = window(node, x.shape[1:3], depthwise.shape[:2])
    y = ref.depthwise_conv2d(x, depthwise, None, strides, padding, dilation)
    y = ref.pointwise_conv2d(y, node.weights["pointwise_kernel"][0, 0], node.weights.get("bias"))
    return apply_activation(y, node, keras_version)


def separable_macs(node: Node, in_shape: tuple, out_shape: tuple) -> int:
    kh, kw = pair(node.config["kernel_size"])
    mid = in_shape[-1] * int(node.config.get("depth_multiplier", 1))
    return pixels(out_shape) * (kh * kw * mid + mid * out_shape[-1])


def conv2d_first_run_kernels(node: Node) -> dict:
    rescaled = input_rescaling(node) != (1.0, 0.0)
    return {"rescaled_input": True} if rescaled else {}  # a Rescaling folded in: the rescaled copy of the input


def depthwise_first_run_kernels(node: Node) -> dict:
    kernel = node.weights.get("depthwise_kernel")  # a row kernel of its window's size (kernels/depthwise.py)
    return {} if kernel is None else {"depthwise_sizes": (int(kernel.shape[0]),)}


register(
    LayerType(name="Conv2D", reference=conv2d_reference, output_shape=conv_output_shape, weights=conv2d_weights,
              validate=conv2d_validate, prepare=conv2d_prepare, macs=conv2d_macs, kind=conv2d_kind,
              aliases=("Convolution2D",), window="convolution", activation=True,
              first_run_kernels=conv2d_first_run_kernels),
    LayerType(name="DepthwiseConv2D", reference=depthwise_reference, output_shape=conv_output_shape,
              weights=depthwise_weights, validate=validate_activation, prepare=depthwise_prepare,
              macs=depthwise_macs, kind=lambda node: "depthwise", window="depthwise", activation=True,
              first_run_kernels=depthwise_first_run_kernels),
    LayerType(name="SeparableConv2D", reference=separable_reference, output_shape=conv_output_shape,
              weights=separable_weights, validate=validate_activation, macs=separable_macs,
              kind=lambda node: "conv", aliases=("SeparableConvolution2D",), window="separable", activation=True),
)
