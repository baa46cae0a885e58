"""What each Keras layer means, in terms of kernels.

One function per Keras class: it reads the layer's config (padding="same", activation names,
Keras-version quirks) and calls kernels. No arithmetic on tensors happens here beyond choosing and
calling the kernel; the interpreter calls these functions and knows nothing of layers.

``check_weights`` validates a node's weights against its config before anything runs, so a file
whose shapes disagree fails with a message naming the layer rather than a NumPy error deep inside.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from npmobile.activations import FUSABLE_ACTIVATIONS, activation_function
from npmobile.errors import ModelFileError, UnsupportedLayerError
from npmobile.graph import Node
from npmobile.kernels import reference as K


def _pair(value) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        return (int(value[0]), int(value[-1]))
    return (int(value), int(value))


def epilogue_activation(node: Node) -> str | None:
    """The epilogue activation an activation node amounts to, if a kernel can apply it."""
    if node.op == "ReLU":
        c = node.config
        if float(c.get("negative_slope") or 0) != 0 or float(c.get("threshold") or 0) != 0:
            return None
        max_value = c.get("max_value")
        if max_value is None:
            return "relu"
        return "relu6" if float(max_value) == 6.0 else None
    if node.op == "Activation":
        name = node.config.get("activation")
        return name if name in FUSABLE_ACTIVATIONS else None
    return None


def _activate(x: np.ndarray, node: Node, keras_version: int) -> np.ndarray:
    fn = activation_function(node.config.get("activation"), keras_version)
    return x if fn is None else fn(x)


def conv_padding(node: Node, in_hw: tuple[int, int], kernel_hw, strides, dilation) -> K.Padding:
    """Explicit ((top, bottom), (left, right)) padding for a conv or pooling node."""
    padding = node.config.get("padding", "valid")
    if isinstance(padding, (list, tuple)):  # already explicit (the ZeroPadding2D fusion pass writes it)
        return tuple(tuple(int(v) for v in p) for p in padding)
    if padding == "valid":
        return K.NO_PADDING
    if padding == "same":
        return (
            K.same_padding(in_hw[0], kernel_hw[0], strides[0], dilation[0]),
            K.same_padding(in_hw[1], kernel_hw[1], strides[1], dilation[1]),
        )
    raise UnsupportedLayerError(f"layer {node.name!r}: padding {padding!r} is not supported")


def _check_channels_last(node: Node) -> None:
    fmt = node.config.get("data_format")
    if fmt not in (None, "channels_last"):
        raise UnsupportedLayerError(f"layer {node.name!r} uses data_format={fmt!r}; npmobile runs channels_last")


# --------------------------------------------------------------------------------------------------
# Layer functions: (node, inputs, keras_version) -> output
# --------------------------------------------------------------------------------------------------


def run_conv2d(node: Node, inputs, keras_version: int) -> np.ndarray:
    x = inputs[0]
    if "input_scale" in node.config:  # a Rescaling folded in by the passes: it comes before the padding
        x = K.rescale(x, node.config["input_scale"], node.config["input_offset"])
    kernel = node.weights["kernel"]
    strides = _pair(node.config.get("strides", 1))
    dilation = _pair(node.config.get("dilation_rate", 1))
    padding = conv_padding(node, x.shape[1:3], kernel.shape[:2], strides, dilation)
    bias = node.weights.get("bias")
    if kernel.shape[:2] == (1, 1) and strides == (1, 1) and padding == K.NO_PADDING:
        y = K.pointwise_conv2d(x, kernel[0, 0], bias)
    else:
        y = K.conv2d(x, kernel, bias, strides, padding, dilation)
    if node.config.get("residual"):  # set by the residual-add fusion pass: Keras adds after the bias
        y = y + inputs[1]
    return _activate(y, node, keras_version)


def run_depthwise_conv2d(node: Node, inputs, keras_version: int) -> np.ndarray:
    x = inputs[0]
    kernel = node.weights["depthwise_kernel"]
    strides = _pair(node.config.get("strides", 1))
    dilation = _pair(node.config.get("dilation_rate", 1))
    padding = conv_padding(node, x.shape[1:3], kernel.shape[:2], strides, dilation)
    y = K.depthwise_conv2d(x, kernel, node.weights.get("bias"), strides, padding, dilation)
    return _activate(y, node, keras_version)


def run_separable_conv2d(node: Node, inputs, keras_version: int) -> np.ndarray:
    x = inputs[0]
    depthwise = node.weights["depthwise_kernel"]
    strides = _pair(node.config.get("strides", 1))
    dilation = _pair(node.config.get("dilation_rate", 1))
    padding = conv_padding(node, x.shape[1:3], depthwise.shape[:2], strides, dilation)
    y = K.depthwise_conv2d(x, depthwise, None, strides, padding, dilation)
    y = K.pointwise_conv2d(y, node.weights["pointwise_kernel"][0, 0], node.weights.get("bias"))
    return _activate(y, node, keras_version)


def run_batch_norm(node: Node, inputs, keras_version: int) -> np.ndarray:
    w = node.weights
    return K.batch_norm(
        inputs[0], w.get("gamma"), w.get("beta"), w["moving_mean"], w["moving_variance"],
        float(node.config.get("epsilon", 1e-3)),
    )


def run_relu(node: Node, inputs, keras_version: int) -> np.ndarray:
    c = node.config
    max_value = c.get("max_value")
    return K.relu(
        inputs[0],
        None if max_value is None else float(max_value),
        float(c.get("negative_slope", c.get("alpha", 0.0)) or 0.0),
        float(c.get("threshold", 0.0) or 0.0),
    )


def run_activation(node: Node, inputs, keras_version: int) -> np.ndarray:
    return _activate(inputs[0], node, keras_version)


def run_softmax(node: Node, inputs, keras_version: int) -> np.ndarray:
    axis = node.config.get("axis", -1)
    return K.softmax(inputs[0], axis=axis if isinstance(axis, int) else axis[0])


def run_zero_padding(node: Node, inputs, keras_version: int) -> np.ndarray:
    padding = node.config.get("padding", 1)
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    padding = tuple(_pair(p) for p in padding)
    return K.zero_pad(inputs[0], padding)


def run_add(node: Node, inputs, keras_version: int) -> np.ndarray:
    y = inputs[0]
    for other in inputs[1:]:
        y = y + other  # a scalar operand is a Python float: NumPy rounds it to y's dtype
    return y


def run_multiply(node: Node, inputs, keras_version: int) -> np.ndarray:
    y = inputs[0]
    for other in inputs[1:]:
        y = y * other
    return y


def run_concatenate(node: Node, inputs, keras_version: int) -> np.ndarray:
    return np.concatenate(inputs, axis=int(node.config.get("axis", -1)))


def run_rescaling(node: Node, inputs, keras_version: int) -> np.ndarray:
    scale, offset = node.config.get("scale", 1.0), node.config.get("offset", 0.0)
    if isinstance(scale, (list, tuple)) or isinstance(offset, (list, tuple)):
        x = inputs[0]
        return (x * np.asarray(scale, x.dtype) + np.asarray(offset, x.dtype)).astype(x.dtype, copy=False)
    return K.rescale(inputs[0], float(scale), float(offset))


def run_global_average_pool(node: Node, inputs, keras_version: int) -> np.ndarray:
    _check_channels_last(node)
    return K.global_average_pool(inputs[0], bool(node.config.get("keepdims", False)))


def run_global_max_pool(node: Node, inputs, keras_version: int) -> np.ndarray:
    _check_channels_last(node)
    return K.global_max_pool(inputs[0], bool(node.config.get("keepdims", False)))


def _pool_params(node: Node, x: np.ndarray):
    _check_channels_last(node)
    pool = _pair(node.config.get("pool_size", 2))
    strides = node.config.get("strides")
    strides = pool if strides is None else _pair(strides)
    return pool, strides, conv_padding(node, x.shape[1:3], pool, strides, (1, 1))


def run_average_pool(node: Node, inputs, keras_version: int) -> np.ndarray:
    pool, strides, padding = _pool_params(node, inputs[0])
    return K.average_pool2d(inputs[0], pool, strides, padding)


def run_max_pool(node: Node, inputs, keras_version: int) -> np.ndarray:
    pool, strides, padding = _pool_params(node, inputs[0])
    return K.max_pool2d(inputs[0], pool, strides, padding)


def run_reshape(node: Node, inputs, keras_version: int) -> np.ndarray:
    x = inputs[0]
    target = [int(d) if d is not None else -1 for d in node.config["target_shape"]]
    try:
        return x.reshape((x.shape[0], *target))
    except ValueError:
        raise ModelFileError(
            f"layer {node.name!r}: cannot reshape {x.shape[1:]} to {tuple(target)}"
        ) from None


def run_flatten(node: Node, inputs, keras_version: int) -> np.ndarray:
    x = inputs[0]
    return x.reshape(x.shape[0], -1)


def run_dense(node: Node, inputs, keras_version: int) -> np.ndarray:
    y = K.dense(inputs[0], node.weights["kernel"], node.weights.get("bias"))
    return _activate(y, node, keras_version)


def run_identity(node: Node, inputs, keras_version: int) -> np.ndarray:
    return inputs[0]


def run_squeeze_excite(node: Node, inputs, keras_version: int) -> np.ndarray:
    """The node the squeeze-excite fusion pass makes of MobileNetV3's eight SE layers."""
    w = node.weights
    return K.squeeze_excite(inputs[0], w["reduce_kernel"], w["reduce_bias"], w["expand_kernel"], w["expand_bias"])


LAYER_FUNCTIONS: dict[str, Callable] = {
    "Conv2D": run_conv2d,
    "DepthwiseConv2D": run_depthwise_conv2d,
    "SeparableConv2D": run_separable_conv2d,
    "BatchNormalization": run_batch_norm,
    "ReLU": run_relu,
    "Activation": run_activation,
    "Softmax": run_softmax,
    "ZeroPadding2D": run_zero_padding,
    "Add": run_add,
    "Multiply": run_multiply,
    "Concatenate": run_concatenate,
    "Rescaling": run_rescaling,
    "GlobalAveragePooling2D": run_global_average_pool,
    "GlobalMaxPooling2D": run_global_max_pool,
    "AveragePooling2D": run_average_pool,
    "MaxPooling2D": run_max_pool,
    "Reshape": run_reshape,
    "Flatten": run_flatten,
    "Dense": run_dense,
    "Dropout": run_identity,
    "SqueezeExcite": run_squeeze_excite,
}


# --------------------------------------------------------------------------------------------------
# Weight checks: what each class needs, compared with what the file holds
# --------------------------------------------------------------------------------------------------


def expected_weight_shapes(node: Node, in_channels: int) -> dict[str, tuple[int, ...]]:
    """The weight shapes a layer with this config needs, given its input's channel count."""
    c = node.config
    op = node.op
    if op == "Conv2D":
        kh, kw = _pair(c["kernel_size"])
        if int(c.get("groups", 1) or 1) != 1:
            raise UnsupportedLayerError(f"layer {node.name!r}: grouped Conv2D (groups={c['groups']}) is not supported")
        shapes = {"kernel": (kh, kw, in_channels, int(c["filters"]))}
        if c.get("use_bias", True):
            shapes["bias"] = (int(c["filters"]),)
        return shapes
    if op == "DepthwiseConv2D":
        kh, kw = _pair(c["kernel_size"])
        m = int(c.get("depth_multiplier", 1))
        shapes = {"depthwise_kernel": (kh, kw, in_channels, m)}
        if c.get("use_bias", True):
            shapes["bias"] = (in_channels * m,)
        return shapes
    if op == "SeparableConv2D":
        kh, kw = _pair(c["kernel_size"])
        m = int(c.get("depth_multiplier", 1))
        shapes = {
            "depthwise_kernel": (kh, kw, in_channels, m),
            "pointwise_kernel": (1, 1, in_channels * m, int(c["filters"])),
        }
        if c.get("use_bias", True):
            shapes["bias"] = (int(c["filters"]),)
        return shapes
    if op == "BatchNormalization":
        axis = c.get("axis", -1)
        axis = axis[0] if isinstance(axis, (list, tuple)) else axis
        if axis not in (-1, 3):
            raise UnsupportedLayerError(f"layer {node.name!r}: BatchNormalization over axis {axis} is not supported")
        shapes = {"moving_mean": (in_channels,), "moving_variance": (in_channels,)}
        if c.get("scale", True):
            shapes["gamma"] = (in_channels,)
        if c.get("center", True):
            shapes["beta"] = (in_channels,)
        return shapes
    if op == "Dense":
        shapes = {"kernel": (in_channels, int(c["units"]))}
        if c.get("use_bias", True):
            shapes["bias"] = (int(c["units"]),)
        return shapes
    return {}


def check_weights(node: Node, in_channels: int, source: str = "") -> None:
    """Raise ModelFileError if the node's weights are missing or do not fit its config."""
    where = f"{source + ': ' if source else ''}layer {node.name!r} ({node.op})"
    expected = expected_weight_shapes(node, in_channels)
    for var, shape in expected.items():
        if var not in node.weights:
            raise ModelFileError(f"{where}: weight {var!r} is missing")
        found = tuple(node.weights[var].shape)
        if found != shape:
            raise ModelFileError(f"{where}: weight {var!r} has shape {found}, the layer needs {shape}")
    extra = set(node.weights) - set(expected)
    if extra and expected:
        raise ModelFileError(f"{where}: unexpected weights {sorted(extra)}")


# --------------------------------------------------------------------------------------------------
# Shapes: what each layer outputs, worked out from configs alone (batch and unknown sizes are None)
# --------------------------------------------------------------------------------------------------

Shape = tuple


def _window_out(size, kernel: int, stride: int, dilation: int, padding, axis: int):
    if size is None:
        return None
    if padding == "same":
        return -(-size // stride)
    pad = (0, 0) if padding == "valid" else tuple(padding[axis])
    return (size + pad[0] + pad[1] - (kernel - 1) * dilation - 1) // stride + 1


def _spatial(node: Node, shape: Shape, kernel_hw, strides, dilation) -> tuple:
    padding = node.config.get("padding", "valid")
    return tuple(_window_out(shape[1 + a], kernel_hw[a], strides[a], dilation[a], padding, a) for a in (0, 1))


def _broadcast(node: Node, shapes: list[Shape]) -> Shape:
    rank = max(len(s) for s in shapes)
    out = []
    for axis in range(rank):
        dims = {s[axis - rank + len(s)] for s in shapes if axis - rank + len(s) >= 0} - {1}
        known = {d for d in dims if d is not None}
        if len(known) > 1:
            raise ModelFileError(f"layer {node.name!r} ({node.op}) combines tensors of shapes {shapes}")
        out.append(known.pop() if known else (None if None in dims else 1))
    return (None, *out[1:])


def output_shape(node: Node, inputs: list[Shape]) -> Shape:
    """The shape of a node's output given its inputs' shapes (NHWC; None where unknown)."""
    c = node.config
    op = node.op
    x = next(s for s in inputs if s is not None)
    if op in ("Conv2D", "DepthwiseConv2D", "SeparableConv2D"):
        h, w = _spatial(node, x, _pair(c["kernel_size"]), _pair(c.get("strides", 1)), _pair(c.get("dilation_rate", 1)))
        channels = x[-1] * int(c.get("depth_multiplier", 1)) if op == "DepthwiseConv2D" else int(c["filters"])
        return (None, h, w, channels)
    if op in ("AveragePooling2D", "MaxPooling2D"):
        pool = _pair(c.get("pool_size", 2))
        strides = pool if c.get("strides") is None else _pair(c["strides"])
        h, w = _spatial(node, x, pool, strides, (1, 1))
        return (None, h, w, x[-1])
    if op == "ZeroPadding2D":
        padding = c.get("padding", 1)
        if isinstance(padding, int):
            padding = ((padding, padding), (padding, padding))
        (t, b), (left, r) = (_pair(p) for p in padding)
        return (None, None if x[1] is None else x[1] + t + b, None if x[2] is None else x[2] + left + r, x[3])
    if op in ("GlobalAveragePooling2D", "GlobalMaxPooling2D"):
        return (None, 1, 1, x[-1]) if c.get("keepdims") else (None, x[-1])
    if op == "Dense":
        return (*x[:-1], int(c["units"]))
    if op == "Flatten":
        size = 1
        for d in x[1:]:
            size = None if size is None or d is None else size * d
        return (None, size)
    if op == "Reshape":
        target = [None if d in (None, -1) else int(d) for d in c["target_shape"]]
        if target.count(None) > 1:
            raise ModelFileError(f"layer {node.name!r}: target_shape {c['target_shape']} has more than one -1")
        known = 1
        for d in x[1:]:
            known = None if known is None or d is None else known * d
        if None in target and known is not None:
            rest = 1
            for d in target:
                rest *= d or 1
            target = [known // rest if d is None else d for d in target]
        elif known is not None and int(np.prod(target)) != known:
            raise ModelFileError(f"layer {node.name!r}: cannot reshape {x[1:]} to {tuple(target)}")
        return (None, *target)
    if op in ("Add", "Multiply"):
        return _broadcast(node, [s for s in inputs if s is not None])
    if op == "Concatenate":
        axis = int(c.get("axis", -1))
        out = list(x)
        out[axis] = None if any(s[axis] is None for s in inputs) else sum(s[axis] for s in inputs)
        return tuple(out)
    return x  # elementwise layers: BatchNorm, activations, Rescaling, Dropout, SqueezeExcite


# No MobileNet tensor comes near this many values per image; a config that asks for more is refused
# before anything is allocated (a hostile file could otherwise ask for terabytes).
MAX_ELEMENTS = 2**28


def _check_size(node: Node, shape: Shape, source: str) -> None:
    dims = [d for d in shape[1:] if d is not None]
    where = f"{source + ': ' if source else ''}layer {node.name!r} ({node.op})"
    if any(not isinstance(d, int) or d < 1 for d in dims):
        raise ModelFileError(f"{where}: output shape {shape} is impossible (input too small for its kernels?)")
    size = 1
    for d in dims:
        size *= d
    if size > MAX_ELEMENTS:
        raise ModelFileError(f"{where}: output shape {shape} has {size:,} values per image; refusing it")


# The widest window (kernel or pool, dilation included) along one axis, and the most window
# positions x window size one layer may visit per image. MobileNets use 3x3 to 7x7 windows; a file
# asking for more would allocate a huge padded copy, or materialize billions of windows, at run time.
MAX_WINDOW = 2**12
MAX_WINDOW_WORK = 2**30
_WINDOWED = ("Conv2D", "DepthwiseConv2D", "SeparableConv2D", "AveragePooling2D", "MaxPooling2D")


def _check_window(node: Node, x: Shape, out: Shape, source: str) -> None:
    """Refuse windows so wide, or so many, that running the layer would exhaust memory or time."""
    if node.op not in _WINDOWED:
        return
    c = node.config
    where = f"{source + ': ' if source else ''}layer {node.name!r} ({node.op})"
    kernel = _pair(c.get("kernel_size") or c.get("pool_size", 2))
    dilation = _pair(c.get("dilation_rate", 1))
    strides = _pair(c.get("strides") or kernel)
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


def _with_source(error: Exception, source: str) -> Exception:
    """The same error with the file's name in front, if it does not start with it already."""
    message = str(error)
    if source and not message.startswith(source):
        message = f"{source}: {message}"
    return type(error)(message)


def infer_shapes(graph, check: bool = True) -> dict[str, Shape]:
    """Every node's output shape, from the input shapes and configs; with ``check``, every node's
    weights are validated against its config and input on the way (before anything is allocated),
    and absurd sizes are refused."""
    shapes: dict[str, Shape] = {}
    for node in graph.nodes:
        if node.op == "InputLayer":
            shape = graph.input_shapes[node.name]
            if not isinstance(shape, (list, tuple)) or len(shape) < 2:
                raise ModelFileError(f"{graph.source}: input {node.name!r} has shape {shape!r}")
            shapes[node.name] = (None, *(None if d is None else d for d in shape[1:]))
            if check:
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
            if check:
                _check_window(node, tensors[0], shapes[node.name], graph.source)
        except (ModelFileError, UnsupportedLayerError) as e:
            raise _with_source(e, graph.source) from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError, OverflowError) as e:
            # A config value of the wrong type or shape, in a file: name the layer, not a line of ours.
            raise ModelFileError(f"{graph.source}: layer {node.name!r} ({node.op}) has an invalid config "
                                 f"({type(e).__name__}: {e})") from None
        if check:
            _check_size(node, shapes[node.name], graph.source)
    return shapes


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
    _check_channels_last(node)  # a channels_first file would silently give other answers
    for key in ("kernel_size", "strides", "dilation_rate", "pool_size"):
        if key in c and c[key] is not None:
            _positive_ints(node, key, c[key], 2)
    for key in ("filters", "units", "depth_multiplier"):
        if key in c:
            _positive_ints(node, key, c[key])
    padding = c.get("padding")
    if node.op in ("Conv2D", "DepthwiseConv2D", "SeparableConv2D", "AveragePooling2D", "MaxPooling2D") and \
            padding not in ("same", "valid") and not isinstance(padding, (list, tuple)):
        raise ModelFileError(f"layer {node.name!r} ({node.op}): padding={padding!r} is not 'same' or 'valid'")
    if "activation" in c and node.op in ("Conv2D", "DepthwiseConv2D", "SeparableConv2D", "Dense", "Activation"):
        try:
            activation_function(c["activation"], keras_version)  # raises for unknown names
        except UnsupportedLayerError as error:
            raise UnsupportedLayerError(f"layer {node.name!r} ({node.op}): {error}") from None
    for key in ("max_value", "negative_slope", "threshold", "epsilon"):
        value = c.get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value != value):
            raise ModelFileError(f"layer {node.name!r} ({node.op}): {key}={value!r} is not a number")
    if node.op == "Rescaling":
        for key in ("scale", "offset"):
            value = np.asarray(c.get(key, 0.0))
            if value.dtype.kind not in "fiu" or value.ndim > 1:
                raise ModelFileError(f"layer {node.name!r} (Rescaling): {key}={c.get(key)!r} is not a number")

