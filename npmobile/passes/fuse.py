"""The fusion passes. Each takes a Graph and the set of Keras names to keep, rewrites the graph in
place and returns it; ``optimize`` copies the graph first and runs them in the order that lets each
one see the pattern it looks for."""

from __future__ import annotations

import copy

import numpy as np

from npmobile.errors import ModelFileError, UnsupportedLayerError
from npmobile.graph import Graph, Node
from npmobile.layers import infer_shapes
from npmobile.ops import is_identity
from npmobile.ops.activation import epilogue_activation
from npmobile.passes.expand_depthwise import fused_node, worth_fusing

CONV_OPS = ("Conv2D", "DepthwiseConv2D", "SeparableConv2D")


# --------------------------------------------------------------------------------------------------
# Small graph surgery helpers
# --------------------------------------------------------------------------------------------------


def _is_kept(node: Node, graph: Graph, keep: set[str]) -> bool:
    return node.name in graph.outputs or any(name in keep for name in node.keras_names)


def _only_consumer(graph: Graph, node: Node, keep: set[str]) -> Node | None:
    """The single node reading ``node``'s output, if exactly one does and nobody else wants it."""
    if _is_kept(node, graph, keep):
        return None
    users = [n for n in graph.nodes if node.name in n.inputs]
    if len(users) != 1 or users[0].inputs.count(node.name) != 1:
        return None
    return users[0]


def _producer(graph: Graph, name) -> Node | None:
    if not isinstance(name, str):
        return None
    for node in graph.nodes:
        if node.name == name:
            return node
    return None


def _replace_uses(graph: Graph, old: str, new: str) -> None:
    for node in graph.nodes:
        if old in node.inputs:
            node.inputs = [new if i == old else i for i in node.inputs]
    graph.outputs = [new if o == old else o for o in graph.outputs]
    graph.aliases = {k: (new if v == old else v) for k, v in graph.aliases.items()}


def _absorb(graph: Graph, survivor: Node, absorbed: Node) -> None:
    """``absorbed`` ran right after ``survivor``; now ``survivor``'s output is ``absorbed``'s output."""
    survivor.keras_names.extend(absorbed.keras_names)
    graph.nodes.remove(absorbed)
    _replace_uses(graph, absorbed.name, survivor.name)


def _is_linear(node: Node) -> bool:
    return node.config.get("activation") in (None, "linear") and not node.config.get("residual")


# --------------------------------------------------------------------------------------------------
# Passes
# --------------------------------------------------------------------------------------------------


def drop_identities(graph: Graph, keep: set[str]) -> Graph:
    """Dropout, the random augmentations and a cast to float32 are the identity at inference
    (npmobile.ops.is_identity): their readers read their input instead. A layer asked for by name keeps
    answering, as the node its input comes from (unless that is a model input, which is no node)."""
    for node in [n for n in graph.nodes if is_identity(n)]:
        source = node.inputs[0]
        if not isinstance(source, str) or (source in graph.inputs and _is_kept(node, graph, keep)):
            continue
        producer = _producer(graph, source)
        if producer is not None:
            producer.keras_names.extend(node.keras_names)
        graph.nodes.remove(node)
        _replace_uses(graph, node.name, source)
    return graph


drop_dropout = drop_identities  # its first name, when Dropout was the only identity


def fold_batchnorm(graph: Graph, keep: set[str]) -> Graph:
    """Fold BatchNormalization into the convolution before it.

    BN is y = x * inv + (beta - mean * inv) with inv = gamma / sqrt(var + eps), per channel; a
    convolution is linear, so scaling its kernel's output channel by inv and setting its bias to
    (bias - mean) * inv + beta gives the same y in one step. Computed in float64, stored float32.
    """
    for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
        conv = _producer(graph, bn.inputs[0])
        if conv is None or conv.op not in ("Conv2D", "DepthwiseConv2D") or not _is_linear(conv):
            continue
        if _only_consumer(graph, conv, keep) is not bn:
            continue
        w = bn.weights
        eps = float(bn.config.get("epsilon", 1e-3))
        inv = 1.0 / np.sqrt(w["moving_variance"].astype(np.float64) + eps)
        if "gamma" in w:
            inv = inv * w["gamma"]
        shift = -w["moving_mean"].astype(np.float64) * inv
        if "beta" in w:
            shift = shift + w["beta"]
        key = "kernel" if conv.op == "Conv2D" else "depthwise_kernel"
        kernel = conv.weights[key]
        if conv.op == "DepthwiseConv2D":  # output channel c * M + m comes from kernel[..., c, m]
            scale = inv.reshape(kernel.shape[2], kernel.shape[3])
        else:
            scale = inv
        # Each product in float64, rounded to float32 as it is stored (no float64 copy of the whole kernel).
        folded = np.multiply(kernel, scale, dtype=np.float64, out=np.empty(kernel.shape, np.float32),
                             casting="same_kind")
        bias = conv.weights.get("bias", np.zeros_like(inv)).astype(np.float64)
        conv.weights = {key: folded, "bias": (bias * inv + shift).astype(np.float32)}
        conv.config = {**conv.config, "use_bias": True}
        _absorb(graph, conv, bn)
    return graph


def fuse_zero_padding(graph: Graph, keep: set[str]) -> Graph:
    """ZeroPadding2D before a 'valid' convolution becomes the convolution's own padding, which the
    kernel applies by skipping out-of-image taps instead of copying the image into a bigger one."""
    for pad in [n for n in graph.nodes if n.op == "ZeroPadding2D"]:
        conv = _only_consumer(graph, pad, keep)
        if conv is None or conv.op not in CONV_OPS or conv.config.get("padding") != "valid":
            continue
        amount = pad.config.get("padding", 1)
        if isinstance(amount, int):
            amount = ((amount, amount), (amount, amount))
        amount = tuple((int(p[0]), int(p[1])) if isinstance(p, (list, tuple)) else (int(p), int(p))
                       for p in amount)
        conv.config = {**conv.config, "padding": amount}
        conv.inputs = [pad.inputs[0]] + conv.inputs[1:]
        graph.nodes.remove(pad)
    return graph


def fold_rescaling(graph: Graph, keep: set[str]) -> Graph:
    """Rescaling (x * scale + offset, MobileNetV3's [0, 255] -> [-1, 1]) right before a Conv2D becomes
    the way the convolution reads its input, saving a pass over the image.

    Not folded into the weights: conv(x * s + o) = s * conv(x) + o * (sum of the taps) holds only
    where the window lies inside the image, because the padding zeros come *after* the rescale.
    The convolution kernel rescales the taps inside the image and reads zeros outside: exactly
    what Keras computes, every pixel.
    """
    for rescaling in [n for n in graph.nodes if n.op == "Rescaling"]:
        scale, offset = rescaling.config.get("scale", 1.0), rescaling.config.get("offset", 0.0)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (scale, offset)):
            continue  # per-channel scales stay a layer of their own
        conv = _only_consumer(graph, rescaling, keep)
        if conv is None or conv.op != "Conv2D" or "input_scale" in conv.config or conv.inputs[0] != rescaling.name:
            continue
        conv.config = {**conv.config, "input_scale": float(scale), "input_offset": float(offset)}
        conv.inputs = [rescaling.inputs[0]] + conv.inputs[1:]
        graph.nodes.remove(rescaling)
    return graph


def _exact_affine(node: Node) -> tuple[str, float] | None:
    """A scalar op on one tensor as ("mul", s) or ("add", o) where computing it that way gives the same
    float32 bits: x - c is x + (-c) and -x is x * -1 by IEEE's definition, and x / c is, as Keras's
    predict computes it, x * (1 / c) (npmobile.ops.arithmetic). ``c - x`` and ``c / x`` are not."""
    from npmobile.ops.arithmetic import divisor_constant, reciprocal

    tensors = [i for i in node.inputs if isinstance(i, str)]
    scalars = [i for i in node.inputs if isinstance(i, float)]
    if node.op == "Negative" and len(tensors) == 1 and len(node.inputs) == 1:
        return ("mul", -1.0)
    if len(tensors) != 1 or len(scalars) != 1 or len(node.inputs) != 2:
        return None
    c, tensor_first = float(np.float32(scalars[0])), isinstance(node.inputs[0], str)
    if node.op == "Add":
        return ("add", c)
    if node.op == "Multiply":
        return ("mul", c)
    if node.op == "Subtract" and tensor_first:
        return ("add", -c)
    if node.op == "TrueDivide" and divisor_constant(node) is not None:
        return ("mul", reciprocal(c))
    return None


def scalar_ops_to_rescaling(graph: Graph, keep: set[str]) -> Graph:
    """Constant arithmetic right before a convolution (``x / 127.5 - 1``, preprocess_input's 'tf' mode,
    written as op nodes or TFOpLambda layers) becomes a Rescaling, which fold_rescaling then folds into the
    convolution's input: a multiply and an add after it, or either alone, are Rescaling(s, o)'s
    x * s + o with the same two float32 roundings. Only ops that feed a convolution (through one
    another) are touched: the constant adds inside hard-swish and squeeze-excite are other passes' patterns."""
    for conv in [n for n in graph.nodes if n.op == "Conv2D"]:
        last = _producer(graph, conv.inputs[0])
        if last is None or _only_consumer(graph, last, keep) is not conv or _exact_affine(last) is None:
            continue
        kind, value = _exact_affine(last)
        chain, scale, offset = [last], 1.0, 0.0
        if kind == "add":
            offset = value
            first = _producer(graph, next(i for i in last.inputs if isinstance(i, str)))
            affine = None if first is None else _exact_affine(first)
            if affine is not None and affine[0] == "mul" and _only_consumer(graph, first, keep) is last:
                scale = affine[1]
                chain.insert(0, first)
        else:
            scale = value
        source = next(i for i in chain[0].inputs if isinstance(i, str))
        rescaling = Node(name=last.name, op="Rescaling", config={"scale": scale, "offset": offset}, inputs=[source],
                         keras_names=[name for n in chain for name in n.keras_names])
        graph.nodes[graph.nodes.index(last)] = rescaling
        for gone in chain[:-1]:
            graph.nodes.remove(gone)
    return graph


def _chain_op(graph: Graph, node: Node | None, keep: set[str], op: str) -> Node | None:
    """The single consumer of ``node`` if it has class ``op``."""
    if node is None:
        return None
    user = _only_consumer(graph, node, keep)
    return user if user is not None and user.op == op else None


def _scalar(node: Node) -> float | None:
    scalars = [i for i in node.inputs if not isinstance(i, str)]
    return scalars[0] if len(scalars) == 1 and len(node.inputs) == 2 else None


def fuse_squeeze_excite(graph: Graph, keep: set[str]) -> Graph:
    """MobileNetV3's squeeze-and-excite, eight Keras nodes, becomes one SqueezeExcite node:

    x -> GlobalAveragePooling2D(keepdims) -> Conv2D 1x1 -> ReLU -> Conv2D 1x1 -> (+ 3) -> ReLU(6)
      -> (* 1/6) -> Multiply([x, gate])
    """
    for pool in [n for n in graph.nodes if n.op == "GlobalAveragePooling2D"]:
        if not pool.config.get("keepdims"):
            continue
        reduce = _chain_op(graph, pool, keep, "Conv2D")
        relu = _chain_op(graph, reduce, keep, "ReLU")
        expand = _chain_op(graph, relu, keep, "Conv2D")
        plus3 = _chain_op(graph, expand, keep, "Add")
        relu6 = _chain_op(graph, plus3, keep, "ReLU")
        sixth = _chain_op(graph, relu6, keep, "Multiply")
        mul = _chain_op(graph, sixth, keep, "Multiply")
        if mul is None:
            continue
        x = pool.inputs[0]
        if (
            not all(_is_linear(c) and c.config.get("kernel_size") in ((1, 1), [1, 1]) for c in (reduce, expand))
            or relu.config.get("max_value") is not None
            or float(relu6.config.get("max_value") or 0) != 6.0
            or _scalar(plus3) != 3.0
            or _scalar(sixth) is None or abs(_scalar(sixth) - 1 / 6) > 1e-7
            or len(mul.inputs) != 2 or x not in mul.inputs
        ):
            continue
        se = Node(
            name=mul.name,
            op="SqueezeExcite",
            config={},
            inputs=[x],
            weights={
                "reduce_kernel": reduce.weights["kernel"][0, 0],
                "reduce_bias": reduce.weights.get("bias", np.zeros(reduce.weights["kernel"].shape[-1], np.float32)),
                "expand_kernel": expand.weights["kernel"][0, 0],
                "expand_bias": expand.weights.get("bias", np.zeros(expand.weights["kernel"].shape[-1], np.float32)),
            },
            keras_names=list(mul.keras_names),
        )
        index = graph.nodes.index(mul)
        graph.nodes[index] = se
        for gone in (pool, reduce, relu, expand, plus3, relu6, sixth):
            graph.nodes.remove(gone)
    return graph


def fuse_hard_swish_ops(graph: Graph, keep: set[str]) -> Graph:
    """tf_keras's MobileNetV3 spells hard-swish as four layers, Multiply([x, ReLU(6)(x + 3) * (1/6)]);
    make them one Activation node that computes the same thing in the same order."""
    for plus3 in [n for n in graph.nodes if n.op == "Add"]:
        if plus3 not in graph.nodes or _scalar(plus3) != 3.0:
            continue
        x = next(i for i in plus3.inputs if isinstance(i, str))
        relu6 = _chain_op(graph, plus3, keep, "ReLU")
        sixth = _chain_op(graph, relu6, keep, "Multiply")
        mul = _chain_op(graph, sixth, keep, "Multiply")
        if (
            mul is None
            or float(relu6.config.get("max_value") or 0) != 6.0
            or _scalar(sixth) is None or abs(_scalar(sixth) - 1 / 6) > 1e-7
            or sorted(map(str, mul.inputs)) != sorted([x, sixth.name])
        ):
            continue
        node = Node(name=mul.name, op="Activation", config={"activation": "hard_swish_from_ops"}, inputs=[x],
                    keras_names=list(mul.keras_names))
        graph.nodes[graph.nodes.index(mul)] = node
        for gone in (plus3, relu6, sixth):
            graph.nodes.remove(gone)
    return graph


def fuse_activation(graph: Graph, keep: set[str]) -> Graph:
    """An activation right after a convolution is applied in the convolution's epilogue."""
    for act in [n for n in graph.nodes if n.op in ("ReLU", "Activation")]:
        if act not in graph.nodes:
            continue
        conv = _producer(graph, act.inputs[0])
        name = epilogue_activation(act)
        if name is None or conv is None or conv.op not in CONV_OPS + ("Dense",) or not _is_linear(conv):
            continue
        if _only_consumer(graph, conv, keep) is not act:
            continue
        conv.config = {**conv.config, "activation": name}
        _absorb(graph, conv, act)
    return graph


def fuse_residual_add(graph: Graph, keep: set[str]) -> Graph:
    """Add([shortcut, conv(x)]) becomes conv(x) with the shortcut added in its epilogue (MobileNetV2
    and V3 blocks: the projection's output is summed with the block's input)."""
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    for add in [n for n in graph.nodes if n.op == "Add"]:
        if len(add.inputs) != 2 or not all(isinstance(i, str) for i in add.inputs):
            continue
        for conv_name, shortcut in (add.inputs, add.inputs[::-1]):
            conv = _producer(graph, conv_name)
            if (
                conv is not None and conv.op == "Conv2D" and _is_linear(conv)
                and _only_consumer(graph, conv, keep) is add
                and order[shortcut] < order[conv.name] and conv_name != shortcut
            ):
                conv.config = {**conv.config, "residual": True}
                conv.inputs = conv.inputs + [shortcut]
                _absorb(graph, conv, add)
                break
    return graph


def fuse_expand_depthwise(graph: Graph, keep: set[str]) -> Graph:
    """A 1x1 Conv2D whose only reader is a DepthwiseConv2D becomes one ExpandDepthwise node with it,
    where the pair is one the fused kernel runs and gains on (npmobile/ops/expand_depthwise.py): the
    1x1 layer's output is then never written whole. Needs the input size: a model whose inputs
    take any size keeps the two layers."""
    try:
        shapes = infer_shapes(graph, check=False)
    except (ModelFileError, UnsupportedLayerError):  # the plan refuses such a graph with its own message
        return graph
    for expand in [n for n in graph.nodes if n.op == "Conv2D"]:
        depthwise = _only_consumer(graph, expand, keep)
        if depthwise is None or depthwise.op != "DepthwiseConv2D" or len(expand.inputs) != 1:
            continue
        in_shape = shapes.get(expand.inputs[0]) if isinstance(expand.inputs[0], str) else None
        if in_shape is None or len(in_shape) != 4 or not worth_fusing(expand, depthwise, in_shape):
            continue
        graph.nodes[graph.nodes.index(depthwise)] = fused_node(expand, depthwise)
        graph.nodes.remove(expand)
    return graph


PASSES = (drop_identities, fold_batchnorm, fuse_zero_padding, scalar_ops_to_rescaling, fold_rescaling,
          fuse_squeeze_excite, fuse_hard_swish_ops, fuse_activation, fuse_residual_add, fuse_expand_depthwise)


def optimize(graph: Graph, keep: set[str] | frozenset[str] = frozenset()) -> Graph:
    """All passes, on a copy (the original graph stays as Keras wrote it, for summary and outputs=)."""
    graph = copy.copy(graph)
    graph.nodes = [copy.copy(n) for n in graph.nodes]
    for node in graph.nodes:
        node.keras_names = list(node.keras_names)
        node.inputs = list(node.inputs)
    graph.outputs = list(graph.outputs)
    graph.aliases = dict(graph.aliases)
    # A kept name may be an alias (a nested model, a torchvision module path): keep the layer it stands for.
    keep = set(keep) | {graph.aliases[name] for name in keep if name in graph.aliases}
    for fuse in PASSES:
        fuse(graph, keep)
    return graph
