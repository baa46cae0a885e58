"""Load-time checks and shape inference over a graph, from the layer records in npmobile.ops.

What one layer type means lives in its record (npmobile.ops); here are the rules every layer obeys:
configs of sane types, weights that fit their config exactly, output shapes worked out from configs
alone, and sizes a MobileNet never comes near refused before anything is allocated.
"""

from __future__ import annotations

import math
from dataclasses import replace

from npmobile.errors import ModelFileError, UnsupportedLayerError
from npmobile.graph import Node, last_readers
from npmobile.limits import MAX_LAYER_VALUES, MAX_PLAN_VALUES, MAX_WINDOW, MAX_WINDOW_WORK
from npmobile.ops import is_input, layer_type
from npmobile.ops.common import check_channels_last, pair

Shape = tuple


def check_weights(node: Node, in_channels: int, source: str = "") -> None:
    """Raise ModelFileError if the node's weights are missing or do not fit its config."""
    where = f"{source + ': ' if source else ''}layer {node.name!r} ({node.op})"
    expected = layer_type(node.op).weights(node.config, in_channels)
    for var, shape in expected.items():
        if var not in node.weights:
            raise ModelFileError(f"{where}: weight {var!r} is missing")
        found = tuple(node.weights[var].shape)
        if found != shape:
            raise ModelFileError(f"{where}: weight {var!r} has shape {found}, the layer needs {shape}")
    extra = set(node.weights) - set(expected)
    if extra and expected:
        raise ModelFileError(f"{where}: unexpected weights {sorted(extra)}")


def output_shape(node: Node, inputs: list[Shape]) -> Shape:
    """The shape of a node's output given its inputs' shapes (NHWC; None where unknown)."""
    return layer_type(node.op).output_shape(node, inputs)


# No MobileNet tensor comes near these sizes (npmobile.limits); a config that asks for more is refused
# before anything is allocated (a hostile file could otherwise ask for terabytes).
MAX_ELEMENTS = MAX_LAYER_VALUES


def _check_size(node: Node, shape: Shape, source: str) -> None:
    dims = [d for d in shape[1:] if d is not None]
    where = f"{source + ': ' if source else ''}layer {node.name!r} ({node.op})"
    if any(not isinstance(d, int) or d < 1 for d in dims):
        raise ModelFileError(f"{where}: output shape {shape} is impossible (input too small for its kernels?)")
    size = math.prod(dims)
    if size > MAX_ELEMENTS:
        raise ModelFileError(f"{where}: output shape {shape} has {size:,} values per image; refusing it")


def _check_window(node: Node, x: Shape, out: Shape, source: str) -> None:
    """Refuse windows so wide, or so many, that running the layer would exhaust memory or time. MobileNets use
    3x3 to 7x7 windows; a file asking for wider ones, or for billions of window values (npmobile.limits), would
    allocate a huge padded copy, or materialize the windows, at run time."""
    window = layer_type(node.op).window
    if not window:
        return
    c = node.config
    where = f"{source + ': ' if source else ''}layer {node.name!r} ({node.op})"
    kernel = pair(c.get("kernel_size") or c.get("pool_size", 2))
    dilation = pair(c.get("dilation_rate", 1))
    strides = pair(c.get("strides") or kernel)
    spans = [(k - 1) * d + 1 for k, d in zip(kernel, dilation)]
    if max(spans) > MAX_WINDOW:
        raise ModelFileError(f"{where}: a window spanning {spans} pixels is far beyond any MobileNet; refusing it")
    if None in out[1:] or None in x[1:]:
        return  # sizes known only at run time
    # What the windows cover: the input plus any "same" padding.
    padded = [(o - 1) * s + span for o, s, span in zip(out[1:3], strides, spans)]
    if padded[0] * padded[1] * x[-1] > MAX_ELEMENTS:
        raise ModelFileError(f"{where}: its padded input {tuple(padded)} x {x[-1]} is too large; refusing it")
    work = out[1] * out[2] * out[3] * kernel[0] * kernel[1]
    if work > MAX_WINDOW_WORK:
        raise ModelFileError(f"{where}: {work:,} window values per image; refusing it")
    # A convolution's windows laid out as a matrix (im2col: every output pixel's kernel x input channels), the
    # scratch its fast path allocates when the plan is made.
    patches = out[1] * out[2] * kernel[0] * kernel[1] * x[-1]
    if window in ("convolution", "separable") and kernel != (1, 1) and patches > MAX_ELEMENTS:
        raise ModelFileError(f"{where}: its windows as a matrix hold {patches:,} values per image; refusing it")


def _with_source(error: Exception, source: str) -> Exception:
    """The same error with the file's name in front, if it does not start with it already."""
    message = str(error)
    if source and not message.startswith(source):
        message = f"{source}: {message}"
    return type(error)(message)


def infer_shapes(graph, check: bool = True, sizes: bool | None = None) -> dict[str, Shape]:
    """Every node's output shape, from the input shapes and configs; with ``check``, every node's
    weights are validated against its config and input on the way (before anything is allocated).
    With ``sizes`` (default: as ``check``) absurd sizes are refused: per image, every layer's output,
    window and padded input (_check_size, _check_window). A plan for an actual input asks for the
    sizes alone (its configs and weights were checked at load), so that an input of unknown size at
    load still meets the same rules once it is known, before any buffer exists."""
    sizes = check if sizes is None else sizes
    shapes: dict[str, Shape] = {}
    for node in graph.nodes:
        if is_input(node.op):
            shape = graph.input_shapes[node.name]
            if not isinstance(shape, (list, tuple)) or len(shape) < 2:
                raise ModelFileError(f"{graph.source}: input {node.name!r} has shape {shape!r}")
            shapes[node.name] = (None, *(None if d is None else d for d in shape[1:]))
            if sizes:
                _check_size(node, shapes[node.name], graph.source)
            continue
        ins = [shapes[i] if isinstance(i, str) else None for i in node.inputs]
        tensors = [s for s in ins if s is not None]
        if not tensors:
            raise ModelFileError(f"{graph.source}: layer {node.name!r} has no tensor input")
        try:
            if check:
                validate_config(node, keras_version=getattr(graph, "keras_version", 3))
            if check and tensors[0][-1] is not None:
                check_weights(node, int(tensors[0][-1]), graph.source)
            shapes[node.name] = output_shape(node, ins)
            if sizes:
                _check_window(node, tensors[0], shapes[node.name], graph.source)
        except (ModelFileError, UnsupportedLayerError) as e:
            raise _with_source(e, graph.source) from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError, OverflowError) as e:
            # A config value of the wrong type or shape, in a file: name the layer, not a line of ours.
            raise ModelFileError(f"{graph.source}: layer {node.name!r} ({node.op}) has an invalid config "
                                 f"({type(e).__name__}: {e})") from None
        if sizes:
            _check_size(node, shapes[node.name], graph.source)
    return shapes


def checked_shapes(graph, input_shapes: list[tuple[int, ...]]) -> dict[str, Shape]:
    """Every node's output shape for these actual input shapes (batch first), through the size rules of
    load time; a refusal names the layer and the input it was asked for."""
    concrete = {name: tuple(shape) for name, shape in zip(graph.inputs, input_shapes)}
    shaped = replace(graph, input_shapes=concrete)
    try:
        return infer_shapes(shaped, check=False, sizes=True)
    except ModelFileError as error:
        shown = ", ".join(str(tuple(shape)) for shape in input_shapes)
        raise ModelFileError(f"{error} (for an input of shape {shown})") from None


def check_plan_total(graph, buffer_sizes: list[int], input_shapes: list[tuple[int, ...]]) -> None:
    """Refuse a plan whose buffers together hold more than MAX_PLAN_VALUES per image: each layer may pass
    the per-layer rule while the values alive at once add up (wide branches)."""
    batch = max(int(input_shapes[0][0]), 1)
    total = sum(buffer_sizes) // batch
    if total > MAX_PLAN_VALUES:
        shown = ", ".join(str(tuple(shape)) for shape in input_shapes)
        raise ModelFileError(f"{graph.source}: running the model on an input of shape {shown} needs {total:,} "
                             f"values per image in its buffers, more than {MAX_PLAN_VALUES:,}; refusing it")


def check_values_alive(graph, shapes: dict[str, Shape], keep: set[str], input_shapes: list[tuple[int, ...]]) -> None:
    """The same bound for a run that keeps every value until its last reader has run (the reference path):
    the most values alive at once, per image, at most MAX_PLAN_VALUES."""
    nodes = [n for n in graph.nodes if not is_input(n.op)]
    last = last_readers(nodes)
    alive: dict[str, int] = {}
    peak = 0
    for index, node in enumerate(nodes):
        alive[node.name] = math.prod(d or 1 for d in shapes[node.name][1:])
        peak = max(peak, sum(alive.values()))
        for source in {i for i in node.inputs if isinstance(i, str)}:
            if last[source] == index and source not in keep:
                alive.pop(source, None)
    check_plan_total(graph, [peak * max(int(input_shapes[0][0]), 1)], input_shapes)


def _positive_ints(node: Node, key: str, value, count: int | None = None) -> None:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if (count is not None and len(values) not in (1, count)) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
        raise ModelFileError(f"layer {node.name!r} ({node.op}): {key}={value!r} must be positive integers")


def validate_config(node: Node, keras_version: int = 3) -> None:
    """Check the config values a layer uses have sane types, so a hostile or garbled file fails at load
    with the layer's name instead of deep inside a kernel."""
    c = node.config
    if not isinstance(c, dict):
        raise ModelFileError(f"layer {node.name!r} ({node.op}): config is not a mapping")
    check_channels_last(node)  # a channels_first file would silently give other answers
    for key in ("kernel_size", "strides", "dilation_rate", "pool_size"):
        if key in c and c[key] is not None:
            _positive_ints(node, key, c[key], 2)
    for key in ("filters", "units", "depth_multiplier"):
        if key in c:
            _positive_ints(node, key, c[key])
    padding = c.get("padding")
    if layer_type(node.op).window and padding not in ("same", "valid") and not isinstance(padding, (list, tuple)):
        raise ModelFileError(f"layer {node.name!r} ({node.op}): padding={padding!r} is not 'same' or 'valid'")
    for key in ("max_value", "negative_slope", "threshold", "epsilon"):
        value = c.get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value != value):
            raise ModelFileError(f"layer {node.name!r} ({node.op}): {key}={value!r} is not a number")
    validate = layer_type(node.op).validate
    if validate is not None:
        validate(node, keras_version)

