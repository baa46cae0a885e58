"""MobileNetV2 and MobileNetV3 as torchvision builds them, for PyTorch state dicts.

PyTorch tutorials follow torchvision's module layout, so their state dicts name tensors by module
path: ``features.0.0.weight`` (the stem conv), ``features.1.block.0.0.weight`` (V3 blocks),
``features.1.conv.0.0.weight`` (V2 blocks), ``features.4.block.2.fc1.weight`` (squeeze-excite),
``classifier.0.weight``. These builders make the same graph on npmobile's layers, with those module
paths as layer names, so weights bind by name and ``predict(x, outputs=["features.3"])`` works.

PyTorch's arithmetic differs from Keras's MobileNets and is followed here, not Keras's:
- padding is symmetric, ``(k - 1) // 2`` on every side (Keras pads stride-2 layers on one side only);
- BatchNorm epsilon is 1e-5 in V2 and 1e-3 in V3;
- squeeze-excite is ``make_divisible(c // 4, 8)`` wide, ReLU inside, ``hardsigmoid = relu6(x + 3) / 6``
  as the gate (written as the ops npmobile's squeeze-excite fusion recognises);
- ``hardswish = x * relu6(x + 3) / 6`` (npmobile's hard_swish; PyTorch rounds it once more, < 1 ulp);
- the head is average pooling, then V2 ``Dropout -> Linear``, V3 ``Linear -> Hardswish -> Dropout -> Linear``:
  logits out, no softmax.
Layouts are PyTorch's in the file and npmobile's here: conv weights OIHW become HWIO, depthwise
[C, 1, kh, kw] becomes [kh, kw, C, 1], Linear [out, in] is transposed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from npmobile.applications.builder import Builder, Tensor
from npmobile.applications.common import make_divisible
from npmobile.errors import ModelFileError, NpmobileError, WeightsError
from npmobile.graph import Graph
from npmobile.io.torch import StateDict
from npmobile.isolation import DEFAULT_TIMEOUT
from npmobile.ops import layer_type
from npmobile.spec import ModelSpec

if TYPE_CHECKING:
    from npmobile.interpreter import Model

V2_EPS = 1e-5  # nn.BatchNorm2d's default
V3_EPS = 1e-3  # torchvision's MobileNetV3 norm_layer
DROPOUT = 0.2
# MobileNetV2: (expansion t, channels c, repeats n, first stride s), the paper's Table 2.
V2_SETTING = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
# Widths tried first when a state dict's width is worked out from its shapes, then a 0.05 grid.
COMMON_WIDTHS = (1.0, 0.75, 0.5, 0.35, 0.25, 1.25, 1.3, 1.4, 1.5, 2.0)
ARCHITECTURES = ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large")


def _v3_setting(arch: str, reduced_tail: bool, dilated: bool = False) -> tuple[list[tuple], int]:
    """(kernel, expanded, out, squeeze-excite, activation, stride, dilation) per block, the paper's Tables 1-2,
    and the classifier's hidden width; ``reduced_tail`` halves the last blocks and ``dilated`` gives them
    dilation 2 (torchvision's options, for segmentation backbones: the last stage keeps its input's resolution)."""
    setting, last_channel = _v3_table(arch, reduced_tail)
    last_stage = len(setting) - 3  # C4: the last stride-2 block and the two after it
    dilation = [2 if dilated and index >= last_stage else 1 for index in range(len(setting))]
    return [(*row, d) for row, d in zip(setting, dilation)], last_channel


def _v3_table(arch: str, reduced_tail: bool) -> tuple[list[tuple], int]:
    d = 2 if reduced_tail else 1
    if arch == "mobilenet_v3_large":
        return [
            (3, 16, 16, False, "relu", 1), (3, 64, 24, False, "relu", 2), (3, 72, 24, False, "relu", 1),
            (5, 72, 40, True, "relu", 2), (5, 120, 40, True, "relu", 1), (5, 120, 40, True, "relu", 1),
            (3, 240, 80, False, "hardswish", 2), (3, 200, 80, False, "hardswish", 1),
            (3, 184, 80, False, "hardswish", 1), (3, 184, 80, False, "hardswish", 1),
            (3, 480, 112, True, "hardswish", 1), (3, 672, 112, True, "hardswish", 1),
            (5, 672, 160 // d, True, "hardswish", 2), (5, 960 // d, 160 // d, True, "hardswish", 1),
            (5, 960 // d, 160 // d, True, "hardswish", 1),
        ], 1280 // d
    if arch == "mobilenet_v3_small":
        return [
            (3, 16, 16, True, "relu", 2), (3, 72, 24, False, "relu", 2), (3, 88, 24, False, "relu", 1),
            (5, 96, 40, True, "hardswish", 2), (5, 240, 40, True, "hardswish", 1),
            (5, 240, 40, True, "hardswish", 1), (5, 120, 48, True, "hardswish", 1),
            (5, 144, 48, True, "hardswish", 1), (5, 288, 96 // d, True, "hardswish", 2),
            (5, 576 // d, 96 // d, True, "hardswish", 1), (5, 576 // d, 96 // d, True, "hardswish", 1),
        ], 1024 // d
    raise NpmobileError(f"unknown architecture {arch!r} (choose from {', '.join(ARCHITECTURES)})")


def _as_torchvision(model: Model, arch: str, width_mult: float, reduced_tail: bool, dilated: bool) -> Model:
    """Mark a Model as torchvision's: it outputs logits and wants its images the torchvision way
    (npmobile.image.load_torchvision), which the CLI reads from ``preprocessing`` and ``outputs_logits``."""
    model.preprocessing = "torchvision"
    model.outputs_logits = True
    model.arch, model.width_mult, model.reduced_tail, model.dilated = arch, width_mult, reduced_tail, dilated
    model.num_classes = int(model.shapes[model.graph.outputs[0]][-1])
    return model


# --------------------------------------------------------------------------------------------------
# Building blocks, named by module path
# --------------------------------------------------------------------------------------------------


class _Net:
    """A Builder plus the module aliases: ``features.3`` names the output of its last layer."""

    def __init__(self, eps: float):
        self.b = Builder()
        self.eps = eps
        self.aliases: dict[str, str] = {}

    def alias(self, module: str, x: Tensor) -> Tensor:
        self.aliases[module] = x.ref.layer
        return x

    def activation(self, x: Tensor, kind: str | None, name: str) -> Tensor:
        if kind == "relu6":
            return self.b.relu(x, 6.0, name=name)
        if kind == "relu":
            return self.b.relu(x, name=name)
        if kind == "hardswish":
            return self.b.activation(x, "hard_swish", name=name)
        return x

    def conv_norm_act(self, x: Tensor, out: int, kernel: int, stride: int, act: str | None, prefix: str,
                      depthwise: bool = False, dilation: int = 1) -> Tensor:
        """torchvision's Conv2dNormActivation: ``prefix.0`` conv (no bias), ``.1`` BatchNorm, ``.2`` activation."""
        padding = _padding(kernel, dilation)
        if depthwise:
            x = self.b.depthwise_conv2d(x, kernel, strides=stride, padding=padding, name=f"{prefix}.0",
                                        dilation=dilation)
        else:
            x = self.b.conv2d(x, out, kernel, strides=stride, padding=padding, use_bias=False, name=f"{prefix}.0")
        x = self.b.batch_norm(x, name=f"{prefix}.1", epsilon=self.eps)
        if act is not None:
            x = self.activation(x, act, f"{prefix}.2")
        return self.alias(prefix, x)

    def squeeze_excite(self, x: Tensor, prefix: str) -> Tensor:
        """torchvision.ops.SqueezeExcitation: avgpool, fc1 (1x1 conv), ReLU, fc2, hardsigmoid, times the input."""
        b = self.b
        s = b.global_average_pool(x, keepdims=True, name=f"{prefix}.avgpool")
        s = b.conv2d(s, make_divisible(x.channels // 4, 8), 1, padding="valid", name=f"{prefix}.fc1")
        s = b.relu(s, name=f"{prefix}.activation")
        s = b.conv2d(s, x.channels, 1, padding="valid", name=f"{prefix}.fc2")
        # hardsigmoid = relu6(x + 3) / 6, spelled as the three ops fuse_squeeze_excite turns into one kernel
        s = b.add([s, 3.0], name=f"{prefix}.scale_activation.add")
        s = b.relu(s, 6.0, name=f"{prefix}.scale_activation.relu6")
        s = b.multiply([s, 1.0 / 6.0], name=f"{prefix}.scale_activation")
        return b.multiply([x, s], name=prefix)

    def head(self, x: Tensor, layers: list[tuple]) -> Tensor:
        """avgpool + flatten, then the classifier: ("dense", units) / ("hardswish",) / ("dropout",)."""
        x = self.b.global_average_pool(x, keepdims=True, name="avgpool")  # (N, C, 1, 1), as nn.AdaptiveAvgPool2d
        x = self.b.flatten(x, name="flatten")
        for i, (kind, *args) in enumerate(layers):
            if kind == "dense":
                x = self.b.dense(x, args[0], name=f"classifier.{i}")
            elif kind == "dropout":
                x = self.b.dropout(x, DROPOUT, name=f"classifier.{i}")
            else:
                x = self.activation(x, kind, f"classifier.{i}")
        return self.alias("classifier", x)


def _padding(kernel: int, dilation: int = 1):
    """torchvision's ``padding=(k - 1) // 2 * dilation``: the same on all four sides, whatever the stride."""
    p = (kernel - 1) // 2 * dilation
    return "valid" if p == 0 else ((p, p), (p, p))


def _input_shape(input_shape) -> tuple:
    shape = (None, None, 3) if input_shape is None else tuple(None if d is None else int(d) for d in input_shape)
    if len(shape) != 3:
        raise NpmobileError(f"input_shape must be (height, width, channels); got {shape}")
    return shape


def build_mobilenet_v2(width_mult: float = 1.0, num_classes: int = 1000, input_shape=None) -> tuple[_Net, ModelSpec]:
    net = _Net(V2_EPS)
    b = net.b
    inputs = b.input(_input_shape(input_shape), name="input")
    channels = make_divisible(32 * width_mult, 8)
    x = net.conv_norm_act(inputs, channels, 3, 2, "relu6", "features.0")
    index = 1
    for t, c, n, s in V2_SETTING:
        out = make_divisible(c * width_mult, 8)
        for i in range(n):
            x = _v2_block(net, x, out, s if i == 0 else 1, t, f"features.{index}")
            index += 1
    last = make_divisible(1280 * max(1.0, width_mult), 8)
    x = net.conv_norm_act(x, last, 1, 1, "relu6", f"features.{index}")
    net.alias("features", x)
    x = net.head(x, [("dropout",), ("dense", num_classes)])
    return net, b.spec(inputs, x, "mobilenet_v2")


def _v2_block(net: _Net, inputs: Tensor, out: int, stride: int, expansion: int, prefix: str) -> Tensor:
    """InvertedResidual: ``conv.0`` expand (if t != 1), depthwise, then a plain 1x1 conv and BatchNorm."""
    hidden = int(round(inputs.channels * expansion))
    x, i = inputs, 0
    if expansion != 1:
        x = net.conv_norm_act(x, hidden, 1, 1, "relu6", f"{prefix}.conv.{i}")
        i += 1
    x = net.conv_norm_act(x, hidden, 3, stride, "relu6", f"{prefix}.conv.{i}", depthwise=True)
    x = net.b.conv2d(x, out, 1, padding="valid", use_bias=False, name=f"{prefix}.conv.{i + 1}")
    x = net.b.batch_norm(x, name=f"{prefix}.conv.{i + 2}", epsilon=net.eps)
    net.alias(f"{prefix}.conv", x)
    if stride == 1 and inputs.channels == out:
        return net.b.add([inputs, x], name=prefix)
    return net.alias(prefix, x)


def build_mobilenet_v3(arch: str, width_mult: float = 1.0, num_classes: int = 1000, reduced_tail: bool = False,
                       input_shape=None, dilated: bool = False) -> tuple[_Net, ModelSpec]:
    setting, last_channel = _v3_setting(arch, reduced_tail, dilated)
    net = _Net(V3_EPS)
    b = net.b
    inputs = b.input(_input_shape(input_shape), name="input")
    width = lambda c: make_divisible(c * width_mult, 8)  # noqa: E731 -- torchvision's adjust_channels
    x = net.conv_norm_act(inputs, width(16), 3, 2, "hardswish", "features.0")
    for index, (kernel, expanded, out, se, act, stride, dilation) in enumerate(setting, start=1):
        x = _v3_block(net, x, kernel, width(expanded), width(out), se, act, stride, dilation, f"features.{index}")
    x = net.conv_norm_act(x, 6 * x.channels, 1, 1, "hardswish", f"features.{len(setting) + 1}")
    net.alias("features", x)
    x = net.head(x, [("dense", width(last_channel)), ("hardswish",), ("dropout",), ("dense", num_classes)])
    return net, b.spec(inputs, x, arch)


def _v3_block(net: _Net, inputs: Tensor, kernel: int, expanded: int, out: int, se: bool, act: str, stride: int,
              dilation: int, prefix: str) -> Tensor:
    """InvertedResidual: ``block.0`` expand (if the width changes), depthwise, squeeze-excite, project.
    A dilated depthwise layer runs at stride 1 (its input's resolution kept); the residual still follows the
    table's stride, as torchvision's does."""
    x, i = inputs, 0
    if expanded != inputs.channels:
        x = net.conv_norm_act(x, expanded, 1, 1, act, f"{prefix}.block.{i}")
        i += 1
    x = net.conv_norm_act(x, expanded, kernel, 1 if dilation > 1 else stride, act, f"{prefix}.block.{i}",
                          depthwise=True, dilation=dilation)
    i += 1
    if se:
        x = net.squeeze_excite(x, f"{prefix}.block.{i}")
        i += 1
    x = net.conv_norm_act(x, out, 1, 1, None, f"{prefix}.block.{i}")
    net.alias(f"{prefix}.block", x)
    if stride == 1 and inputs.channels == out:
        return net.b.add([inputs, x], name=prefix)
    return net.alias(prefix, x)


def _build(arch: str, width_mult: float, num_classes: int, reduced_tail: bool, input_shape=None,
           dilated: bool = False):
    if arch == "mobilenet_v2":
        return build_mobilenet_v2(width_mult, num_classes, input_shape)
    return build_mobilenet_v3(arch, width_mult, num_classes, reduced_tail, input_shape, dilated)


# --------------------------------------------------------------------------------------------------
# PyTorch tensors <-> npmobile weights
# --------------------------------------------------------------------------------------------------

# npmobile variable -> (PyTorch tensor suffix, how to turn the PyTorch array into npmobile's layout)
_LAYOUTS: dict[str, dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]]] = {
    "Conv2D": {"kernel": ("weight", lambda w: w.transpose(2, 3, 1, 0)), "bias": ("bias", lambda w: w)},
    "DepthwiseConv2D": {"depthwise_kernel": ("weight", lambda w: w.transpose(2, 3, 0, 1))},
    "BatchNormalization": {"gamma": ("weight", lambda w: w), "beta": ("bias", lambda w: w),
                           "moving_mean": ("running_mean", lambda w: w),
                           "moving_variance": ("running_var", lambda w: w)},
    "Dense": {"kernel": ("weight", lambda w: w.T), "bias": ("bias", lambda w: w)},
}


def _torch_shape(op: str, var: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The PyTorch shape of an npmobile variable of ``shape`` (the inverse of _LAYOUTS)."""
    if op == "Conv2D" and var == "kernel":
        return (shape[3], shape[2], shape[0], shape[1])
    if op == "DepthwiseConv2D":
        return (shape[2] * shape[3], 1, shape[0], shape[1])
    if op == "Dense" and var == "kernel":
        return (shape[1], shape[0])
    return shape


def expected_state_dict(spec: ModelSpec, in_channels: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """Every tensor a torchvision model of this architecture holds, with its PyTorch shape."""
    shapes = {}
    for layer in spec.layers:
        if layer.class_name not in _LAYOUTS:
            continue
        for var, shape in layer_type(layer.class_name).weights(layer.config, in_channels[layer.name]).items():
            suffix = _LAYOUTS[layer.class_name][var][0]
            shapes[f"{layer.name}.{suffix}"] = _torch_shape(layer.class_name, var, shape)
    return shapes


def bind_state_dict(spec: ModelSpec, in_channels: dict[str, int], tensors: dict[str, np.ndarray], source: str,
                    what: str) -> None:
    """Put a state dict's tensors on the layers of ``spec``, strictly (as ``load_state_dict(strict=True)``):
    every tensor the architecture needs, of its shape, and no other."""
    expected = expected_state_dict(spec, in_channels)
    for key, shape in expected.items():
        if key not in tensors:
            raise WeightsError(f"{source}: no tensor {key!r}, which {what} needs (a different architecture or width?)")
        if tuple(tensors[key].shape) != shape:
            raise WeightsError(f"{source}: tensor {key!r} has shape {tuple(tensors[key].shape)}, {what} needs {shape} "
                               "(a different width or num_classes?)")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise WeightsError(f"{source}: unexpected tensor {unexpected[0]!r}{more} for {what} "
                           "(a different architecture?)")
    for layer in spec.layers:
        for var, (suffix, to_npmobile) in _LAYOUTS.get(layer.class_name, {}).items():
            key = f"{layer.name}.{suffix}"
            if key in expected:
                array = tensors[key]
                if array.dtype.kind != "f":
                    raise WeightsError(f"{source}: tensor {key!r} holds {array.dtype} values, not floats")
                spec.weights.setdefault(layer.name, {})[var] = np.ascontiguousarray(to_npmobile(array), np.float32)


def random_state_dict(spec: ModelSpec, in_channels: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """A seeded state dict as torchvision initializes one (Kaiming-normal convs, N(0, 0.01) Linear,
    identity BatchNorm), for ``weights=None``."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for key, shape in expected_state_dict(spec, in_channels).items():
        if key.endswith("running_var") or (key.endswith("weight") and len(shape) == 1):  # BatchNorm: identity
            tensors[key] = np.ones(shape, np.float32)
        elif key.endswith(("bias", "running_mean")):
            tensors[key] = np.zeros(shape, np.float32)
        elif len(shape) == 4:  # kaiming_normal_(mode="fan_out"): fan_out = out_channels * kh * kw
            tensors[key] = rng.normal(0, np.sqrt(2.0 / (shape[0] * shape[2] * shape[3])), shape).astype(np.float32)
        else:
            tensors[key] = rng.normal(0, 0.01, shape).astype(np.float32)
    return tensors


# --------------------------------------------------------------------------------------------------
# Which architecture a state dict is
# --------------------------------------------------------------------------------------------------


def identify(tensors: dict[str, np.ndarray], source: str) -> dict:
    """The architecture, width, classes (and V3's reduced tail) a state dict was saved from, read from
    its keys and shapes: the first configuration whose every tensor has the file's shape."""
    if "features.1.conv.0.0.weight" in tensors:
        candidates, classifier = ["mobilenet_v2"], "classifier.1.weight"
    elif "features.1.block.0.0.weight" in tensors:
        last = max(int(k.split(".")[1]) for k in tensors if k.startswith("features.") and k.split(".")[1].isdigit())
        candidates = {16: ["mobilenet_v3_large"], 12: ["mobilenet_v3_small"]}.get(last, [])
        classifier = "classifier.3.weight"
    else:
        candidates, classifier = [], ""
    if not candidates or classifier not in tensors or tensors[classifier].ndim != 2:
        raise ModelFileError(f"{source}: not a torchvision MobileNetV2/V3 state dict (no features.1.conv / "
                             "features.1.block tensors); name the architecture: "
                             "npmobile.applications.torchvision.mobilenet_v3_large(weights=PATH, ...)")
    num_classes = int(tensors[classifier].shape[0])
    stem = tensors.get("features.0.0.weight")
    widths = list(COMMON_WIDTHS) + [k / 20 for k in range(1, 61) if k / 20 not in COMMON_WIDTHS]
    for arch in candidates:
        for reduced_tail in ((False,) if arch == "mobilenet_v2" else (False, True)):
            for width in widths:
                base = 32 if arch == "mobilenet_v2" else 16
                if stem is None or stem.shape[0] != make_divisible(base * width, 8):
                    continue  # a cheap first check before building the whole architecture
                net, spec = _build(arch, width, num_classes, reduced_tail)
                expected = expected_state_dict(spec, net.b.in_channels)
                if set(expected) == set(tensors) and all(tuple(tensors[k].shape) == s for k, s in expected.items()):
                    return {"arch": arch, "width_mult": width, "num_classes": num_classes, "reduced_tail": reduced_tail}
    raise ModelFileError(f"{source}: a torchvision {candidates[0]} state dict, but no width_mult fits its shapes; "
                         f"name it: npmobile.applications.torchvision.{candidates[0]}(weights=PATH, width_mult=...)")


# --------------------------------------------------------------------------------------------------
# Public constructors
# --------------------------------------------------------------------------------------------------


def _model(arch: str, weights, width_mult: float, num_classes: int | None, reduced_tail: bool, input_shape,
           timeout: float | None, trusted: bool, dilated: bool = False) -> Model:
    if weights is None:
        tensors, source = None, f"npmobile.applications.torchvision ({arch})"
    else:
        state = weights if isinstance(weights, StateDict) else _read(arch, weights, width_mult, reduced_tail,
                                                                     timeout, trusted)
        tensors, source = state.tensors, state.source
        if num_classes is None:
            head = tensors.get("classifier.1.weight" if arch == "mobilenet_v2" else "classifier.3.weight")
            num_classes = int(head.shape[0]) if head is not None and head.ndim == 2 else None
    num_classes = 1000 if num_classes is None else int(num_classes)
    what = (f"{arch}(width_mult={width_mult}{', reduced_tail=True' if reduced_tail else ''}"
            f"{', dilated=True' if dilated else ''}, num_classes={num_classes})")
    net, spec = _build(arch, width_mult, num_classes, reduced_tail, input_shape, dilated)
    if tensors is None:
        tensors = random_state_dict(spec, net.b.in_channels)
    bind_state_dict(spec, net.b.in_channels, tensors, source, what)
    spec.source = source
    graph = Graph.from_spec(spec)
    graph.aliases.update(net.aliases)
    from npmobile.interpreter import Model  # the engine (Numba) only once a model is made

    return _as_torchvision(Model(graph), arch, width_mult, reduced_tail, dilated)


def _read(arch: str, weights, width_mult: float, reduced_tail: bool, timeout: float | None,
          trusted: bool) -> StateDict:
    """The state dict at ``weights`` (a path, or "imagenet": torchvision's file), read by the isolated reader."""
    from npmobile.isolation import read_file

    if weights == "imagenet":
        from npmobile.weights import resolve, torchvision_file

        if width_mult != 1.0 or reduced_tail:
            raise NpmobileError(f"torchvision publishes {arch} ImageNet weights for width_mult=1.0 only")
        weights = resolve(torchvision_file(arch))
    if not isinstance(weights, (str, os.PathLike)):
        raise NpmobileError(f"weights must be None, 'imagenet' or a file path; got {weights!r}")
    state = read_file(weights, "model", timeout, trusted)
    if not isinstance(state, StateDict):
        raise WeightsError(f"{os.fspath(weights)}: a Keras file, not a PyTorch state dict (.pth, .safetensors); "
                           "load it with npmobile.load_model or npmobile.applications.MobileNetV2 and kin")
    return state


def mobilenet_v2(weights=None, width_mult: float = 1.0, num_classes: int | None = None, input_shape=None,
                 timeout: float | None = DEFAULT_TIMEOUT, trusted: bool = False) -> Model:
    """torchvision.models.mobilenet_v2: ``weights`` None (random, seeded), "imagenet" (torchvision's
    IMAGENET1K_V1 file) or a .pth / .safetensors state dict path. ``num_classes`` defaults to the file's.
    The file is read in a child process bounded by ``timeout`` seconds (see npmobile.isolation), or in
    this one if ``trusted``."""
    return _model("mobilenet_v2", weights, width_mult, num_classes, False, input_shape, timeout, trusted)


def mobilenet_v3_small(weights=None, width_mult: float = 1.0, num_classes: int | None = None,
                       reduced_tail: bool = False, input_shape=None, timeout: float | None = DEFAULT_TIMEOUT,
                       trusted: bool = False, dilated: bool = False) -> Model:
    """torchvision.models.mobilenet_v3_small, as mobilenet_v2 (``reduced_tail`` halves the last blocks;
    ``dilated`` gives them dilation 2 at stride 1, as torchvision's segmentation backbones: a state dict does not
    say so, its shapes are the same, so it is named here)."""
    return _model("mobilenet_v3_small", weights, width_mult, num_classes, reduced_tail, input_shape, timeout,
                  trusted, dilated)


def mobilenet_v3_large(weights=None, width_mult: float = 1.0, num_classes: int | None = None,
                       reduced_tail: bool = False, input_shape=None, timeout: float | None = DEFAULT_TIMEOUT,
                       trusted: bool = False, dilated: bool = False) -> Model:
    """torchvision.models.mobilenet_v3_large, as mobilenet_v3_small (``reduced_tail``, ``dilated``)."""
    return _model("mobilenet_v3_large", weights, width_mult, num_classes, reduced_tail, input_shape, timeout,
                  trusted, dilated)


CONSTRUCTORS = {"mobilenet_v2": mobilenet_v2, "mobilenet_v3_small": mobilenet_v3_small,
                "mobilenet_v3_large": mobilenet_v3_large}


def model_from_state_dict(state: StateDict, input_shape=None) -> Model:
    """A state dict already read (npmobile.load_model's) as a runnable model, its architecture, width,
    classes and tail read from its tensors."""
    found = identify(state.tensors, state.source)
    arch = found.pop("arch")
    if arch == "mobilenet_v2":
        found.pop("reduced_tail")
    return CONSTRUCTORS[arch](weights=state, input_shape=input_shape, **found)
