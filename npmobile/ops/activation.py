"""Activations: the table of names, and the ReLU, Activation and Softmax layers.

One table says what each activation name means and where it comes from: ``hard_sigmoid`` depends on
who wrote the file (Keras 2 meant clip(0.2x + 0.5, 0, 1), Keras 3 means relu6(x + 3) / 6).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from npmobile.errors import UnsupportedLayerError
from npmobile.kernels import reference as ref
from npmobile.ops import LayerType, Runner, register

if TYPE_CHECKING:
    from npmobile.graph import Node

# Activation names as Keras writes them -> the reference function (Keras 3's meaning).
ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "relu": ref.relu,
    "relu6": ref.relu6,
    "sigmoid": ref.sigmoid,
    "hard_sigmoid": ref.hard_sigmoid,
    "hard_swish": ref.hard_swish,
    "hard_swish_from_ops": ref.hard_swish_from_ops,  # npmobile's own: what fuse_hard_swish_ops makes
    "hard_silu": ref.hard_swish,
    "swish": ref.swish,
    "silu": ref.swish,
    "softmax": ref.softmax,
    "tanh": np.tanh,
}
# Names whose meaning changed between Keras versions: (name, written by Keras major < 3) -> function.
KERAS2_ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"hard_sigmoid": ref.hard_sigmoid_keras2}

# Activations the kernels can apply in a convolution's epilogue.
FUSABLE_ACTIVATIONS = ("relu", "relu6", "hard_swish", "hard_silu", "sigmoid", "swish", "silu")


def activation_function(name, keras_version: int = 3) -> Callable[[np.ndarray], np.ndarray] | None:
    """The reference kernel for a Keras activation name (None for linear)."""
    if isinstance(name, dict):  # {"class_name": "relu", "config": {...}} or a serialized function
        config = name.get("config")
        if name.get("class_name") == "function" or isinstance(config, str):
            # Keras 3 writes a user's own function as {"class_name": "function", "config": "pkg>name"}.
            raise UnsupportedLayerError(f"activation {str(config)!r} is a custom function; npmobile never runs "
                                        "code from a file")
        name = (config.get("name") if isinstance(config, dict) else None) or name.get("class_name") or str(name)
    if name in (None, "linear"):
        return None
    if not isinstance(name, str):
        raise UnsupportedLayerError(f"activation {str(name)[:40]!r} is not an activation name")
    if keras_version < 3 and name in KERAS2_ACTIVATIONS:
        return KERAS2_ACTIVATIONS[name]
    if name not in ACTIVATIONS:
        raise UnsupportedLayerError(f"activation {name!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def apply_activation(x: np.ndarray, node: Node, keras_version: int) -> np.ndarray:
    """The reference path of a layer's ``activation`` config."""
    fn = activation_function(node.config.get("activation"), keras_version)
    return x if fn is None else fn(x)


def epilogue_code(node: Node, keras_version: int) -> int | None:
    """The kernels' code for a layer's ``activation`` config, or None where no epilogue applies it."""
    name = node.config.get("activation")
    if isinstance(name, dict):
        return None
    if keras_version < 3 and name in KERAS2_ACTIVATIONS:
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


def prepare_activation(node: Node, in_shapes, out_shape, keras_version: int) -> Runner | None:
    """A standalone ReLU / Activation (one the fusion pass could not move into a conv)."""
    from npmobile.kernels import activations as act_kernels

    if node.op == "Activation" and node.config.get("activation") == "softmax":  # over the last axis

        def run_softmax(args, out):
            channels = out.shape[-1]
            act_kernels.softmax(args[0].reshape(-1, channels), out.reshape(-1, channels))

        return run_softmax
    name = epilogue_activation(node)
    act = act_kernels.ACTIVATION_CODES.get(name) if name else None
    if act is None:
        return None

    def run(args, out):
        act_kernels.activate(args[0], out, act)

    return run


def validate_activation(node: Node, keras_version: int) -> None:
    """An ``activation`` config names one npmobile knows (raises for unknown names and custom functions)."""
    try:
        activation_function(node.config.get("activation"), keras_version)
    except UnsupportedLayerError as error:
        raise UnsupportedLayerError(f"layer {node.name!r} ({node.op}): {error}") from None


register(
    LayerType("ReLU", relu_reference, prepare=prepare_activation),
    LayerType("Activation", activation_reference, prepare=prepare_activation, validate=validate_activation),
    LayerType("Softmax", softmax_reference),
)
