"""SqueezeExcite: the one node the fusion pass makes of MobileNetV3's eight squeeze-excite layers
(pool, 1x1 conv + ReLU, 1x1 conv + hard sigmoid, multiply). Never read from a file."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from npmobile.kernels import reference as ref
from npmobile.ops.record import Binder, LayerType, register

if TYPE_CHECKING:
    from npmobile.nodes import Node


def squeeze_excite_reference(node: Node, inputs, keras_version: int) -> np.ndarray:
    w = node.weights
    return ref.squeeze_excite(inputs[0], w["reduce_kernel"], w["reduce_bias"], w["expand_kernel"], w["expand_bias"])


def squeeze_excite_prepare(node: Node, in_shapes, out_shape, keras_version: int) -> Binder | None:
    from npmobile.kernels import huge_pages
    from npmobile.kernels.squeeze_excite import squeeze_excite

    w = {k: huge_pages.copy(v) for k, v in node.weights.items()}

    def bind(args, out):
        return squeeze_excite.bind(args[0], w["reduce_kernel"], w["reduce_bias"], w["expand_kernel"],
                                   w["expand_bias"], out)

    return bind


def squeeze_excite_macs(node: Node, in_shape: tuple, out_shape: tuple) -> int:
    return 2 * int(node.weights["reduce_kernel"].size)  # two 1x1 convolutions on the pooled 1x1 map: C -> C_r -> C


register(LayerType(name="SqueezeExcite", reference=squeeze_excite_reference, prepare=squeeze_excite_prepare,
                   macs=squeeze_excite_macs, kind=lambda node: "se", from_files=False,
                   first_run_kernels=lambda node: {"squeeze_excite": True}))
