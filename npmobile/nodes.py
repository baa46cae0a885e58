"""A node of the graph: one Keras layer call as data (its layer's name, class, config, inputs and weights).

A leaf module: the graph (npmobile/graph.py), the layer records (npmobile/ops/) and the passes all speak of
nodes, and none of them needs the others to do so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# An input of a node: the name of the node whose output it is, or a constant operand (a number, or a
# per-channel vector as a tuple of floats).
Input = str | float | tuple


@dataclass
class Node:
    name: str
    op: str
    config: dict[str, Any]
    inputs: list[Input]
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    keras_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.keras_names:
            self.keras_names = [self.name]


def last_readers(nodes: list[Node]) -> dict[str, int]:
    """For each value some node of ``nodes`` reads, the index of the last node that reads it: once that
    node has run, the value is needed no more (unless the caller asked for it)."""
    last: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for source in node.inputs:
            if isinstance(source, str):
                last[source] = index
    return last
