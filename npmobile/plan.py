"""From an optimized graph and an input shape to a list of kernel calls over preallocated buffers.

``build_plan`` does, once per input shape, everything that does not depend on the pixel values:
works out every node's output shape, chooses the kernel for each node and prepares its arguments
(padding amounts, activation codes, kernels reshaped the way the fast kernel wants them), and
assigns every intermediate value a slot in a small pool of reusable buffers (a value's slot is
freed once its last reader has run). ``Plan.run`` is then just a loop of kernel calls.

Nodes whose op has no fast kernel run their reference function from npmobile.layers and the result
is copied into the node's buffer: slower, never different.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from npmobile.errors import ModelFileError
from npmobile.graph import Graph, Node
from npmobile.kernels import activations as act_kernels
from npmobile.kernels import reference as K
from npmobile.layers import LAYER_FUNCTIONS, _pair, conv_padding, epilogue_activation, infer_shapes

# A prepared step: (args, out) -> None, writing every element of out.
Runner = Callable[[list, np.ndarray], None]


@dataclass
class Step:
    node: Node
    run: Runner
    inputs: list  # slot numbers (int) for tensors, or ("scalar", value)
    out: int


@dataclass
class Plan:
    steps: list[Step]
    slot_shapes: list[tuple[int, ...]]  # the shape each slot holds, per value
    value_slot: list[int]  # value number -> buffer number
    buffer_sizes: list[int]
    input_values: list[int]
    output_values: dict[str, int]  # node name -> value number

    def allocate(self) -> list[np.ndarray | None]:
        """The array each value is written to: views into a few reusable buffers, made once per plan
        so that a run only looks them up. Input values are None: the caller's arrays fill them."""
        buffers = [np.empty(size, dtype=np.float32) for size in self.buffer_sizes]
        views: list[np.ndarray | None] = [None] * len(self.slot_shapes)
        for value, buffer in enumerate(self.value_slot):
            if buffer >= 0:
                shape = self.slot_shapes[value]
                views[value] = buffers[buffer][: int(np.prod(shape))].reshape(shape)
        return views

    def run(self, feeds: list[np.ndarray], views: list[np.ndarray | None],
            timings: list[tuple[Step, float]] | None = None) -> dict[str, np.ndarray]:
        """Run every step; with ``timings`` (a list), append (step, seconds) for each step."""
        values = list(views)
        for v, feed in zip(self.input_values, feeds):
            values[v] = feed
        for step in self.steps:
            out = values[step.out]
            args = [values[i] if isinstance(i, int) else i[1] for i in step.inputs]
            if timings is None:
                _run_step(step, args, out)
            else:
                start = time.perf_counter()
                _run_step(step, args, out)
                timings.append((step, time.perf_counter() - start))
        # Copies: the buffers are reused by the next call.
        return {name: values[v].copy() for name, v in self.output_values.items()}


def _run_step(step: Step, args: list, out: np.ndarray) -> None:
    try:
        step.run(args, out)
    except (ValueError, TypeError, IndexError, KeyError, ZeroDivisionError, OverflowError) as error:
        # Shapes and configs were checked at load, so this is a file whose values still do not fit
        # (a hostile or garbled config): name the layer rather than a line of npmobile.
        raise ModelFileError(f"layer {step.node.name!r} ({step.node.op}) cannot run: "
                             f"{type(error).__name__}: {error}") from None


# --------------------------------------------------------------------------------------------------
# Preparing nodes: Keras config -> a fast kernel call
# --------------------------------------------------------------------------------------------------


def _act_code(node: Node, keras_version: int) -> int | None:
    name = node.config.get("activation")
    if isinstance(name, dict):
        return None
    if name == "hard_sigmoid" and keras_version < 3:
        return None  # Keras 2's 0.2x + 0.5: no epilogue for it, use the reference path
    return act_kernels.ACTIVATION_CODES.get(name)


def _bias(node: Node, channels: int) -> np.ndarray:
    bias = node.weights.get("bias")
    return np.zeros(channels, np.float32) if bias is None else np.ascontiguousarray(bias, np.float32)


def prepare_depthwise(node: Node, in_shapes, out_shape, keras_version: int) -> Runner | None:
    from npmobile.kernels.depthwise import depthwise_conv2d

    kernel = node.weights["depthwise_kernel"]
    act = _act_code(node, keras_version)
    if kernel.shape[3] != 1 or act is None or _pair(node.config.get("dilation_rate", 1)) != (1, 1):
        return None
    strides = _pair(node.config.get("strides", 1))
    (top, _), (left, _) = conv_padding(node, in_shapes[0][1:3], kernel.shape[:2], strides, (1, 1))
    k3 = np.ascontiguousarray(kernel[:, :, :, 0])
    bias = _bias(node, k3.shape[2])

    def run(args, out):
        depthwise_conv2d(args[0], k3, bias, out, strides[0], strides[1], top, left, act)

    return run


def prepare_conv2d(node: Node, in_shapes, out_shape, keras_version: int) -> Runner | None:
    from npmobile.kernels.conv import conv2d
    from npmobile.kernels.pointwise import pointwise_conv2d, prepare_weights

    kernel = node.weights["kernel"]
    strides = _pair(node.config.get("strides", 1))
    dilation = _pair(node.config.get("dilation_rate", 1))
    padding = conv_padding(node, in_shapes[0][1:3], kernel.shape[:2], strides, dilation)
    act = _act_code(node, keras_version)
    if act is None:
        return None
    residual = bool(node.config.get("residual"))
    bias = _bias(node, kernel.shape[3])
    scale, offset = node.config.get("input_scale", 1.0), node.config.get("input_offset", 0.0)
    rescaled = (scale, offset) != (1.0, 0.0)
    if kernel.shape[:2] == (1, 1) and strides == (1, 1) and padding == K.NO_PADDING and not rescaled:
        w = prepare_weights(kernel[0, 0], bias, int(np.prod(out_shape[:3])))  # packed once per plan

        def run_pointwise(args, out):
            pointwise_conv2d(args[0], w, bias, out, act, args[1] if residual else None)

        return run_pointwise
    if residual:
        return None
    (top, _), (left, _) = padding
    k4 = np.ascontiguousarray(kernel)
    packed = prepare_weights(k4.reshape(-1, k4.shape[3]), bias, int(np.prod(out_shape[:3])))
    packed = None if isinstance(packed, np.ndarray) else packed  # the microkernel's weights, packed once
    # The im2col scratch, made once per plan (one prediction runs at a time: interpreter._RUN_LOCK).
    patches = np.empty(int(np.prod(out_shape[:3])) * int(np.prod(kernel.shape[:3])), dtype=np.float32)

    def run_conv(args, out):
        conv2d(args[0], k4, bias, out, strides[0], strides[1], top, left, act, dilation[0], dilation[1],
               scale, offset, patches, packed)

    return run_conv


def prepare_dense(node: Node, in_shapes, out_shape, keras_version: int) -> Runner | None:
    from npmobile.kernels.pointwise import dense, prepare_weights

    softmax = node.config.get("activation") == "softmax"  # the classifier: product, then softmax in place
    act = act_kernels.ACT_NONE if softmax else _act_code(node, keras_version)
    if act is None or len(in_shapes[0]) != 2:
        return None
    bias = _bias(node, node.weights["kernel"].shape[1])
    kernel = prepare_weights(node.weights["kernel"], bias, out_shape[0])  # packed once per plan

    def run(args, out):
        dense(args[0], kernel, bias, out, act)
        if softmax:
            act_kernels.softmax(out, out)

    return run


def prepare_squeeze_excite(node: Node, in_shapes, out_shape, keras_version: int) -> Runner | None:
    from npmobile.kernels.squeeze_excite import squeeze_excite

    w = {k: np.ascontiguousarray(v, np.float32) for k, v in node.weights.items()}

    def run(args, out):
        squeeze_excite(args[0], w["reduce_kernel"], w["reduce_bias"], w["expand_kernel"], w["expand_bias"], out)

    return run


def prepare_global_average_pool(node: Node, in_shapes, out_shape, keras_version: int) -> Runner | None:
    from npmobile.kernels.pooling import global_average_pool

    if node.config.get("data_format") not in (None, "channels_last") or len(in_shapes[0]) != 4:
        return None

    def run(args, out):
        global_average_pool(args[0], out.reshape(out.shape[0], out.shape[-1]))

    return run


def prepare_activation(node: Node, in_shapes, out_shape, keras_version: int) -> Runner | None:
    """A standalone ReLU / Activation (one the fusion pass could not move into a conv)."""
    if node.op == "Activation" and node.config.get("activation") == "softmax":  # over the last axis

        def run_softmax(args, out):
            channels = out.shape[-1]
            act_kernels.softmax(args[0].reshape(-1, channels), out.reshape(-1, channels))

        return run_softmax
    name = epilogue_activation(node)
    act = act_kernels.ACTIVATION_CODES.get(name) if name else None
    if act is None:
        return None

    def run(args, out):
        act_kernels.activate(args[0], out, act)

    return run


def prepare_add(node: Node, in_shapes, out_shape, keras_version: int) -> Runner | None:
    """The Add merge layer of two same-shaped tensors (no broadcasting, no scalars)."""
    if len(node.inputs) != 2 or not all(isinstance(i, str) for i in node.inputs):
        return None
    if any(tuple(s) != tuple(out_shape) for s in in_shapes):
        return None

    def run(args, out):
        act_kernels.add(args[0], args[1], out, act_kernels.ACT_NONE)

    return run


PREPARERS: dict[str, Callable[..., Runner | None]] = {
    "DepthwiseConv2D": prepare_depthwise,
    "Conv2D": prepare_conv2d,
    "Dense": prepare_dense,
    "SqueezeExcite": prepare_squeeze_excite,
    "GlobalAveragePooling2D": prepare_global_average_pool,
    "ReLU": prepare_activation,
    "Activation": prepare_activation,
    "Add": prepare_add,
}


def _reference_runner(node: Node, keras_version: int) -> Runner:
    function = LAYER_FUNCTIONS[node.op]

    def run(args, out):
        out[...] = function(node, args, keras_version)

    return run


# --------------------------------------------------------------------------------------------------
# Building the plan
# --------------------------------------------------------------------------------------------------


def build_plan(graph: Graph, input_shapes: list[tuple[int, ...]], outputs: list[str]) -> Plan:
    """``outputs``: node names whose values the caller wants back."""
    concrete = {name: tuple(shape) for name, shape in zip(graph.inputs, input_shapes)}
    shaped = Graph(graph.name, graph.nodes, graph.inputs, graph.outputs, concrete, graph.aliases,
                   graph.keras_version, graph.source)
    shapes = infer_shapes(shaped, check=False)
    batch = input_shapes[0][0]

    def full(shape):
        return (batch, *shape[1:])

    value_of: dict[str, int] = {}
    slot_shapes: list[tuple[int, ...]] = []
    for name in graph.inputs:
        value_of[name] = len(slot_shapes)
        slot_shapes.append(concrete[name])

    last_use: dict[str, int] = {}
    nodes = [n for n in graph.nodes if n.op != "InputLayer"]
    for index, node in enumerate(nodes):
        for i in node.inputs:
            if isinstance(i, str):
                last_use[i] = index
    keep = set(outputs)

    steps: list[Step] = []
    value_slot: list[int] = [-1] * len(graph.inputs)  # inputs live in the caller's arrays
    buffer_sizes: list[int] = []
    free: list[int] = []
    buffer_of_value: dict[str, int] = {}
    for index, node in enumerate(nodes):
        in_shapes = [full(shapes[i]) for i in node.inputs if isinstance(i, str)]
        out_shape = full(shapes[node.name])
        preparer = PREPARERS.get(node.op)
        run = preparer(node, in_shapes, out_shape, graph.keras_version) if preparer else None
        run = run or _reference_runner(node, graph.keras_version)

        size = int(np.prod(out_shape))
        fitting = [b for b in free if buffer_sizes[b] >= size]
        if fitting:
            buffer = min(fitting, key=lambda b: buffer_sizes[b])
            free.remove(buffer)
        elif free:  # grow the largest free buffer rather than add one
            buffer = max(free, key=lambda b: buffer_sizes[b])
            free.remove(buffer)
            buffer_sizes[buffer] = size
        else:
            buffer = len(buffer_sizes)
            buffer_sizes.append(size)
        value = len(slot_shapes)
        slot_shapes.append(out_shape)
        value_slot.append(buffer)
        value_of[node.name] = value
        buffer_of_value[node.name] = buffer
        steps.append(Step(node, run, [value_of[i] if isinstance(i, str) else ("scalar", i) for i in node.inputs],
                          value))
        # Free the buffers of values read for the last time (after this step: kernels need
        # their output distinct from their inputs).
        for i in set(i for i in node.inputs if isinstance(i, str)):
            if last_use.get(i) == index and i not in keep and i in buffer_of_value:
                free.append(buffer_of_value.pop(i))
        if node.name not in last_use and node.name not in keep:
            free.append(buffer_of_value.pop(node.name))
    return Plan(steps, slot_shapes, value_slot, buffer_sizes,
                [value_of[n] for n in graph.inputs], {name: value_of[name] for name in outputs})


class PlanCache:
    """Plans by input shape, each with its buffers, made on first use and kept for the next calls.

    One prediction runs at a time in a process (interpreter._RUN_LOCK), so a plan's buffers and
    scratch are never used by two calls at once.
    """

    def __init__(self, graph: Graph, outputs: list[str], size: int = 4):
        self.graph, self.outputs, self.size = graph, outputs, size
        self.plans: dict[tuple, tuple[Plan, list[np.ndarray]]] = {}

    def run(self, feeds: list[np.ndarray], timings: list | None = None) -> dict[str, np.ndarray]:
        key = tuple(f.shape for f in feeds)
        entry = self.plans.get(key)
        if entry is None:
            if len(self.plans) >= self.size:
                self.plans.pop(next(iter(self.plans)))
            try:
                plan = build_plan(self.graph, [f.shape for f in feeds], self.outputs)
            except (ValueError, TypeError, IndexError, KeyError, ZeroDivisionError, OverflowError) as error:
                raise ModelFileError(f"{self.graph.source}: cannot plan the model for input "
                                     f"{[f.shape for f in feeds]}: {type(error).__name__}: {error}") from None
            entry = self.plans[key] = (plan, plan.allocate())
        plan, views = entry
        return plan.run(feeds, views, timings)
