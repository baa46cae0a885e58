"""From an optimized graph and an input shape to a list of kernel calls over preallocated buffers.

``build_plan`` does, once per input shape, everything that does not depend on the pixel values:
works out every node's output shape, chooses the kernel for each node and prepares its arguments
(padding amounts, activation codes, kernels reshaped the way the fast kernel wants them), and
assigns every intermediate value a slot in a small pool of reusable buffers (a value's slot is
freed once its last reader has run). ``BoundPlan`` then gives the plan its buffers and binds every
step to them once (each layer record's binder checks its arrays and returns the kernel call to make,
kernels/entry.py), so that a prediction is just a loop of those calls.

Each node's fast path is its layer record's ``prepare`` (npmobile.ops); nodes without one run their
record's reference function and the result is copied into the node's buffer: slower, never different.

Why bind once: at 224 pixels MobileNetV3-Small runs ~50 steps in about a millisecond, so a few
microseconds of Python per step (checking shapes, reshaping, choosing a kernel) is a tenth of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from npmobile.errors import ModelFileError
from npmobile.graph import Graph, Node, last_readers
from npmobile.kernels import huge_pages
from npmobile.kernels.backend import get_num_threads
from npmobile.kernels.entry import ByThreads, needs_blas, rebinder, same_call
from npmobile.kernels.threads import hold_blas
from npmobile.layers import check_plan_total, checked_shapes
from npmobile.ops import Binder, is_input, layer_type


@dataclass
class Step:
    node: Node
    bind: Binder
    inputs: list  # value numbers (int) for tensors, or ("scalar", value)
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
        buffers = [huge_pages.zeros(size) for size in self.buffer_sizes]  # in huge pages where there are
        views: list[np.ndarray | None] = [None] * len(self.slot_shapes)
        for value, buffer in enumerate(self.value_slot):
            if buffer >= 0:
                shape = self.slot_shapes[value]
                views[value] = buffers[buffer][: int(np.prod(shape))].reshape(shape)
        return views

    def reads_inputs(self, step: Step) -> bool:
        return any(isinstance(i, int) and i in self.input_values for i in step.inputs)


class BoundPlan:
    """A plan with its buffers, every step bound to them: running it is a loop of kernel calls.

    Steps that read the model's inputs are bound again at each run (the caller's arrays change);
    the others once, here. The bound calls hold the buffers; the caller's arrays are let go after
    each run. Two lists of calls: for runs on one thread, a kernel's serial form where it has one
    (kernels/entry.py ``ByThreads``), else the same calls.
    """

    def __init__(self, plan: Plan):
        self.plan = plan
        self.values = plan.allocate()
        self.feed_steps = [k for k, step in enumerate(plan.steps) if plan.reads_inputs(step)]
        self.calls: list = [None] * len(plan.steps)
        self.one_thread_calls: list = [None] * len(plan.steps)
        # Whether a step calls BLAS, so that runs hold it to one thread (kernels/entry.py ``needs_blas``);
        # known once every step is bound, at the first run.
        self.calls_blas: bool | None = None
        # The steps that read a model input are bound here too, to a placeholder of the input's shape that is
        # never written (np.empty: no memory is touched), and each run gives them its input through a
        # rebinder (kernels/entry.py); the first run checks that this makes the very call binding would, and a
        # step whose call it does not (a binder that keeps something made from the input) is bound at each run.
        self.placeholders = {v: np.empty(plan.slot_shapes[v], np.float32) for v in plan.input_values}
        self.rebinders: dict[int, Callable | None] = {}
        self.rebinders_checked = False
        for v, placeholder in self.placeholders.items():
            self.values[v] = placeholder
        for k in range(len(plan.steps)):
            self._bind(k)
        for k in self.feed_steps:
            self.rebinders[k] = self._rebinder(k)
        for v in plan.input_values:
            self.values[v] = None

    def _bind(self, k: int, call=None) -> None:
        call = call if call is not None else _bind(self.plan.steps[k], self.values)
        # The plan picks the form itself, once per run: a ByThreads would ask Numba at every call.
        self.calls[k] = call.many if isinstance(call, ByThreads) else call
        self.one_thread_calls[k] = call.one if isinstance(call, ByThreads) else call

    def _rebinder(self, k: int):
        """Step ``k``'s call bound to the placeholder, as a function of the one model input it reads."""
        read = [i for i in self.plan.steps[k].inputs if isinstance(i, int) and i in self.placeholders]
        if len(set(read)) != 1:
            return None
        call = self.calls[k] if self.calls[k] is self.one_thread_calls[k] else ByThreads(self.one_thread_calls[k],
                                                                                          self.calls[k])
        return rebinder(call, self.placeholders[read[0]])

    def _feed(self, feeds: list[np.ndarray]) -> None:
        """Bind the steps that read the model's inputs to this run's ``feeds``."""
        # The placeholders' kinds of array: the kernels' exported signatures chosen for them fit.
        quick = all(f.dtype == np.float32 and f.flags.c_contiguous and f.flags.writeable and f.flags.aligned
                    for f in feeds)
        for k in self.feed_steps:
            rebind = self.rebinders.get(k) if quick else None
            if rebind is None:
                self._bind(k)
                continue
            read = next(i for i in self.plan.steps[k].inputs if isinstance(i, int) and i in self.placeholders)
            call = rebind(feeds[self.plan.input_values.index(read)])
            if not self.rebinders_checked:
                bound = _bind(self.plan.steps[k], self.values)
                if not same_call(call, bound):
                    self.rebinders[k], call = None, bound
            self._bind(k, call)
        self.rebinders_checked = self.rebinders_checked or quick

    def _run_calls(self, calls: list, timings: list | None) -> None:
        k = 0
        try:
            if timings is None:
                for k, call in enumerate(calls):  # noqa: B007 (k names the failing step below)
                    call()
            else:
                for k, call in enumerate(calls):
                    start = time.perf_counter()
                    call()
                    timings.append((self.plan.steps[k], time.perf_counter() - start))
        except _KERNEL_ERRORS as error:
            raise _cannot_run(self.plan.steps[k], error) from None

    def run(self, feeds: list[np.ndarray], timings: list[tuple[Step, float]] | None = None) -> dict[str, np.ndarray]:
        """Run every step; with ``timings`` (a list), append (step, seconds) for each step."""
        plan, values = self.plan, self.values
        for v, feed in zip(plan.input_values, feeds):
            values[v] = feed
        try:
            self._feed(feeds)
            calls = self.one_thread_calls if get_num_threads() == 1 else self.calls
            if self.calls_blas is None:
                self.calls_blas = any(needs_blas(call) for call in self.calls + self.one_thread_calls)
            if self.calls_blas:
                with hold_blas():
                    self._run_calls(calls, timings)
            else:
                self._run_calls(calls, timings)
            # Copies: the buffers are reused by the next call.
            return {name: values[v].copy() for name, v in plan.output_values.items()}
        finally:
            for v in plan.input_values:
                values[v] = None
            for k in self.feed_steps:
                self.calls[k] = self.one_thread_calls[k] = None


# Shapes and configs were checked at load, so one of these from a kernel means a file whose values
# still do not fit (a hostile or garbled config): it is reported naming the layer, not a line of npmobile.
_KERNEL_ERRORS = (ValueError, TypeError, IndexError, KeyError, ZeroDivisionError, OverflowError)


def _cannot_run(step: Step, error: Exception) -> ModelFileError:
    return ModelFileError(f"layer {step.node.name!r} ({step.node.op}) cannot run: {type(error).__name__}: {error}")


def _bind(step: Step, values: list) -> Callable[[], None] | ByThreads:
    args = [values[i] if isinstance(i, int) else i[1] for i in step.inputs]
    try:
        return step.bind(args, values[step.out])
    except _KERNEL_ERRORS as error:
        raise _cannot_run(step, error) from None


def _reference_binder(node: Node, keras_version: int) -> Binder:
    function = layer_type(node.op).reference

    def bind(args, out):
        def run():
            out[...] = function(node, args, keras_version)

        return run

    return bind


# --------------------------------------------------------------------------------------------------
# Building the plan
# --------------------------------------------------------------------------------------------------


def build_plan(graph: Graph, input_shapes: list[tuple[int, ...]], outputs: list[str]) -> Plan:
    """``outputs``: node names whose values the caller wants back."""
    concrete = {name: tuple(shape) for name, shape in zip(graph.inputs, input_shapes)}
    shapes = checked_shapes(graph, input_shapes)  # the size rules of load time, now that sizes are known
    batch = input_shapes[0][0]

    def full(shape):
        return (batch, *shape[1:])

    value_of: dict[str, int] = {}
    slot_shapes: list[tuple[int, ...]] = []
    for name in graph.inputs:
        value_of[name] = len(slot_shapes)
        slot_shapes.append(concrete[name])

    nodes = [n for n in graph.nodes if not is_input(n.op)]
    last_use = last_readers(nodes)
    keep = set(outputs)

    steps: list[Step] = []
    value_slot: list[int] = [-1] * len(graph.inputs)  # inputs live in the caller's arrays
    buffer_sizes: list[int] = []
    free: list[int] = []
    buffer_of_value: dict[str, int] = {}

    def read_for_the_last_time(name: str, index: int) -> None:
        """Free the buffer of value ``name`` if node ``index`` was its last reader (or it has none), unless
        a view of it (another value in the same buffer) still lives."""
        if last_use.get(name, index) == index and name not in keep and name in buffer_of_value:
            buffer = buffer_of_value.pop(name)
            if buffer not in buffer_of_value.values():
                free.append(buffer)

    for index, node in enumerate(nodes):
        sources = [i for i in node.inputs if isinstance(i, str)]
        in_shapes = [full(shapes[i]) for i in sources]
        out_shape = full(shapes[node.name])
        if (layer_type(node.op).view and len(sources) == 1 and sources[0] in buffer_of_value
                and int(np.prod(out_shape)) == int(np.prod(in_shapes[0]))):
            # A reshape: the input's buffer seen in another shape; no step. (A model input's view is a
            # step: the caller's arrays are not the plan's.)
            value_of[node.name] = len(slot_shapes)
            slot_shapes.append(out_shape)
            value_slot.append(buffer_of_value[sources[0]])
            buffer_of_value[node.name] = buffer_of_value[sources[0]]
            read_for_the_last_time(sources[0], index)
            read_for_the_last_time(node.name, index)
            continue
        prepare = layer_type(node.op).prepare
        bind = prepare(node, in_shapes, out_shape, graph.keras_version) if prepare else None
        bind = bind or _reference_binder(node, graph.keras_version)

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
        steps.append(Step(node, bind, [value_of[i] if isinstance(i, str) else ("scalar", i) for i in node.inputs],
                          value))
        # Free the buffers of values read for the last time (after this step: kernels need
        # their output distinct from their inputs).
        for i in set(sources):
            read_for_the_last_time(i, index)
        read_for_the_last_time(node.name, index)
    check_plan_total(graph, buffer_sizes, input_shapes)
    return Plan(steps, slot_shapes, value_slot, buffer_sizes,
                [value_of[n] for n in graph.inputs], {name: value_of[name] for name in outputs})


class PlanCache:
    """Plans by input shape, each with its buffers, made on first use and kept for the next calls.

    One prediction runs at a time in a process (interpreter._RUN_LOCK), so a plan's buffers and
    scratch are never used by two calls at once.
    """

    def __init__(self, graph: Graph, wanted: list[str], size: int = 4):
        """``wanted``: the node names whose values a run returns, in the caller's order (repeats allowed)."""
        self.graph, self.wanted, self.size = graph, wanted, size
        self.outputs = list(dict.fromkeys(wanted))
        self.plans: dict[tuple, BoundPlan] = {}

    def run(self, feeds: list[np.ndarray], timings: list | None = None) -> dict[str, np.ndarray]:
        key = tuple(f.shape for f in feeds)
        bound = self.plans.get(key)
        if bound is None:
            if len(self.plans) >= self.size:
                self.plans.pop(next(iter(self.plans)))
            try:
                plan = build_plan(self.graph, [f.shape for f in feeds], self.outputs)
            except (ValueError, TypeError, IndexError, KeyError, ZeroDivisionError, OverflowError) as error:
                raise ModelFileError(f"{self.graph.source}: cannot plan the model for input "
                                     f"{[f.shape for f in feeds]}: {type(error).__name__}: {error}") from None
            bound = self.plans[key] = BoundPlan(plan)
        return bound.run(feeds, timings)
