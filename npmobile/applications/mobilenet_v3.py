"""MobileNet V3 Small and Large (Howard et al., 2019), built as keras.applications builds them.

V2's inverted residual block plus: 5x5 depthwise kernels in places, squeeze-and-excite (reweight
channels by a gate computed from the whole image), and hard-swish, a piecewise-linear swish.
The input scaling is inside the model (a Rescaling layer), so preprocess_input is the identity.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from npmobile.applications.builder import Builder, Tensor, correct_pad
from npmobile.applications.common import DEFAULT_TIMEOUT, check_top_arguments, finish_model, make_divisible
from npmobile.applications.imagenet_utils import decode_predictions  # noqa: F401  (Keras's API)
from npmobile.errors import NpmobileError

if TYPE_CHECKING:
    from npmobile.interpreter import Model

# (expansion, filters, kernel, stride, squeeze-excite, activation) for each block; kernel "k" and
# activation "act" are 5 and hard-swish, or 3 and relu in the minimalistic variant.
SMALL_BLOCKS = [
    (1, 16, 3, 2, True, "relu"),
    (72 / 16, 24, 3, 2, False, "relu"),
    (88 / 24, 24, 3, 1, False, "relu"),
    (4, 40, "k", 2, True, "act"),
    (6, 40, "k", 1, True, "act"),
    (6, 40, "k", 1, True, "act"),
    (3, 48, "k", 1, True, "act"),
    (3, 48, "k", 1, True, "act"),
    (6, 96, "k", 2, True, "act"),
    (6, 96, "k", 1, True, "act"),
    (6, 96, "k", 1, True, "act"),
]
LARGE_BLOCKS = [
    (1, 16, 3, 1, False, "relu"),
    (4, 24, 3, 2, False, "relu"),
    (3, 24, 3, 1, False, "relu"),
    (3, 40, "k", 2, True, "relu"),
    (3, 40, "k", 1, True, "relu"),
    (3, 40, "k", 1, True, "relu"),
    (6, 80, 3, 2, False, "act"),
    (2.5, 80, 3, 1, False, "act"),
    (2.3, 80, 3, 1, False, "act"),
    (2.3, 80, 3, 1, False, "act"),
    (6, 112, 3, 1, True, "act"),
    (6, 112, 3, 1, True, "act"),
    (6, 160, "k", 2, True, "act"),
    (6, 160, "k", 1, True, "act"),
    (6, 160, "k", 1, True, "act"),
]
SE_RATIO = 0.25


def preprocess_input(x):
    """The identity: MobileNetV3 scales its input itself, with a Rescaling layer inside the model."""
    return x


def _relu(b: Builder, x: Tensor) -> Tensor:
    return b.relu(x)


def _hard_sigmoid(b: Builder, x: Tensor) -> Tensor:
    # Keras builds it from ops: ReLU(6)(x + 3) * (1 / 6)
    return b.multiply([b.relu(b.add([x, 3.0]), 6.0), 1.0 / 6.0])


def _hard_swish(b: Builder, x: Tensor) -> Tensor:
    return b.activation(x, "hard_swish")


def _se_block(b: Builder, inputs: Tensor, filters: int, prefix: str) -> Tensor:
    x = b.global_average_pool(inputs, keepdims=True, name=f"{prefix}squeeze_excite_avg_pool")
    x = b.conv2d(x, make_divisible(filters * SE_RATIO), 1, name=f"{prefix}squeeze_excite_conv")
    x = b.relu(x, name=f"{prefix}squeeze_excite_relu")
    x = b.conv2d(x, filters, 1, name=f"{prefix}squeeze_excite_conv_1")
    x = _hard_sigmoid(b, x)
    return b.multiply([inputs, x], name=f"{prefix}squeeze_excite_mul")


def _inverted_res_block(b: Builder, x: Tensor, expansion: float, filters: int, kernel: int, stride: int,
                        se: bool, activation: Callable, block_id: int) -> Tensor:
    shortcut = x
    infilters = x.channels
    prefix = "expanded_conv_"
    if block_id:
        prefix = f"expanded_conv_{block_id}_"
        x = b.conv2d(x, make_divisible(infilters * expansion), 1, use_bias=False, name=f"{prefix}expand")
        x = b.batch_norm(x, name=f"{prefix}expand_bn")
        x = activation(b, x)
    if stride == 2:
        x = b.zero_padding(x, correct_pad(x, kernel), name=f"{prefix}depthwise_pad")
    x = b.depthwise_conv2d(x, kernel, strides=stride, padding="same" if stride == 1 else "valid",
                           name=f"{prefix}depthwise")
    x = b.batch_norm(x, name=f"{prefix}depthwise_bn")
    x = activation(b, x)
    if se:
        x = _se_block(b, x, make_divisible(infilters * expansion), prefix)
    x = b.conv2d(x, filters, 1, use_bias=False, name=f"{prefix}project")
    x = b.batch_norm(x, name=f"{prefix}project_bn")
    if stride == 1 and infilters == filters:
        x = b.add([shortcut, x], name=f"{prefix}add")
    return x


def _keras_builder(blocks, last_point_channels: int, model_type: str) -> Callable[..., Model]:
    """keras.applications.MobileNetV3Small or MobileNetV3Large (``model_type`` "small" or "large"): one builder,
    with Keras's arguments, run on that model's table of ``blocks``."""
    title = f"MobileNetV3{model_type.title()}"

    def build(input_shape=None, alpha: float = 1.0, minimalistic: bool = False, include_top: bool = True,
              weights="imagenet", classes: int = 1000, pooling: str | None = None,
              dropout_rate: float = 0.2, classifier_activation="softmax",
              include_preprocessing: bool = True, name: str = title, *,
              timeout: float | None = DEFAULT_TIMEOUT, trusted: bool = False) -> Model:
        check_top_arguments(weights, include_top, classes, classifier_activation)
        input_shape = (None, None, 3) if input_shape is None else tuple(input_shape)
        rows, cols = input_shape[0], input_shape[1]
        if (rows and rows < 32) or (cols and cols < 32):
            raise NpmobileError(f"input size must be at least 32x32; got input_shape={input_shape}")
        if weights == "imagenet" and ((not minimalistic and alpha not in (0.75, 1.0))
                                      or (minimalistic and alpha != 1.0)):
            raise NpmobileError("imagenet weights exist for alpha 0.75 and 1.0 (minimalistic: 1.0 only); "
                                f"got alpha={alpha}, minimalistic={minimalistic}")

        # Keras passes se_ratio=None (minimalistic) or 0.25 (SE_RATIO, used by _se_block).
        if minimalistic:
            kernel, activation, use_se = 3, _relu, False
        else:
            kernel, activation, use_se = 5, _hard_swish, True

        b = Builder()
        inputs = b.input(input_shape)
        x = inputs
        if include_preprocessing:
            x = b.rescaling(x, scale=1.0 / 127.5, offset=-1.0)
        x = b.conv2d(x, 16, 3, strides=2, use_bias=False, name="conv")
        x = b.batch_norm(x, name="conv_bn")
        x = activation(b, x)

        for block_id, (expansion, filters, k, stride, se, act) in enumerate(blocks):
            x = _inverted_res_block(
                b, x, expansion, make_divisible(filters * alpha), kernel if k == "k" else k, stride,
                se and use_se, _relu if act == "relu" else activation, block_id,
            )

        last_conv_ch = make_divisible(x.channels * 6)
        last_point_ch = make_divisible(last_point_channels * alpha) if alpha > 1.0 else last_point_channels
        x = b.conv2d(x, last_conv_ch, 1, use_bias=False, name="conv_1")
        x = b.batch_norm(x, name="conv_1_bn")
        x = activation(b, x)
        if include_top:
            x = b.global_average_pool(x, keepdims=True)
            x = b.conv2d(x, last_point_ch, 1, use_bias=True, name="conv_2")
            x = activation(b, x)
            if dropout_rate > 0:
                x = b.dropout(x, dropout_rate)
            x = b.conv2d(x, classes, 1, name="logits")
            x = b.flatten(x)
            x = b.activation(x, classifier_activation, name="predictions")
        else:
            x = b.pooling(x, pooling, names={"avg": "avg_pool", "max": "max_pool"})

        spec = b.spec(inputs, x, name)

        return finish_model(spec, b.in_channels, weights,
                            official=(f"mobilenet_v3_{model_type}", alpha, 224, include_top, minimalistic),
                            timeout=timeout, trusted=trusted)

    build.__name__ = build.__qualname__ = title
    build.__doc__ = f"""keras.applications.{title}, with the same arguments, layer names and numbers.

    ``timeout`` and ``trusted`` apply to reading a ``weights`` file, as in ``npmobile.load_model``.
    """
    return build


MobileNetV3Small = _keras_builder(SMALL_BLOCKS, 1024, "small")
MobileNetV3Large = _keras_builder(LARGE_BLOCKS, 1280, "large")
