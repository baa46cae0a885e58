"""BatchNormalization (folded into the convolution before it by the passes wherever it can be)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from npmobile.errors import UnsupportedLayerError
from npmobile.kernels import reference as ref
from npmobile.ops.record import LayerType, register

if TYPE_CHECKING:
    from npmobile.nodes import Node


def batch_norm_weights(config: dict, in_channels: int | None) -> dict[str, tuple]:
    shapes = {}
    if config.get("scale", True):
        shapes["gamma"] = (in_channels,)
    if config.get("center", True):
        shapes["beta"] = (in_channels,)
    return {**shapes, "moving_mean": (in_channels,), "moving_variance": (in_channels,)}


def batch_norm_validate(node: Node, keras_version: int) -> None:
    axis = node.config.get("axis", -1)
    axis = axis[0] if isinstance(axis, (list, tuple)) else axis
    if axis not in (-1, 3):
        raise UnsupportedLayerError(f"layer {node.name!r}: BatchNormalization over axis {axis} is not supported")


def batch_norm_reference(node: Node, inputs, keras_version: int) -> np.ndarray:
    w = node.weights
    return ref.batch_norm(inputs[0], w.get("gamma"), w.get("beta"), w["moving_mean"], w["moving_variance"],
                          float(node.config.get("epsilon", 1e-3)))


register(LayerType(name="BatchNormalization", reference=batch_norm_reference, weights=batch_norm_weights,
                   validate=batch_norm_validate))
