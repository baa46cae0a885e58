"""A tiny functional-model builder that writes a ModelSpec, the way Keras writes a config.

The architectures call it like Keras's functional API (``b.conv2d(x, 32, 3, strides=2, name="Conv1")``)
and get back tensors that know their shape, so a builder can ask ``x.channels`` as Keras code asks
``x.shape[-1]``. The result is plain data: the same ModelSpec a reader produces from a Keras file,
so architectures and files go through one graph and one set of passes.
"""

from __future__ import annotations

from dataclasses import dataclass

from npmobile.kernels.reference import conv_output_size, same_padding
from npmobile.spec import CallSpec, LayerSpec, ModelSpec, TensorRef

Shape = tuple  # (None, H, W, C) or (None, C); H and W may be None


@dataclass(frozen=True)
class Tensor:
    ref: TensorRef
    shape: Shape

    @property
    def channels(self) -> int:
        return self.shape[-1]


def _conv_out(size, kernel: int, stride: int, padding, axis: int = 0, dilation: int = 1):
    """Output size along one axis; ``padding`` is "same", "valid" or explicit ((top, bottom), (left, right))."""
    if size is None:
        return None
    if padding == "same":
        pad = same_padding(size, kernel, stride, dilation)
    else:
        pad = (0, 0) if padding == "valid" else tuple(padding[axis])
    return conv_output_size(size, kernel, stride, pad, dilation)


def correct_pad(x: Tensor, kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Keras's correct_pad: the zero padding that makes a stride-2 'valid' conv act like TF 'same'
    on odd sizes and pad symmetrically-ish on even ones (one less at the top/left when even)."""
    h, w = x.shape[1], x.shape[2]
    adjust = (1, 1) if h is None else (1 - h % 2, 1 - w % 2)
    correct = kernel_size // 2
    return ((correct - adjust[0], correct), (correct - adjust[1], correct))


class Builder:
    def __init__(self) -> None:
        self.layers: list[LayerSpec] = []
        self.in_channels: dict[str, int] = {}  # layer name -> channels of its (first) input
        self._counts: dict[str, int] = {}

    def _name(self, base: str) -> str:
        # Keras's automatic names: re_lu, re_lu_1, re_lu_2, ...
        k = self._counts.get(base, 0)
        self._counts[base] = k + 1
        return base if k == 0 else f"{base}_{k}"

    def _add(self, class_name: str, name: str | None, config: dict, args: list, shape: Shape,
             auto: str) -> Tensor:
        name = name or self._name(auto)
        config = {"name": name, **config}
        call_args = [a.ref if isinstance(a, Tensor) else float(a) for a in args]
        self.in_channels[name] = next(a.channels for a in args if isinstance(a, Tensor))
        self.layers.append(LayerSpec(name, class_name, config, [CallSpec(call_args)]))
        return Tensor(TensorRef(name), shape)

    # -- layers -------------------------------------------------------------------------------------
    def input(self, shape: tuple, name: str = "input_layer") -> Tensor:
        batch_shape = (None, *shape)
        self.layers.append(LayerSpec(name, "InputLayer", {"name": name, "batch_shape": batch_shape}, []))
        return Tensor(TensorRef(name), batch_shape)

    def conv2d(self, x: Tensor, filters: int, kernel: int, strides: int = 1, padding="same",
               use_bias: bool = True, name: str | None = None) -> Tensor:
        h = _conv_out(x.shape[1], kernel, strides, padding, 0)
        w = _conv_out(x.shape[2], kernel, strides, padding, 1)
        config = {"filters": filters, "kernel_size": (kernel, kernel), "strides": (strides, strides),
                  "padding": padding, "dilation_rate": (1, 1), "groups": 1, "activation": "linear",
                  "use_bias": use_bias, "data_format": "channels_last"}
        return self._add("Conv2D", name, config, [x], (None, h, w, filters), "conv2d")

    def depthwise_conv2d(self, x: Tensor, kernel: int, strides: int = 1, padding="same",
                         depth_multiplier: int = 1, use_bias: bool = False, name: str | None = None,
                         dilation: int = 1) -> Tensor:
        h = _conv_out(x.shape[1], kernel, strides, padding, 0, dilation)
        w = _conv_out(x.shape[2], kernel, strides, padding, 1, dilation)
        config = {"kernel_size": (kernel, kernel), "strides": (strides, strides), "padding": padding,
                  "depth_multiplier": depth_multiplier, "dilation_rate": (dilation, dilation), "activation": "linear",
                  "use_bias": use_bias, "data_format": "channels_last"}
        return self._add("DepthwiseConv2D", name, config, [x],
                         (None, h, w, x.channels * depth_multiplier), "depthwise_conv2d")

    def batch_norm(self, x: Tensor, name: str, epsilon: float = 1e-3) -> Tensor:
        config = {"axis": -1, "epsilon": epsilon, "momentum": 0.99, "center": True, "scale": True}
        return self._add("BatchNormalization", name, config, [x], x.shape, "batch_normalization")

    def relu(self, x: Tensor, max_value: float | None = None, name: str | None = None) -> Tensor:
        config = {"max_value": max_value, "negative_slope": 0.0, "threshold": 0.0}
        return self._add("ReLU", name, config, [x], x.shape, "re_lu")

    def activation(self, x: Tensor, activation, name: str | None = None) -> Tensor:
        return self._add("Activation", name, {"activation": activation}, [x], x.shape, "activation")

    def zero_padding(self, x: Tensor, padding, name: str | None = None) -> Tensor:
        (t, b), (left, r) = padding
        h = None if x.shape[1] is None else x.shape[1] + t + b
        w = None if x.shape[2] is None else x.shape[2] + left + r
        return self._add("ZeroPadding2D", name, {"padding": padding}, [x], (None, h, w, x.channels),
                         "zero_padding2d")

    def add(self, tensors: list, name: str | None = None) -> Tensor:
        """The Add merge layer, or with a float among ``tensors`` the scalar op Keras writes for x + 3."""
        shape = next(t.shape for t in tensors if isinstance(t, Tensor))
        return self._add("Add", name, {}, tensors, shape, "add")

    def multiply(self, tensors: list, name: str | None = None) -> Tensor:
        shape = max((t.shape for t in tensors if isinstance(t, Tensor)), key=lambda s: [d or 0 for d in s])
        return self._add("Multiply", name, {}, tensors, shape, "multiply")

    def rescaling(self, x: Tensor, scale: float, offset: float, name: str | None = None) -> Tensor:
        return self._add("Rescaling", name, {"scale": scale, "offset": offset}, [x], x.shape, "rescaling")

    def global_average_pool(self, x: Tensor, keepdims: bool = False, name: str | None = None) -> Tensor:
        shape = (None, 1, 1, x.channels) if keepdims else (None, x.channels)
        return self._add("GlobalAveragePooling2D", name, {"keepdims": keepdims, "data_format": "channels_last"},
                         [x], shape, "global_average_pooling2d")

    def global_max_pool(self, x: Tensor, keepdims: bool = False, name: str | None = None) -> Tensor:
        shape = (None, 1, 1, x.channels) if keepdims else (None, x.channels)
        return self._add("GlobalMaxPooling2D", name, {"keepdims": keepdims, "data_format": "channels_last"},
                         [x], shape, "global_max_pooling2d")

    def pooling(self, x: Tensor, mode: str | None, names: dict | None = None) -> Tensor:
        """keras.applications' ``pooling=`` for include_top=False: None, "avg" or "max"."""
        names = names or {}
        if mode == "avg":
            return self.global_average_pool(x, name=names.get("avg"))
        if mode == "max":
            return self.global_max_pool(x, name=names.get("max"))
        return x

    def dropout(self, x: Tensor, rate: float, name: str | None = None) -> Tensor:
        return self._add("Dropout", name, {"rate": rate}, [x], x.shape, "dropout")

    def reshape(self, x: Tensor, target_shape: tuple, name: str | None = None) -> Tensor:
        return self._add("Reshape", name, {"target_shape": target_shape}, [x], (None, *target_shape), "reshape")

    def flatten(self, x: Tensor, name: str | None = None) -> Tensor:
        size = 1
        for d in x.shape[1:]:
            size = None if (size is None or d is None) else size * d
        return self._add("Flatten", name, {"data_format": "channels_last"}, [x], (None, size), "flatten")

    def dense(self, x: Tensor, units: int, activation=None, name: str | None = None) -> Tensor:
        config = {"units": units, "activation": activation or "linear", "use_bias": True}
        return self._add("Dense", name, config, [x], (*x.shape[:-1], units), "dense")

    # -- result -------------------------------------------------------------------------------------
    def spec(self, inputs: Tensor, outputs: Tensor, name: str) -> ModelSpec:
        return ModelSpec(name=name, layers=self.layers, inputs=[inputs.ref], outputs=[outputs.ref],
                         keras_version=3, source=f"npmobile.applications ({name})")
