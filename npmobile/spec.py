"""ModelSpec: what a reader hands to the graph builder.

A ModelSpec is a Keras functional model as plain data: the layers with their Keras class names and
configs, how they are wired, and the weights as NumPy arrays keyed by layer name. It is the boundary
between readers (which know files) and the graph (which knows nothing of files).

Canonical forms, whatever the file's Keras version:
- ``LayerSpec.inbound`` holds one ``CallSpec`` per time the layer was called (Keras "inbound node").
  Each argument is a ``TensorRef`` or a constant: a Python float (a scalar operand, as in ``x + 3.0``) or a
  tuple of floats (a per-channel vector, as preprocess_input's 'torch' mode subtracts).
  A merge layer (``Add``, ``Multiply``, ``Concatenate``) receives its tensors as separate args.
- Elementwise arithmetic with constants, whether Keras 3 op nodes (class_name "Add" with args ``[tensor, 3.0]``,
  "TrueDivide", "Subtract", ...) or tf_keras ``TFOpLambda`` nodes (``math.truediv`` with ``y``), are written as
  class_name "Add" / "Multiply" / "Subtract" / "TrueDivide" / "Negative" / "Cast" with the args in Keras's order.
- A nested model (a Functional or Sequential used as a layer) has class_name "Functional" and its own
  ModelSpec in ``submodel``; its weights live in ``submodel.weights``.
- A weights-only file (no architecture) is a ``WeightsFile``: per ``StoredLayer``, its variables in file
  order, until ``npmobile.io.bind_weights`` puts them on an architecture built in code.
- Weight variable names are canonical per class (see ``npmobile.io.variables``): Conv2D / Dense
  ``kernel``, ``bias``; DepthwiseConv2D ``depthwise_kernel``, ``bias``; SeparableConv2D
  ``depthwise_kernel``, ``pointwise_kernel``, ``bias``; BatchNormalization ``gamma``, ``beta``,
  ``moving_mean``, ``moving_variance`` (gamma/beta absent when scale/center is False).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class TensorRef:
    """The ``tensor_index``-th output of the ``node_index``-th call of layer ``layer``."""

    layer: str
    node_index: int = 0
    tensor_index: int = 0


Arg = TensorRef | float | tuple


@dataclass
class CallSpec:
    """One call of a layer: its positional args (tensors or scalars) and keyword args."""

    args: list[Arg]
    kwargs: dict[str, Any] = field(default_factory=dict)

    def tensors(self) -> list[TensorRef]:
        return [a for a in self.args if isinstance(a, TensorRef)]


@dataclass
class LayerSpec:
    name: str
    class_name: str
    config: dict[str, Any]
    inbound: list[CallSpec] = field(default_factory=list)
    submodel: ModelSpec | None = None


@dataclass
class ModelSpec:
    name: str
    layers: list[LayerSpec]
    inputs: list[TensorRef]
    outputs: list[TensorRef]
    weights: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    keras_version: int = 3  # 2 for files written by Keras 2 / tf_keras (hard_sigmoid means 0.2x+0.5 there)
    source: str = ""  # the file it came from, for error messages

    def layer(self, name: str) -> LayerSpec:
        for spec in self.layers:
            if spec.name == name:
                return spec
        raise KeyError(name)


@dataclass
class StoredLayer:
    """One layer's variables as a file stores them: (stored name or None, array), in file order."""

    name: str
    variables: list[tuple[str | None, np.ndarray]] = field(default_factory=list)


@dataclass
class WeightsFile:
    """A file's weights by layer, in file order, before they are bound to an architecture
    (``npmobile.io.bind_weights``)."""

    layers: list[StoredLayer]
    source: str
    # Read as "whatever the file holds" (npmobile.isolation): why it is not a whole model.
    model_error: Exception | None = None
