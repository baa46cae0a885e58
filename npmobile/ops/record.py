"""The layer record (``LayerType``) and the table of records by Keras class name (npmobile/ops/__init__.py
says what each field means). A leaf of npmobile.ops: every record module imports it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from npmobile.errors import UnsupportedLayerError

if TYPE_CHECKING:
    from npmobile.nodes import Node

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
