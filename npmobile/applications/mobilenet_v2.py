"""MobileNet V2 (Sandler et al., 2018), built as keras.applications.MobileNetV2 builds it.

The inverted residual block: expand the channels with a 1x1 conv (ReLU6), filter each channel with a
3x3 depthwise conv (ReLU6), project back down with a 1x1 conv and no activation (the "linear
bottleneck"), and add the block's input when the shapes allow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from npmobile.applications.builder import Builder, Tensor, correct_pad
from npmobile.applications.common import (
    DEFAULT_TIMEOUT,
    check_top_arguments,
    finish_model,
    make_divisible,
    preprocess_tf,
    square_family_input,
)
from npmobile.applications.imagenet_utils import decode_predictions  # noqa: F401  (Keras's API)
from npmobile.weights import registry

if TYPE_CHECKING:
    from npmobile.interpreter import Model

# (output filters, stride, expansion) for blocks 0..16
BLOCKS = [(16, 1, 1), (24, 2, 6), (24, 1, 6), (32, 2, 6), (32, 1, 6), (32, 1, 6), (64, 2, 6),
          (64, 1, 6), (64, 1, 6), (64, 1, 6), (96, 1, 6), (96, 1, 6), (96, 1, 6), (160, 2, 6),
          (160, 1, 6), (160, 1, 6), (320, 1, 6)]
# The official weights' variants, as the registry knows them.
IMAGENET_SIZES = registry.V2_SIZES
IMAGENET_ALPHAS = registry.V2_ALPHAS


def preprocess_input(x):
    """Pixels 0..255 to -1..1 (x / 127.5 - 1), as keras.applications.mobilenet_v2.preprocess_input."""
    return preprocess_tf(x)


def _inverted_res_block(b: Builder, inputs: Tensor, expansion: int, stride: int, alpha: float,
                        filters: int, block_id: int) -> Tensor:
    in_channels = inputs.channels
    pointwise_filters = make_divisible(int(filters * alpha), 8)
    x = inputs
    prefix = f"block_{block_id}_"
    if block_id:
        x = b.conv2d(x, expansion * in_channels, 1, use_bias=False, name=f"{prefix}expand")
        x = b.batch_norm(x, name=f"{prefix}expand_BN")
        x = b.relu(x, 6.0, name=f"{prefix}expand_relu")
    else:
        prefix = "expanded_conv_"
    if stride == 2:
        x = b.zero_padding(x, correct_pad(x, 3), name=f"{prefix}pad")
    x = b.depthwise_conv2d(x, 3, strides=stride, padding="same" if stride == 1 else "valid",
                           name=f"{prefix}depthwise")
    x = b.batch_norm(x, name=f"{prefix}depthwise_BN")
    x = b.relu(x, 6.0, name=f"{prefix}depthwise_relu")
    x = b.conv2d(x, pointwise_filters, 1, use_bias=False, name=f"{prefix}project")
    x = b.batch_norm(x, name=f"{prefix}project_BN")
    if in_channels == pointwise_filters and stride == 1:
        return b.add([inputs, x], name=f"{prefix}add")
    return x


def MobileNetV2(
    input_shape=None,
    alpha: float = 1.0,
    include_top: bool = True,
    weights="imagenet",
    pooling: str | None = None,
    classes: int = 1000,
    classifier_activation="softmax",
    name: str | None = None,
    *,
    timeout: float | None = DEFAULT_TIMEOUT,
    trusted: bool = False,
) -> Model:
    """keras.applications.MobileNetV2, with the same arguments, layer names and numbers.

    ``timeout`` and ``trusted`` apply to reading a ``weights`` file, as in ``npmobile.load_model``.
    """
    check_top_arguments(weights, include_top, classes, classifier_activation)
    input_shape, rows = square_family_input(input_shape, alpha, include_top, weights, IMAGENET_SIZES,
                                            IMAGENET_ALPHAS, "MobileNetV2")

    b = Builder()
    inputs = b.input(input_shape)
    x = b.conv2d(inputs, make_divisible(32 * alpha, 8), 3, strides=2, use_bias=False, name="Conv1")
    x = b.batch_norm(x, name="bn_Conv1")
    x = b.relu(x, 6.0, name="Conv1_relu")
    for block_id, (filters, stride, expansion) in enumerate(BLOCKS):
        x = _inverted_res_block(b, x, expansion, stride, alpha, filters, block_id)

    last_block_filters = make_divisible(1280 * alpha, 8) if alpha > 1.0 else 1280
    x = b.conv2d(x, last_block_filters, 1, use_bias=False, name="Conv_1")
    x = b.batch_norm(x, name="Conv_1_bn")
    x = b.relu(x, 6.0, name="out_relu")

    if include_top:
        x = b.global_average_pool(x)
        x = b.dense(x, classes, activation=classifier_activation, name="predictions")
    else:
        x = b.pooling(x, pooling)

    spec = b.spec(inputs, x, name or f"mobilenetv2_{alpha:0.2f}_{rows}")

    return finish_model(spec, b.in_channels, weights, official=("mobilenet_v2", alpha, rows, include_top, False),
                        timeout=timeout, trusted=trusted)
