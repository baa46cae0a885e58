"""The model's input (InputLayer): a record so that every node of a graph has one, and "is this the input?" is a
question for the records like any other (npmobile.ops.is_input). Its values are given, never computed: the graph
reads its shape (npmobile.graph), the plan and the reference path start from its values."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from npmobile.ops.record import LayerType, register

if TYPE_CHECKING:
    from npmobile.nodes import Node

INPUT_LAYER = "InputLayer"


def input_reference(node: Node, inputs, keras_version: int) -> np.ndarray:
    raise ValueError(f"{node.name!r} is the model's input: its values are given, never computed")


register(LayerType(name=INPUT_LAYER, reference=input_reference, graph_input=True, from_files=False))
