"""Weight variables: the names npmobile uses for each layer class, and the order Keras keeps them in.

Files name variables differently: tf_keras writes ``conv_dw_1/depthwise_kernel:0``, Keras 3's
legacy .h5 ``conv_dw_1/kernel``, and Keras 3's .weights.h5 only numbers them (``vars/0``). Readers
turn all of these into one canonical name per variable, the one the layer's record (npmobile.ops) names.
"""

from __future__ import annotations

import re

from npmobile.ops import LAYER_TYPES, canonical_class

# Keras 3 calls a DepthwiseConv2D's kernel "kernel"; npmobile (like Keras 2) says depthwise_kernel.
_RENAMES = {("DepthwiseConv2D", "kernel"): "depthwise_kernel"}


def variable_order(class_name: str, config: dict) -> list[str]:
    """Canonical names of a layer's variables in the order Keras creates them (the order of
    ``layer.weights`` and of ``vars/0, vars/1, ...`` in a .weights.h5 file), from the layer's record."""
    found = LAYER_TYPES.get(canonical_class(class_name))
    return [] if found is None else found.weight_names(config)


def canonical_name(class_name: str, stored_name: str) -> str:
    """``conv1/kernel:0`` or ``kernel`` -> ``kernel``; a Keras 3 depthwise ``kernel`` -> ``depthwise_kernel``."""
    var = re.sub(r":\d+$", "", stored_name.rsplit("/", 1)[-1])
    return _RENAMES.get((class_name, var), var)


def split_weight_name(stored_name: str) -> tuple[str, str]:
    """``expanded_conv/squeeze_excite/Conv/kernel:0`` -> (``expanded_conv/squeeze_excite/Conv``, ``kernel``).

    The layer is everything before the last slash (official V3 layer names contain slashes).
    """
    layer, _, var = stored_name.rpartition("/")
    return layer, re.sub(r":\d+$", "", var)
