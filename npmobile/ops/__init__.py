"""What each kind of layer means: one record per layer type.

A ``LayerType`` holds everything npmobile knows about one layer class, in one place:

- ``weights(config, in_channels)``: the weights it needs, name -> shape, in the order Keras creates
  them (the order of ``layer.weights`` and of ``vars/0, vars/1`` in a .weights.h5 file);
- ``validate(node, keras_version)``: config checks beyond the common ones (npmobile.layers.validate_config);
- ``output_shape(node, input_shapes)``: its output's shape (NHWC; None where unknown);
- ``reference(node, inputs, keras_version)``: what it computes, with the plain NumPy kernels of
  kernels/reference.py -- the definition the fast path is checked against;
- ``prepare(node, in_shapes, out_shape, keras_version)``: the fast path for the plan, a Binder
  ``(args, out) -> call``: given the step's input arrays and its preallocated output buffer, it checks
  them once and returns the call with no arguments that computes the step (kernels/entry.py), which
  the plan then makes at every prediction; or None where the reference must run;
- ``macs(node, in_shape, out_shape)``: multiply-accumulates per image, for ``summary --costs``;
- ``kind(node)``: its bucket in ``profile`` (pointwise, depthwise, conv, expand+dw, dense, se, other).

A layer class without a record is refused when a file is loaded (npmobile.graph.check_supported),
never given a default. Records are framework-neutral: a PyTorch model built on the same operations
states its padding and activations explicitly in the node's config.

Records import the fast kernels (Numba) only inside ``prepare``: the readers and the architectures
use the records, and they run without Numba (a file is read in a child process that never loads it).

Adding a layer type: write its record in the module of its kind (or a new one imported below), its
reference function in kernels/reference.py, a kernel if it is on a hot path, and its tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from npmobile.errors import UnsupportedLayerError

if TYPE_CHECKING:
    from npmobile.graph import Node

Shape = tuple
# A prepared step of the plan: (args, out) -> the call (no arguments) that writes every element of out.
Binder = Callable[[list, np.ndarray], Callable[[], None]]


def _no_weights(config: dict, in_channels: int | None) -> dict[str, tuple]:
    return {}


def _no_macs(node: Node, in_shape: Shape, out_shape: Shape) -> int:
    return 0


def _same_shape(node: Node, inputs: list[Shape]) -> Shape:
    return next(s for s in inputs if s is not None)


@dataclass(frozen=True)
class LayerType:
    name: str
    reference: Callable[[Node, list, int], np.ndarray]
    output_shape: Callable[[Node, list[Shape]], Shape] = _same_shape
    weights: Callable[[dict, int | None], dict[str, tuple]] = _no_weights
    validate: Callable[[Node, int], None] | None = None  # (node, keras_version)
    prepare: Callable[[Node, list, Shape, int], Binder | None] | None = None
    macs: Callable[[Node, Shape, Shape], int] = _no_macs
    kind: Callable[[Node], str] = lambda node: "other"
    aliases: tuple[str, ...] = ()  # other Keras class names for the same layer
    from_files: bool = True  # False: made only by npmobile's passes (never accepted from a file)
    # True: the output is the input's values in another shape, in the same order (a C-contiguous reshape):
    # the plan gives it the input's buffer and runs nothing (npmobile.plan).
    view: bool = False
    # True (or true of the node): the output is the input, unchanged, at inference (Dropout, the random
    # augmentations): the passes drop the node and its readers read its input (npmobile.passes).
    identity: bool | Callable[[Node], bool] = False

    def weight_names(self, config: dict) -> list[str]:
        """The weight names in Keras's creation order (shapes need the input's channels; names do not)."""
        return list(self.weights(config, None))


LAYER_TYPES: dict[str, LayerType] = {}
_ALIASES: dict[str, str] = {}


def register(*layer_types: LayerType) -> None:
    for layer_type in layer_types:
        LAYER_TYPES[layer_type.name] = layer_type
        for alias in layer_type.aliases:
            _ALIASES[alias] = layer_type.name


def canonical_class(class_name: str) -> str:
    """The record's name for a Keras class name (``Convolution2D`` -> ``Conv2D``); unknown names unchanged."""
    return _ALIASES.get(class_name, class_name)


def layer_type(op: str) -> LayerType:
    """The record of a layer class (aliases accepted); UnsupportedLayerError when there is none."""
    found = LAYER_TYPES.get(canonical_class(op))
    if found is None:
        raise UnsupportedLayerError(f"layer class {op!r} is not supported (supported: {', '.join(file_classes())})")
    return found


def is_identity(node: Node) -> bool:
    """Whether ``node`` passes its input through unchanged at inference."""
    found = LAYER_TYPES.get(canonical_class(node.op))
    if found is None:
        return False
    return found.identity(node) if callable(found.identity) else bool(found.identity)


def file_classes() -> list[str]:
    """The layer classes a file may contain, sorted (InputLayer and nested models aside)."""
    return sorted(name for name, t in LAYER_TYPES.items() if t.from_files)


# The records, by kind. Imported last: each module registers its records on import.
from npmobile.ops import (  # noqa: E402, F401
    activation,
    arithmetic,
    convolution,
    core,
    expand_depthwise,
    merge,
    normalization,
    pooling,
    preprocessing,
    reshaping,
    squeeze_excite,
)
