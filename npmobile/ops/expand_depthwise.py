"""ExpandDepthwise: a 1x1 Conv2D and the DepthwiseConv2D that alone reads it, as one node (made by the
fusion pass, never read from a file): the expand and depthwise layers of an inverted residual block.

The node keeps both layers' configs (``expand``, ``depthwise``) and weights, and means exactly the two
layers in a row: its reference runs their records' references. The fast path computes the 1x1 layer a
few rows at a time into a band that stays in cache, instead of writing its whole output
(kernels/expand_depthwise.py), with the same bits as the two kernels one after the other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from npmobile.ops.common import bias_or_zeros, conv_padding, pair, pixels
from npmobile.ops.record import Binder, LayerType, register

if TYPE_CHECKING:
    from npmobile.nodes import Node

def _as_node(node: Node, part: str) -> Node:
    """One of the two layers, as the node the pass took it from."""
    from npmobile.nodes import Node

    names = node.config["keras_names"][part]
    if part == "expand":
        weights = {"kernel": node.weights["expand_kernel"]}
        if "expand_bias" in node.weights:
            weights["bias"] = node.weights["expand_bias"]
        return Node(names[0], "Conv2D", node.config["expand"], [], weights, list(names))
    weights = {"depthwise_kernel": node.weights["depthwise_kernel"]}
    if "bias" in node.weights:
        weights["bias"] = node.weights["bias"]
    return Node(names[0], "DepthwiseConv2D", node.config["depthwise"], [], weights, list(names))


def expand_depthwise_reference(node: Node, inputs, keras_version: int) -> np.ndarray:
    from npmobile.ops.convolution import conv2d_reference, depthwise_reference

    y = conv2d_reference(_as_node(node, "expand"), inputs, keras_version)
    return depthwise_reference(_as_node(node, "depthwise"), [y], keras_version)


def expand_depthwise_output_shape(node: Node, inputs: list) -> tuple:
    from npmobile.ops.convolution import conv_output_shape

    x = next(s for s in inputs if s is not None)
    expanded = (*x[:3], int(node.weights["expand_kernel"].shape[3]))
    return conv_output_shape(_as_node(node, "depthwise"), [expanded])


def expand_depthwise_prepare(node: Node, in_shapes, out_shape, keras_version: int) -> Binder | None:
    from npmobile.kernels import huge_pages
    from npmobile.kernels.expand_depthwise import TILE, expand_depthwise, fits, scratch_for
    from npmobile.kernels.gemm import pack
    from npmobile.kernels.threads import max_threads
    from npmobile.ops.activation import epilogue_code

    expand, depthwise = _as_node(node, "expand"), _as_node(node, "depthwise")
    expand_act, act = epilogue_code(expand, keras_version), epilogue_code(depthwise, keras_version)
    (_, h, w, _), (_, oh, _, c) = in_shapes[0], out_shape
    k = depthwise.weights["depthwise_kernel"].shape[0]
    strides = pair(depthwise.config.get("strides", 1))
    (top, _), (left, _) = conv_padding(depthwise, (h, w), (k, k), strides, (1, 1))
    if expand_act is None or act is None or not fits(k, h, w, oh, strides[0], top, expand_act, act):
        return None
    kernel = expand.weights["kernel"][0, 0]
    packed = pack(kernel, bias_or_zeros(expand, kernel.shape[1]), 0, TILE)
    dw_kernel = huge_pages.copy(depthwise.weights["depthwise_kernel"][:, :, :, 0])
    bias = bias_or_zeros(depthwise, c)
    scratch = scratch_for(max_threads(), w, c, k, strides[0])  # made once per plan (one run at a time)

    def bind(args, out):
        return expand_depthwise.bind(args[0], packed, expand_act, dw_kernel, bias, out, strides[0], strides[1], top,
                                     left, act, scratch)

    return bind


def expand_depthwise_macs(node: Node, in_shape: tuple, out_shape: tuple) -> int:
    k = node.weights["depthwise_kernel"].shape
    cin, c = node.weights["expand_kernel"].shape[2:]
    return pixels(in_shape) * cin * c + pixels(out_shape) * k[0] * k[1] * c


def expand_depthwise_first_run_kernels(node: Node) -> dict:
    return {"expand_depthwise_sizes": (int(node.weights["depthwise_kernel"].shape[0]),)}  # the fused driver's


register(LayerType(name="ExpandDepthwise", reference=expand_depthwise_reference,
                   output_shape=expand_depthwise_output_shape, prepare=expand_depthwise_prepare,
                   macs=expand_depthwise_macs, kind=lambda node: "expand+dw", from_files=False,
                   first_run_kernels=expand_depthwise_first_run_kernels))
