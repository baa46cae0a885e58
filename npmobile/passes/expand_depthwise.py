"""Whether a 1x1 expansion and the depthwise layer after it become one ExpandDepthwise node, and that node.

The rule is the pass's (npmobile/passes/fuse.py calls it); what the fused node computes is its layer
record's (npmobile/ops/expand_depthwise.py).
"""

from __future__ import annotations

from npmobile.nodes import Node
from npmobile.ops.common import conv_padding, pair

# Activations both kernels apply on their registers (kernels/gemm_drivers.py on_registers,
# kernels/depthwise_rules.py VECTOR_ACTS), by their config names.
_ON_REGISTERS = (None, "linear", "relu", "relu6", "hard_swish", "hard_silu")

# When the pair is worth fusing (a fixed rule of the layers' shapes, so answers never depend on the machine;
# its measurements are in bench/README.md): the 1x1 layer's output per image does not fit a 1 MB L2 cache,
# and the 1x1 layer does few multiply-adds per value it writes (input channels), so that writing and
# re-reading it is what its time goes to. Where the output fits the L2, fusing loses: two threads recompute
# the rows their bands share.
MIN_EXPANDED_BYTES = 1024 * 1024
MAX_EXPAND_INPUT_CHANNELS = 24


def fused_node(expand: Node, depthwise: Node) -> Node:
    """The node standing for ``expand`` then ``depthwise`` (named as the depthwise layer, whose output it is)."""
    weights = {"expand_kernel": expand.weights["kernel"], "depthwise_kernel": depthwise.weights["depthwise_kernel"]}
    if "bias" in expand.weights:
        weights["expand_bias"] = expand.weights["bias"]
    if "bias" in depthwise.weights:
        weights["bias"] = depthwise.weights["bias"]
    config = {"expand": dict(expand.config), "depthwise": dict(depthwise.config),
              "keras_names": {"expand": list(expand.keras_names), "depthwise": list(depthwise.keras_names)}}
    return Node(depthwise.name, "ExpandDepthwise", config, list(expand.inputs), weights,
                list(expand.keras_names) + list(depthwise.keras_names))


def worth_fusing(expand: Node, depthwise: Node, in_shape: tuple) -> bool:
    """Whether the pass should make one node of these two (``in_shape``: the 1x1 layer's input, NHWC).

    The pair must be one the fast kernel runs (1x1 stride 1 unpadded, then a square 3x3 or 5x5
    depthwise window with multiplier 1, no dilation, padding no taller than the window, activations
    applied on the registers) and worth it by the rule above.
    """
    e, d = expand.config, depthwise.config
    kernel = expand.weights.get("kernel")
    dw = depthwise.weights.get("depthwise_kernel")
    if (kernel is None or dw is None or kernel.ndim != 4 or dw.ndim != 4 or kernel.shape[:2] != (1, 1)
            or any(v is None for v in in_shape[1:])):
        return False
    if (pair(e.get("strides", 1)) != (1, 1) or pair(e.get("dilation_rate", 1)) != (1, 1)
            or e.get("padding", "valid") not in ("valid", "same") or e.get("residual") or "input_scale" in e
            or int(e.get("groups", 1) or 1) != 1 or e.get("activation") not in _ON_REGISTERS):
        return False
    k = dw.shape[0]
    if (dw.shape[1] != k or k not in (3, 5) or dw.shape[3] != 1 or pair(d.get("dilation_rate", 1)) != (1, 1)
            or d.get("activation") not in _ON_REGISTERS):
        return False
    _, h, w, cin = in_shape
    strides = pair(d.get("strides", 1))
    (top, bottom), (left, right) = conv_padding(depthwise, (h, w), (k, k), strides, (1, 1))
    if max(top, bottom, left, right) >= k:
        return False
    return h * w * kernel.shape[3] * 4 >= MIN_EXPANDED_BYTES and cin <= MAX_EXPAND_INPUT_CHANNELS
