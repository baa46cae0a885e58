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


def _compiles_nothing(node: Node) -> dict:
    return {}


def _true_of(answer: bool | Callable[[Node], bool], node: Node) -> bool:
    return answer(node) if callable(answer) else bool(answer)


@dataclass(frozen=True, kw_only=True)
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
    # False: not a class check_supported accepts from a file: the nodes made by npmobile's passes, and the model's
    # input (the graph reads InputLayer itself).
    from_files: bool = True
    # True: the output is the input's values in another shape, in the same order (a C-contiguous reshape):
    # the plan gives it the input's buffer and runs nothing (npmobile.plan).
    view: bool = False
    # True (or true of the node): the output is the input, unchanged, at inference (Dropout, the random
    # augmentations): the passes drop the node and its readers read its input (npmobile.passes).
    identity: bool | Callable[[Node], bool] = False
    graph_input: bool = False  # True: the model's input (InputLayer), whose values are given, never computed
    # Its spatial window: "convolution" (over every input channel), "separable" (depthwise, then 1x1, in one
    # layer), "depthwise" (one channel each), "pool"; "" without one. The size rules refuse huge windows
    # (npmobile.layers), the costs cut a network into blocks at its depthwise layers (npmobile.costs), the
    # profiler counts a pooling's work by its input (npmobile.profiling).
    window: str = ""
    global_pool: str = ""  # "average" or "max": pools each channel over the whole map (the head; a gate's squeeze)
    flattens: bool = False  # True: folds every position and channel of a map into one vector (Flatten)
    multiplies: bool = False  # True: multiplies tensors elementwise (how a squeeze-excite gate scales its map)
    pads: bool = False  # True: only adds a border of zeros around the map (a convolution's padding as a layer)
    activation: bool = False  # True: applies its config's ``activation`` to its output (npmobile.ops.activation)
    # True (or true of the node): maps pixel values the way a model's own preprocessing does (Rescaling,
    # Normalization, arithmetic with a constant): before the first layer with weights, it means the model takes
    # raw 0..255 pixels (npmobile.opening).
    preprocessing: bool | Callable[[Node], bool] = False
    # What its fast path compiles on a model's first run, as keyword arguments of kernels_cached
    # (kernels/first_run.py): a window size in "depthwise_sizes" or "expand_depthwise_sizes", True for
    # "squeeze_excite" or "rescaled_input". The command line's "compiling kernels" notice asks it of every node of
    # the optimized graph.
    first_run_kernels: Callable[[Node], dict] = _compiles_nothing

    def weight_names(self, config: dict) -> list[str]:
        """The weight names in Keras's creation order (shapes need the input's channels; names do not)."""
        return list(self.weights(config, None))

    @property
    def counts_macs(self) -> bool:
        """Whether its multiply-accumulates count (convolutions, dense layers): ``macs`` is its own."""
        return self.macs is not _no_macs

    def is_identity(self, node: Node) -> bool:
        return _true_of(self.identity, node)

    def is_preprocessing(self, node: Node) -> bool:
        return _true_of(self.preprocessing, node)

    def moves_values_only(self, node: Node) -> bool:
        """Whether the node computes nothing, only moves or keeps values: padding, a reshape, the identity."""
        return self.pads or self.view or self.is_identity(node)


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
    return found is not None and found.is_identity(node)


def is_input(class_name: str) -> bool:
    """Whether a layer class (a node's op, a Keras layer's class name) is a model's input (InputLayer)."""
    found = LAYER_TYPES.get(canonical_class(class_name))
    return found is not None and found.graph_input


def file_classes() -> list[str]:
    """The layer classes a file may contain, sorted (InputLayer and nested models aside)."""
    return sorted(name for name, t in LAYER_TYPES.items() if t.from_files)
