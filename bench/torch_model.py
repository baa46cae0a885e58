"""A Keras MobileNet as a PyTorch module, for the benchmark's PyTorch engine.

The bench times PyTorch on the same weights as every other engine, so the module is built from the
same ``.keras`` file: npmobile reads it (no TensorFlow in the PyTorch process) and this file turns its
raw graph — one node per Keras layer call, not npmobile's optimized plan, so PyTorch does its own
fusing — into torch layers: Conv2d (groups=channels for DepthwiseConv2D), batch_norm in eval mode,
ReLU/ReLU6, hard-swish, Linear, and so on.

Layout: PyTorch convolutions are NCHW, Keras's NHWC. The input is permuted once, at the start; every
4-D tensor inside the module is then NCHW, and tensors of any other rank are as in Keras. Weights are
transposed once, here: a conv kernel [KH, KW, Cin, Cout] becomes [Cout, Cin, KH, KW], a depthwise
kernel [KH, KW, C, M] becomes [C*M, 1, KH, KW], a Dense kernel [in, out] becomes [out, in].

``export_torchscript(keras_file, path)`` saves it traced with TorchScript, as the bench's parent
process exports ONNX: the PyTorch engine's own process then needs only torch (``torch.jit.load`` and
``torch.jit.freeze``), so its peak memory and threads are PyTorch's alone, not npmobile's or Numba's.
The "same" paddings are worked out for the file's input height and width (224 in the bench).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from npmobile.graph import Graph, Node
from npmobile.layers import infer_shapes
from npmobile.ops.common import conv_padding, pair

# Keras axis of a 4-D NHWC tensor -> the same axis of the NCHW tensor torch holds.
NHWC_TO_NCHW_AXIS = {0: 0, 1: 2, 2: 3, 3: 1, -1: 1, -2: 3, -3: 2, -4: 0}


def _tensor(array: np.ndarray) -> nn.Parameter:
    return nn.Parameter(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)), requires_grad=False)


def _zero_padding(config: dict) -> tuple[tuple[int, int], tuple[int, int]]:
    padding = config.get("padding", 1)
    if isinstance(padding, int):
        return (padding, padding), (padding, padding)
    return tuple(pair(p) for p in padding)


def _pad(x: torch.Tensor, padding) -> torch.Tensor:
    (top, bottom), (left, right) = padding
    return F.pad(x, (left, right, top, bottom)) if top or bottom or left or right else x


def _nchw_to_keras(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1) if x.dim() == 4 else x


def _keras_to_nchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2) if x.dim() == 4 else x


def _torch_axis(axis: int, rank: int) -> int:
    return NHWC_TO_NCHW_AXIS[axis] if rank == 4 else axis


def activate(x: torch.Tensor, activation, keras_version: int = 3) -> torch.Tensor:
    """A Keras activation by name. Keras 3's hard_sigmoid is relu6(x + 3) / 6 and hard_silu is
    x * hard_sigmoid(x): torch's hardsigmoid/hardswish are the same functions (one fused op each,
    as a PyTorch user would write them; the rounding may differ in the last bit)."""
    if isinstance(activation, dict):
        activation = (activation.get("config") or {}).get("name") or activation.get("class_name")
    if activation in (None, "linear"):
        return x
    if activation == "hard_sigmoid" and keras_version < 3:
        raise NotImplementedError("Keras 2's hard_sigmoid (clip(0.2x + 0.5, 0, 1))")
    table = {
        "relu": F.relu, "relu6": F.relu6, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
        "hard_sigmoid": F.hardsigmoid, "hard_swish": F.hardswish, "hard_silu": F.hardswish,
        "swish": F.silu, "silu": F.silu,
        "softmax": lambda t: torch.softmax(t, dim=_torch_axis(-1, t.dim())),
    }
    if activation not in table:
        raise NotImplementedError(f"activation {activation!r}")
    return table[activation](x)


# --------------------------------------------------------------------------------------------------
# One torch module per Keras layer
# --------------------------------------------------------------------------------------------------


class Conv(nn.Module):
    """Conv2D, or DepthwiseConv2D (a grouped conv with one group per input channel)."""

    def __init__(self, node: Node, in_hw: tuple[int, int], keras_version: int):
        super().__init__()
        config, weights = node.config, node.weights
        if node.op == "Conv2D":
            if int(config.get("groups", 1) or 1) != 1:
                raise NotImplementedError(f"{node.name}: grouped Conv2D")
            kernel = weights["kernel"]
            self.weight = _tensor(kernel.transpose(3, 2, 0, 1))  # [KH, KW, Cin, Cout] -> [Cout, Cin, KH, KW]
            self.groups = 1
        else:
            kernel = weights["depthwise_kernel"]  # [KH, KW, C, M]: output channel c*M + m, as in a grouped conv
            kh, kw, channels, multiplier = kernel.shape
            self.weight = _tensor(kernel.reshape(kh, kw, channels * multiplier).transpose(2, 0, 1)[:, None])
            self.groups = channels
        self.bias = _tensor(weights["bias"]) if "bias" in weights else None
        self.strides = pair(config.get("strides", 1))
        self.dilation = pair(config.get("dilation_rate", 1))
        (top, bottom), (left, right) = conv_padding(node, in_hw, kernel.shape[:2], self.strides, self.dilation)
        if top == bottom and left == right:  # symmetric: the conv pads, as a PyTorch model would
            self.pad_first, self.conv_padding = None, (top, left)
        else:  # TensorFlow's "same" with an odd total: the extra row/column goes bottom/right
            self.pad_first, self.conv_padding = ((top, bottom), (left, right)), (0, 0)
        self.activation, self.keras_version = config.get("activation"), keras_version

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad_first:
            x = _pad(x, self.pad_first)
        y = F.conv2d(x, self.weight, self.bias, self.strides, self.conv_padding, self.dilation, self.groups)
        return activate(y, self.activation, self.keras_version)


class BatchNorm(nn.Module):
    def __init__(self, node: Node):
        super().__init__()
        axis = node.config.get("axis", -1)
        if (axis[0] if isinstance(axis, (list, tuple)) else axis) not in (-1, 3):
            raise NotImplementedError(f"{node.name}: BatchNormalization over axis {axis}")
        w = node.weights
        channels = w["moving_mean"].shape[0]
        self.register_buffer("mean", torch.from_numpy(w["moving_mean"].astype(np.float32)))
        self.register_buffer("variance", torch.from_numpy(w["moving_variance"].astype(np.float32)))
        self.weight = _tensor(w.get("gamma", np.ones(channels, np.float32)))
        self.bias = _tensor(w.get("beta", np.zeros(channels, np.float32)))
        self.epsilon = float(node.config.get("epsilon", 1e-3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.mean, self.variance, self.weight, self.bias, False, 0.0, self.epsilon)


class ReLU(nn.Module):
    """Keras ReLU(max_value, negative_slope, threshold); MobileNets use plain ReLU and ReLU(6)."""

    def __init__(self, node: Node):
        super().__init__()
        c = node.config
        if float(c.get("negative_slope", c.get("alpha", 0.0)) or 0) != 0 or float(c.get("threshold") or 0) != 0:
            raise NotImplementedError(f"{node.name}: ReLU with a negative slope or threshold")
        self.max_value = None if c.get("max_value") is None else float(c["max_value"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.max_value is None:
            return F.relu(x)
        return F.relu6(x) if self.max_value == 6.0 else torch.clamp(x, 0.0, self.max_value)


class Dense(nn.Module):
    def __init__(self, node: Node, keras_version: int):
        super().__init__()
        self.weight = _tensor(node.weights["kernel"].T)  # [in, out] -> [out, in]
        self.bias = _tensor(node.weights["bias"]) if "bias" in node.weights else None
        self.activation, self.keras_version = node.config.get("activation"), keras_version

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            raise NotImplementedError("Dense on a tensor of rank other than 2")
        return activate(F.linear(x, self.weight, self.bias), self.activation, self.keras_version)


class Elementwise(nn.Module):
    """Add or Multiply over tensors and scalars (MobileNetV3's hard_sigmoid is x + 3.0 ... * (1/6))."""

    def __init__(self, node: Node):
        super().__init__()
        self.multiply = node.op == "Multiply"

    def forward(self, *inputs) -> torch.Tensor:
        y = inputs[0]
        for other in inputs[1:]:
            y = y * other if self.multiply else y + other
        return y


class Lambda(nn.Module):
    """A layer without weights whose forward is one small function of the input and the config."""

    def __init__(self, function, node: Node, keras_version: int):
        super().__init__()
        self.function, self.config, self.keras_version = function, node.config, keras_version

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.function(x, self.config, self.keras_version)


def _rescale(x, config, keras_version):
    scale, offset = config.get("scale", 1.0), config.get("offset", 0.0)
    if isinstance(scale, (list, tuple)) or isinstance(offset, (list, tuple)):
        raise NotImplementedError("per-channel Rescaling")
    return x * float(scale) + float(offset)


def _global_average_pool(x, config, keras_version):
    return x.mean(dim=(2, 3), keepdim=bool(config.get("keepdims", False)))


def _reshape(x, config, keras_version):
    """Keras's reshape walks the NHWC order, so a 4-D NCHW tensor is put back in that order first."""
    target = [-1 if d is None else int(d) for d in config["target_shape"]]
    return _keras_to_nchw(_nchw_to_keras(x).reshape(x.shape[0], *target))


def _flatten(x, config, keras_version):
    return torch.flatten(_nchw_to_keras(x), 1)


def _softmax(x, config, keras_version):
    axis = config.get("axis", -1)
    return torch.softmax(x, dim=_torch_axis(axis if isinstance(axis, int) else axis[0], x.dim()))


def _activation(x, config, keras_version):
    return activate(x, config.get("activation"), keras_version)


LAMBDAS = {
    "Rescaling": _rescale,
    "ZeroPadding2D": lambda x, config, keras_version: _pad(x, _zero_padding(config)),
    "GlobalAveragePooling2D": _global_average_pool,
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Softmax": _softmax,
    "Activation": _activation,
    "Dropout": lambda x, config, keras_version: x,
}


def layer_module(node: Node, in_shape: tuple, keras_version: int) -> nn.Module:
    """The torch module for one node of npmobile's raw graph (one Keras layer call), given the NHWC
    shape of its first input."""
    if node.config.get("data_format") not in (None, "channels_last"):
        raise NotImplementedError(f"{node.name}: data_format={node.config['data_format']!r}")
    if node.op in ("Conv2D", "DepthwiseConv2D"):
        if None in in_shape[1:3]:
            raise NotImplementedError(f"{node.name}: padding for an input of unknown height or width")
        return Conv(node, in_shape[1:3], keras_version)
    if node.op == "BatchNormalization":
        return BatchNorm(node)
    if node.op == "ReLU":
        return ReLU(node)
    if node.op == "Dense":
        return Dense(node, keras_version)
    if node.op in ("Add", "Multiply"):
        return Elementwise(node)
    if node.op in LAMBDAS:
        return Lambda(LAMBDAS[node.op], node, keras_version)
    raise NotImplementedError(f"layer {node.name!r}: {node.op} has no PyTorch translation in bench/torch_model.py")


# --------------------------------------------------------------------------------------------------
# The whole graph
# --------------------------------------------------------------------------------------------------


def _first_tensor(node: Node) -> str:
    return next(i for i in node.inputs if isinstance(i, str))


class KerasGraphModule(nn.Module):
    """Runs the nodes of a Keras graph in order; tracing flattens the walk into a plain op list."""

    def __init__(self, graph: Graph):
        super().__init__()
        if len(graph.inputs) != 1 or len(graph.outputs) != 1:
            raise NotImplementedError("models with one input and one output only")
        self.input_name, self.output_name = graph.inputs[0], graph.resolve(graph.outputs[0])
        shapes = infer_shapes(graph)  # NHWC, from the file's input shape: "same" padding is fixed here
        body = [n for n in graph.nodes if n.op != "InputLayer"]
        self.steps = [(n.name, n.inputs) for n in body]
        self.layers = nn.ModuleDict({n.name: layer_module(n, shapes[_first_tensor(n)], graph.keras_version)
                                     for n in body})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = {self.input_name: _keras_to_nchw(x)}  # NHWC in, like every engine; NCHW inside
        for name, inputs in self.steps:
            args = [values[i] if isinstance(i, str) else float(i) for i in inputs]
            values[name] = self.layers[name](*args)
        return _nchw_to_keras(values[self.output_name])


def export_torchscript(keras_file: str, path: str) -> None:
    """Save the .keras file's model as TorchScript: traced at batch 1 (the batch size stays free), not
    yet frozen (``torch.jit.freeze`` does that in the engine's process, after ``torch.jit.load``).

    Memory format: channels_last. The NHWC input, permuted to NCHW, already is a channels_last tensor
    (no copy), oneDNN's convolutions keep their input's format, so the whole network runs channels_last;
    the weights are stored channels_last to match. Measured on the 2-core bench machine: a contiguous
    NCHW copy of the input instead made MobileNetV2 b1 1 thread 16.0 -> 20.0 ms and V3-Small 2 threads
    7.1 -> 8.7 ms; the weights' format made no measurable difference (within 2%).

    Traced, as the issue asks, and nothing more: torch.jit.optimize_for_inference was no faster (it adds
    dense <-> mkldnn conversions around every F.pad), and torch.compile (works offline here, ~30 s per
    model) was slower: MobileNetV2 b1 1 thread 15.4 vs 14.6 ms, V3-Small 2 threads 5.9 vs 4.8 ms.
    """
    import npmobile

    graph = npmobile.load_model(keras_file).graph  # the raw graph, not npmobile's optimized plan
    module = KerasGraphModule(graph).eval().to(memory_format=torch.channels_last)
    example = torch.zeros(1, *graph.input_shapes[graph.inputs[0]][1:])
    with torch.inference_mode():
        torch.jit.save(torch.jit.trace(module, example, check_trace=False), path)
