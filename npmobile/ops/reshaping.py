"""Layers that move, repeat or rescale values without mixing channels: ZeroPadding2D, Reshape, Flatten,
Rescaling, UpSampling2D, Dropout (the identity at inference)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from npmobile.errors import ModelFileError, UnsupportedLayerError
from npmobile.kernels import reference as ref
from npmobile.ops.common import pair
from npmobile.ops.record import LayerType, register

if TYPE_CHECKING:
    from npmobile.nodes import Node


def _zero_padding(node: Node) -> tuple[tuple[int, int], tuple[int, int]]:
    padding = node.config.get("padding", 1)
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return tuple(pair(p) for p in padding)


def zero_padding_output_shape(node: Node, inputs: list) -> tuple:
    x = next(s for s in inputs if s is not None)
    (t, b), (left, r) = _zero_padding(node)
    return (None, None if x[1] is None else x[1] + t + b, None if x[2] is None else x[2] + left + r, x[3])


def zero_padding_reference(node: Node, inputs, keras_version: int) -> np.ndarray:
    return ref.zero_pad(inputs[0], _zero_padding(node))


def _product(dims) -> int | None:
    size = 1
    for d in dims:
        size = None if size is None or d is None else size * d
    return size


def reshape_output_shape(node: Node, inputs: list) -> tuple:
    x = next(s for s in inputs if s is not None)
    c = node.config
    target = [None if d in (None, -1) else int(d) for d in c["target_shape"]]
    if target.count(None) > 1:
        raise ModelFileError(f"layer {node.name!r}: target_shape {c['target_shape']} has more than one -1")
    known = _product(x[1:])
    if None in target and known is not None:
        rest = 1
        for d in target:
            rest *= d or 1
        target = [known // rest if d is None else d for d in target]
    elif known is not None and int(np.prod(target)) != known:
        raise ModelFileError(f"layer {node.name!r}: cannot reshape {x[1:]} to {tuple(target)}")
    return (None, *target)


def reshape_reference(node: Node, inputs, keras_version: int) -> np.ndarray:
    x = inputs[0]
    target = [int(d) if d is not None else -1 for d in node.config["target_shape"]]
    try:
        return x.reshape((x.shape[0], *target))
    except ValueError:
        raise ModelFileError(f"layer {node.name!r}: cannot reshape {x.shape[1:]} to {tuple(target)}") from None


def flatten_output_shape(node: Node, inputs: list) -> tuple:
    x = next(s for s in inputs if s is not None)
    return (None, _product(x[1:]))


def flatten_reference(node: Node, inputs, keras_version: int) -> np.ndarray:
    x = inputs[0]
    return x.reshape(x.shape[0], -1)


def rescaling_validate(node: Node, keras_version: int) -> None:
    for key in ("scale", "offset"):
        value = np.asarray(node.config.get(key, 0.0))
        if value.dtype.kind not in "fiu" or value.ndim > 1:
            raise ModelFileError(f"layer {node.name!r} (Rescaling): {key}={node.config.get(key)!r} is not a number")


def rescaling_reference(node: Node, inputs, keras_version: int) -> np.ndarray:
    scale, offset = node.config.get("scale", 1.0), node.config.get("offset", 0.0)
    if isinstance(scale, (list, tuple)) or isinstance(offset, (list, tuple)):
        x = inputs[0]
        return (x * np.asarray(scale, x.dtype) + np.asarray(offset, x.dtype)).astype(x.dtype, copy=False)
    return ref.rescale(inputs[0], float(scale), float(offset))


def identity_reference(node: Node, inputs, keras_version: int) -> np.ndarray:
    return inputs[0]


register(
    LayerType(name="ZeroPadding2D", reference=zero_padding_reference, output_shape=zero_padding_output_shape,
              pads=True),
    LayerType(name="Reshape", reference=reshape_reference, output_shape=reshape_output_shape, view=True),
    LayerType(name="Flatten", reference=flatten_reference, output_shape=flatten_output_shape, view=True,
              flattens=True),
    LayerType(name="Rescaling", reference=rescaling_reference, validate=rescaling_validate, preprocessing=True),
    LayerType(name="Dropout", reference=identity_reference, identity=True),
)


# --------------------------------------------------------------------------------------------------
# UpSampling2D: the worked example of README's "Adding a layer type"
# --------------------------------------------------------------------------------------------------

UPSAMPLING_INTERPOLATIONS = ("nearest", "bilinear")


def upsampling_validate(node: Node, keras_version: int) -> None:
    size = node.config.get("size", (2, 2))
    values = list(size) if isinstance(size, (list, tuple)) else [size]
    if len(values) not in (1, 2) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                                            for v in values):
        raise ModelFileError(f"layer {node.name!r} (UpSampling2D): size={size!r} must be positive integers")
    interpolation = node.config.get("interpolation", "nearest")
    if interpolation not in UPSAMPLING_INTERPOLATIONS:
        raise UnsupportedLayerError(f"layer {node.name!r} (UpSampling2D): interpolation {interpolation!r} is not "
                                    f"supported ({', '.join(UPSAMPLING_INTERPOLATIONS)})")


def upsampling_output_shape(node: Node, inputs: list) -> tuple:
    x = next(s for s in inputs if s is not None)
    sh, sw = pair(node.config.get("size", 2))
    return (None, None if x[1] is None else x[1] * sh, None if x[2] is None else x[2] * sw, x[3])


def upsampling_reference(node: Node, inputs, keras_version: int) -> np.ndarray:
    return ref.upsample2d(inputs[0], pair(node.config.get("size", 2)), node.config.get("interpolation", "nearest"))


register(LayerType(name="UpSampling2D", reference=upsampling_reference, output_shape=upsampling_output_shape,
                   validate=upsampling_validate))
