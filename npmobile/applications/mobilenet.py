"""MobileNet V1 (Howard et al., 2017), built as keras.applications.MobileNet builds it.

Each block: a 3x3 depthwise conv (spatial filtering, one channel at a time), BatchNorm, ReLU6, then a
1x1 pointwise conv (mixing channels), BatchNorm, ReLU6. Stride-2 blocks pad ((0, 1), (0, 1)) by hand.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from npmobile.applications.builder import Builder, Tensor
from npmobile.applications.common import (
    DEFAULT_TIMEOUT,
    check_top_arguments,
    finish_model,
    preprocess_tf,
    square_family_input,
)
from npmobile.applications.imagenet_utils import decode_predictions  # noqa: F401  (Keras's API)
from npmobile.errors import NpmobileError
from npmobile.weights import registry

if TYPE_CHECKING:
    from npmobile.interpreter import Model

# (pointwise filters, stride) for blocks 1..13
BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
          (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1)]
# The official weights' variants, as the registry knows them.
IMAGENET_SIZES = registry.V1_SIZES
IMAGENET_ALPHAS = tuple(registry.V1_ALPHAS)


def preprocess_input(x):
    """Pixels 0..255 to -1..1 (x / 127.5 - 1), as keras.applications.mobilenet.preprocess_input."""
    return preprocess_tf(x)


def _conv_block(b: Builder, x: Tensor, filters: int, alpha: float, strides: int) -> Tensor:
    x = b.conv2d(x, int(filters * alpha), 3, strides=strides, use_bias=False, name="conv1")
    x = b.batch_norm(x, name="conv1_bn")
    return b.relu(x, 6.0, name="conv1_relu")


def _depthwise_conv_block(b: Builder, x: Tensor, filters: int, alpha: float, depth_multiplier: int,
                          strides: int, block_id: int) -> Tensor:
    if strides != 1:
        x = b.zero_padding(x, ((0, 1), (0, 1)), name=f"conv_pad_{block_id}")
    x = b.depthwise_conv2d(x, 3, strides=strides, padding="same" if strides == 1 else "valid",
                           depth_multiplier=depth_multiplier, name=f"conv_dw_{block_id}")
    x = b.batch_norm(x, name=f"conv_dw_{block_id}_bn")
    x = b.relu(x, 6.0, name=f"conv_dw_{block_id}_relu")
    x = b.conv2d(x, int(filters * alpha), 1, use_bias=False, name=f"conv_pw_{block_id}")
    x = b.batch_norm(x, name=f"conv_pw_{block_id}_bn")
    return b.relu(x, 6.0, name=f"conv_pw_{block_id}_relu")


def MobileNet(
    input_shape=None,
    alpha: float = 1.0,
    depth_multiplier: int = 1,
    dropout: float = 1e-3,
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
    """keras.applications.MobileNet, with the same arguments, layer names and numbers.

    ``timeout`` and ``trusted`` apply to reading a ``weights`` file, as in ``npmobile.load_model``.
    """
    check_top_arguments(weights, include_top, classes, classifier_activation)
    if weights == "imagenet" and depth_multiplier != 1:
        raise NpmobileError("imagenet weights exist only for depth_multiplier=1")
    input_shape, rows = square_family_input(input_shape, alpha, include_top, weights, IMAGENET_SIZES,
                                            IMAGENET_ALPHAS, "MobileNet")

    b = Builder()
    inputs = b.input(input_shape)
    x = _conv_block(b, inputs, 32, alpha, strides=2)
    for block_id, (filters, stride) in enumerate(BLOCKS, start=1):
        x = _depthwise_conv_block(b, x, filters, alpha, depth_multiplier, stride, block_id)

    if include_top:
        x = b.global_average_pool(x, keepdims=True)
        x = b.dropout(x, dropout, name="dropout")
        x = b.conv2d(x, classes, 1, name="conv_preds")
        x = b.reshape(x, (classes,), name="reshape_2")
        x = b.activation(x, classifier_activation, name="predictions")
    else:
        x = b.pooling(x, pooling)

    spec = b.spec(inputs, x, name or f"mobilenet_{alpha:0.2f}_{rows}")

    return finish_model(spec, b.in_channels, weights, official=("mobilenet", alpha, rows, include_top, False),
                        timeout=timeout, trusted=trusted)
