"""What the three MobileNet families share: width rounding, input-shape rules, and turning a built
ModelSpec plus a ``weights=`` argument into a runnable Model."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from npmobile.errors import ModelFileError, NpmobileError, WeightsError
from npmobile.graph import Graph
from npmobile.isolation import DEFAULT_TIMEOUT
from npmobile.ops import layer_type
from npmobile.spec import ModelSpec, WeightsFile

if TYPE_CHECKING:
    from npmobile.interpreter import Model


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a channel count to a multiple of ``divisor`` (Keras's _make_divisible / _depth):
    to the nearest multiple, but never more than 10% below ``v``."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def input_shape_for(input_shape, default_size: int | None, include_top: bool, weights,
                    require_static_top: bool = True) -> tuple:
    """keras.applications' obtain_input_shape for channels_last.

    ``default_size`` None means the family accepts an unknown size even with its top (V3).
    """
    default_shape = (default_size, default_size, 3) if default_size else (None, None, 3)
    if weights == "imagenet" and include_top and require_static_top:
        if input_shape is not None and tuple(input_shape) != default_shape:
            raise NpmobileError(
                f"with include_top=True and weights='imagenet', input_shape must be {default_shape}; "
                f"got {tuple(input_shape)}"
            )
        return default_shape
    if input_shape is not None:
        input_shape = tuple(None if d is None else int(d) for d in input_shape)
        if len(input_shape) != 3:
            raise NpmobileError(f"input_shape must be (height, width, channels); got {input_shape}")
        if any(d is not None and d < 32 for d in input_shape[:2]):
            raise NpmobileError(f"input size must be at least 32x32; got input_shape={input_shape}")
        if weights == "imagenet" and input_shape[2] != 3:
            raise NpmobileError(f"imagenet weights need 3 input channels; got input_shape={input_shape}")
        return input_shape
    if include_top and require_static_top:
        return default_shape
    return (None, None, 3)


def square_family_input(input_shape, alpha: float, include_top: bool, weights, sizes: tuple[int, ...],
                        alphas: tuple[float, ...], family: str) -> tuple[tuple, int | None]:
    """Input shape and the "rows" in the model's name, as MobileNet V1 and V2 work them out: the
    default size is the input's if it is square and published, else 224; with imagenet weights the
    alpha must be published, and an unpublished size loads the 224 weights (Keras warns)."""
    default_size = 224
    if input_shape is not None and input_shape[0] == input_shape[1] and input_shape[0] in sizes:
        default_size = input_shape[0]
    input_shape = input_shape_for(input_shape, default_size, include_top, weights)
    rows = input_shape[0]
    if weights == "imagenet":
        if alpha not in alphas:
            raise NpmobileError(f"imagenet weights for {family} exist only for alpha in {alphas}; got {alpha}")
        if rows != input_shape[1] or rows not in sizes:
            rows = 224
    return input_shape, rows


def check_top_arguments(weights, include_top: bool, classes: int, classifier_activation) -> None:
    if not (weights in (None, "imagenet") or isinstance(weights, (str, os.PathLike, WeightsFile))):
        raise NpmobileError(f"weights must be None, 'imagenet', a file path or a WeightsFile; got {weights!r}")
    if weights == "imagenet" and include_top and classes != 1000:
        raise NpmobileError(f"weights='imagenet' with include_top=True needs classes=1000; got classes={classes}")
    if weights == "imagenet" and include_top and classifier_activation not in (None, "softmax"):
        raise NpmobileError("with weights='imagenet', classifier_activation must be None or 'softmax'")


def random_weights(spec: ModelSpec, in_channels: dict[str, int], seed: int = 0) -> None:
    """Fill ``spec.weights`` as Keras initializes a new model (glorot-uniform kernels, zero biases,
    identity BatchNorm), seeded, so ``weights=None`` gives a runnable model like Keras's."""
    rng = np.random.default_rng(seed)
    for layer in spec.layers:
        if layer.name not in in_channels:
            continue
        shapes = layer_type(layer.class_name).weights(layer.config, in_channels[layer.name])
        weights = {}
        for var, shape in shapes.items():
            if var in ("bias", "beta", "moving_mean"):
                weights[var] = np.zeros(shape, np.float32)
            elif var in ("gamma", "moving_variance"):
                weights[var] = np.ones(shape, np.float32)
            else:
                receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
                fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
                limit = np.sqrt(6.0 / (fan_in + fan_out))
                weights[var] = rng.uniform(-limit, limit, shape).astype(np.float32)
        if weights:
            spec.weights[layer.name] = weights


def finish_model(spec: ModelSpec, in_channels: dict[str, int], weights, official: tuple,
                 timeout: float | None = DEFAULT_TIMEOUT, trusted: bool = False) -> Model:
    """Attach weights to a built architecture and make it runnable.

    ``weights``: None (random init, as Keras), "imagenet" (the official file, found or downloaded
    by npmobile.weights; ``official`` holds its registry key: family, alpha, rows, include_top,
    minimalistic), a path to any Keras file npmobile reads (bound by layer name, by order where
    names differ), or a WeightsFile already read. A file is read in a child process bounded by
    ``timeout`` seconds (see npmobile.isolation), or in this one if ``trusted``.
    """
    from npmobile.isolation import start_read

    pending = None
    if isinstance(weights, (str, os.PathLike)):
        if weights == "imagenet":
            from npmobile.weights import official_file, resolve

            weights = resolve(official_file(*official))
        # The reader starts before the engine (Numba) is imported, just below, so that the two overlap.
        pending = start_read(weights, "weights", timeout, trusted)
    from npmobile.interpreter import Model

    if weights is None:
        random_weights(spec, in_channels)
        return Model(Graph.from_spec(spec))
    stored = weights if pending is None else pending.result()
    from npmobile.io import bind_weights

    bind_weights(spec, stored)
    spec.source = f"{stored.source} (weights for {spec.name})"
    try:
        return Model(Graph.from_spec(spec))
    except ModelFileError as error:  # shapes that do not fit: another alpha, size or include_top
        raise WeightsError(f"{error}; is the file for another alpha or include_top?") from None


def preprocess_tf(x) -> np.ndarray:
    """Keras's "tf" preprocessing (MobileNet V1 and V2): pixels 0..255 to -1..1, as x / 127.5 - 1.

    Computed in float32 in this order, as Keras does (dividing rounds differently from multiplying
    by 1/127.5, which is what V3's Rescaling layer does)."""
    x = np.asarray(x)
    x = x.astype(np.float32) if x.dtype != np.float32 else x.copy()
    x /= np.float32(127.5)
    x -= np.float32(1.0)
    return x
