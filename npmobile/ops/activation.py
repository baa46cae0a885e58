"""The ReLU, Activation and Softmax layers. What each activation name means, and where it comes from
(``hard_sigmoid`` depends on who wrote the file), is the one table in npmobile/activations.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from npmobile.activations import FUSABLE_ACTIVATIONS, activation_function, lookup
from npmobile.errors import UnsupportedLayerError
from npmobile.kernels import reference as ref
from npmobile.ops.record import Binder, LayerType, register

if TYPE_CHECKING:
    from npmobile.nodes import Node


def apply_activation(x: np.ndarray, node: Node, keras_version: int) -> np.ndarray:
    """The reference path of a layer's ``activation`` config."""
    fn = activation_function(node.config.get("activation"), keras_version)
    return x if fn is None else fn(x)


def epilogue_code(node: Node, keras_version: int) -> int | None:
    """The kernels' code for a layer's ``activation`` config, or None where no epilogue applies it."""
    name = node.config.get("activation")
    if isinstance(name, dict):
        return None
    found = lookup(name)
    if keras_version < 3 and found is not None and found.keras2 is not None:
        return None  # e.g. Keras 2's 0.2x + 0.5: no epilogue for it, use the reference path
    from npmobile.kernels.activations import ACTIVATION_CODES

    return ACTIVATION_CODES.get(name)


def epilogue_activation(node: Node) -> str | None:
    """The epilogue activation a ReLU or Activation node amounts to, if a kernel can apply it."""
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


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------


def relu_reference(node: Node, inputs, keras_version: int) -> np.ndarray:
    c = node.config
    max_value = c.get("max_value")
    return ref.relu(
        inputs[0],
        None if max_value is None else float(max_value),
        float(c.get("negative_slope", c.get("alpha", 0.0)) or 0.0),
        float(c.get("threshold", 0.0) or 0.0),
    )


def activation_reference(node: Node, inputs, keras_version: int) -> np.ndarray:
    return apply_activation(inputs[0], node, keras_version)


def softmax_reference(node: Node, inputs, keras_version: int) -> np.ndarray:
    axis = node.config.get("axis", -1)
    return ref.softmax(inputs[0], axis=axis if isinstance(axis, int) else axis[0])


def prepare_activation(node: Node, in_shapes, out_shape, keras_version: int) -> Binder | None:
    """A standalone ReLU / Activation (one the fusion pass could not move into a conv)."""
    from npmobile.kernels import activations as act_kernels

    if node.op == "Activation" and node.config.get("activation") == "softmax":  # over the last axis

        def bind_softmax(args, out):
            channels = out.shape[-1]
            return act_kernels.softmax.bind(args[0].reshape(-1, channels), out.reshape(-1, channels))

        return bind_softmax
    name = epilogue_activation(node)
    act = act_kernels.ACTIVATION_CODES.get(name) if name else None
    if act is None:
        return None

    def bind(args, out):
        return act_kernels.activate.bind(args[0], out, act)

    return bind


def validate_activation(node: Node, keras_version: int) -> None:
    """An ``activation`` config names one npmobile knows (raises for unknown names and custom functions)."""
    try:
        activation_function(node.config.get("activation"), keras_version)
    except UnsupportedLayerError as error:
        raise UnsupportedLayerError(f"layer {node.name!r} ({node.op}): {error}") from None


register(
    LayerType(name="ReLU", reference=relu_reference, prepare=prepare_activation),
    LayerType(name="Activation", reference=activation_reference, prepare=prepare_activation,
              validate=validate_activation, activation=True),
    LayerType(name="Softmax", reference=softmax_reference),
)
