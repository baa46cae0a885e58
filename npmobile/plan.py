"""From an optimized graph and an input shape to a list of kernel calls over preallocated buffers.

``build_plan`` does, once per input shape, everything that does not depend on the pixel values:
works out every node's output shape, chooses the kernel for each node and prepares its arguments
(padding amounts, activation codes, kernels reshaped the way the fast kernel wants them), and
assigns every intermediate value a slot in a small pool of reusable buffers (a value's slot is
freed once its last reader has run). ``Plan.run`` is then just a loop of kernel calls.

Each node's fast path is its layer record's ``prepare`` (npmobile.ops); nodes without one run their
record's reference function and the result is copied into the node's buffer: slower, never different.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from npmobile.errors import ModelFileError
from npmobile.graph import Graph, Node, last_readers
from npmobile.layers import infer_shapes
from npmobile.ops import Runner, layer_type


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


def _reference_runner(node: Node, keras_version: int) -> Runner:
    function = layer_type(node.op).reference

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

    nodes = [n for n in graph.nodes if n.op != "InputLayer"]
    last_use = last_readers(nodes)
    keep = set(outputs)

    steps: list[Step] = []
    value_slot: list[int] = [-1] * len(graph.inputs)  # inputs live in the caller's arrays
    buffer_sizes: list[int] = []
    free: list[int] = []
    buffer_of_value: dict[str, int] = {}
    for index, node in enumerate(nodes):
        in_shapes = [full(shapes[i]) for i in node.inputs if isinstance(i, str)]
        out_shape = full(shapes[node.name])
        prepare = layer_type(node.op).prepare
        run = prepare(node, in_shapes, out_shape, graph.keras_version) if prepare else None
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
