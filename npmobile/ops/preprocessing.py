"""Image preprocessing and augmentation layers, as Keras computes them at inference.

- The random augmentations and noise layers are the identity outside training, in Keras 3 and
  tf_keras alike (checked against both in tests/test_preprocessing.py, class by class): they load, and
  the passes drop them (npmobile.passes.drop_identities). Their seed-generator state is no weight.
- ``Normalization`` ((x - mean) / max(sqrt(variance), 1e-7), or its inverse), ``Resizing`` (TensorFlow's
  resize with half-pixel centers, bilinear or nearest, optionally cropped to the aspect ratio first),
  ``CenterCrop`` (a crop, or a cropped resize when the image is smaller) run as Keras runs them.
- ``RandomCrop`` differs between the two: tf_keras's ``predict`` crops to the aspect ratio and resizes
  to the crop size; Keras 3's returns its input unchanged (although the model declares the crop size).
  npmobile does what the Keras that wrote the file does.
- ``preprocess_input``'s 'caffe' mode flips RGB to BGR: tf_keras writes ``x[..., ::-1]`` (a SlicingOpLambda,
  read as ReverseChannels), Keras 3 three GetItem nodes ``x[..., k]`` and a Stack; the mean subtraction
  after it is constant arithmetic (npmobile.ops.arithmetic).
- Layers that change the image at inference and that npmobile does not compute are refused by name,
  with the reason (``REFUSED``, listed in the README).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from npmobile.errors import ModelFileError, UnsupportedLayerError
from npmobile.kernels import reference as ref
from npmobile.ops.record import LayerType, register
from npmobile.ops.reshaping import identity_reference

if TYPE_CHECKING:
    from npmobile.nodes import Node

# The identity at inference in Keras 3 and tf_keras (a layer only one of them has is listed too).
IDENTITY_AT_INFERENCE = (
    # Both Keras 3 and tf_keras
    "RandomFlip", "RandomRotation", "RandomZoom", "RandomContrast", "RandomTranslation", "RandomBrightness",
    "GaussianNoise", "GaussianDropout", "AlphaDropout", "SpatialDropout1D", "SpatialDropout2D",
    "SpatialDropout3D",
    # tf_keras only
    "RandomHeight", "RandomWidth",
    # Keras 3 only
    "AugMix", "CutMix", "MixUp", "RandAugment", "RandomColorDegeneration", "RandomColorJitter",
    "RandomElasticTransform", "RandomErasing", "RandomGaussianBlur", "RandomGrayscale", "RandomHue",
    "RandomInvert", "RandomPerspective", "RandomPosterization", "RandomSaturation", "RandomSharpness",
    "RandomShear", "Solarization", "Equalization", "MaxNumBoundingBoxes",
)

# Layers npmobile knows and refuses: each changes the image at inference in a way npmobile does not compute.
# What to write instead of code in a file, for preprocessing (the usual reason for a Lambda).
INSTEAD_OF_CODE = ("for preprocessing use Rescaling(1/127.5, offset=-1), Normalization, or call "
                   "keras.applications.<family>.preprocess_input on the input tensor, all of which npmobile reads")
REFUSED = {
    "AutoContrast": "Keras 3 stretches each image's own value range at inference as well as in training; "
                    "npmobile does not compute it (apply it to the images before the model)",
    "ContrastLimitedAdaptiveHistogramEqualization": "Keras 3 equalizes each image's histogram tile by tile at "
                                                    "inference; npmobile does not compute it",
    "SlicingOpLambda": "slicing a tensor; npmobile reads only the channel flip x[..., ::-1] (preprocess_input's "
                       "'caffe' mode)",
}


# --------------------------------------------------------------------------------------------------
# Normalization
# --------------------------------------------------------------------------------------------------

KERAS_EPSILON = np.float32(1e-7)  # keras.backend.epsilon(): the floor of the standard deviation


def _adapted(config: dict) -> bool:
    """Mean and variance learnt by ``adapt`` live in the weights; given ones live in the config."""
    return config.get("mean") is None


def normalization_weights(config: dict, in_channels: int | None) -> dict[str, tuple]:
    if not _adapted(config):
        return {}
    # count, a scalar Keras keeps for adapt, is held 1-D like every weight (npmobile.interpreter)
    return {"mean": (in_channels,), "variance": (in_channels,), "count": (1,)}


def normalization_validate(node: Node, keras_version: int) -> None:
    axis = node.config.get("axis", -1)
    axis = list(axis) if isinstance(axis, (list, tuple)) else [axis]
    if axis not in ([-1], [3]):
        raise UnsupportedLayerError(f"layer {node.name!r} (Normalization) normalizes over axis {axis}; npmobile "
                                    "reads per-channel normalization (axis=-1)")
    if not _adapted(node.config):
        for key in ("mean", "variance"):
            values = np.asarray(node.config.get(key), dtype=object).ravel()
            if values.size == 0 or values.size > 4096 or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise ModelFileError(f"layer {node.name!r} (Normalization): {key} is not numbers")


def _mean_and_variance(node: Node, dtype) -> tuple[np.ndarray, np.ndarray]:
    if _adapted(node.config):
        mean, variance = node.weights["mean"], node.weights["variance"]
    else:
        mean, variance = node.config["mean"], node.config["variance"]
    # Keras holds them as float32 (a config's Python floats are converted first).
    mean = np.asarray(mean, dtype=np.float32).reshape(-1).astype(dtype)
    variance = np.asarray(variance, dtype=np.float32).reshape(-1).astype(dtype)
    return mean, variance


def normalization_reference(node: Node, inputs, keras_version: int) -> np.ndarray:
    x = inputs[0]
    mean, variance = _mean_and_variance(node, x.dtype)
    std = np.maximum(np.sqrt(variance), KERAS_EPSILON.astype(x.dtype))
    if node.config.get("invert"):
        return (mean + x * std).astype(x.dtype, copy=False)
    return ((x - mean) / std).astype(x.dtype, copy=False)


def normalization_output_shape(node: Node, inputs: list) -> tuple:
    """The input's shape; a config's mean and variance hold one value, or one per channel."""
    x = next(s for s in inputs if s is not None)
    if not _adapted(node.config):
        for values in _mean_and_variance(node, np.float32):
            if values.size not in (1, x[-1]):
                raise ModelFileError(f"layer {node.name!r} (Normalization): {values.size} values for "
                                     f"{x[-1]} channels")
    return x


# --------------------------------------------------------------------------------------------------
# Resizing, CenterCrop, RandomCrop
# --------------------------------------------------------------------------------------------------

RESIZE_INTERPOLATIONS = ("bilinear", "nearest")


def _target(node: Node) -> tuple[int, int]:
    return int(node.config["height"]), int(node.config["width"])


def _check_target(node: Node) -> None:
    for key in ("height", "width"):
        value = node.config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 2**14:
            raise ModelFileError(f"layer {node.name!r} ({node.op}): {key}={value!r} is not a positive size")


def resizing_validate(node: Node, keras_version: int) -> None:
    _check_target(node)
    c = node.config
    interpolation = c.get("interpolation", "bilinear")
    if interpolation not in RESIZE_INTERPOLATIONS:
        raise UnsupportedLayerError(f"layer {node.name!r} (Resizing): interpolation {interpolation!r} is not "
                                    f"supported ({', '.join(RESIZE_INTERPOLATIONS)})")
    if c.get("antialias"):
        raise UnsupportedLayerError(f"layer {node.name!r} (Resizing): antialias=True is not supported")
    if c.get("pad_to_aspect_ratio"):
        raise UnsupportedLayerError(f"layer {node.name!r} (Resizing): pad_to_aspect_ratio=True is not supported "
                                    "(crop_to_aspect_ratio is)")


def resized_shape(node: Node, inputs: list) -> tuple:
    x = next(s for s in inputs if s is not None)
    return (None, *_target(node), x[-1])


def aspect_crop(h: int, w: int, target_h: int, target_w: int) -> tuple[int, int, int, int]:
    """Keras's crop to the target's aspect ratio before a resize (smart_resize, crop_to_aspect_ratio):
    (top, left, height, width), computed in float32 and truncated as Keras computes them."""
    crop_h = int(np.float32(w * target_h) / np.float32(target_w))
    crop_h = max(min(h, crop_h), 1)
    crop_w = int(np.float32(h * target_w) / np.float32(target_h))
    crop_w = max(min(w, crop_w), 1)
    return int(np.float32(h - crop_h) / np.float32(2)), int(np.float32(w - crop_w) / np.float32(2)), crop_h, crop_w


def smart_resize(x: np.ndarray, target: tuple[int, int], interpolation: str = "bilinear") -> np.ndarray:
    top, left, crop_h, crop_w = aspect_crop(x.shape[1], x.shape[2], *target)
    return ref.resize(x[:, top:top + crop_h, left:left + crop_w], target, interpolation)


def resizing_reference(node: Node, inputs, keras_version: int) -> np.ndarray:
    x, target = inputs[0], _target(node)
    interpolation = node.config.get("interpolation", "bilinear")
    if node.config.get("crop_to_aspect_ratio"):
        return smart_resize(x, target, interpolation)
    return ref.resize(x, target, interpolation)


def center_crop_reference(node: Node, inputs, keras_version: int) -> np.ndarray:
    """Keras (both) crops the centre when the image is at least the target size, and otherwise resizes
    the aspect-ratio crop up (smart_resize)."""
    x, (th, tw) = inputs[0], _target(node)
    h, w = x.shape[1:3]
    if h >= th and w >= tw:
        top, left = (h - th) // 2, (w - tw) // 2
        return x[:, top:top + th, left:left + tw]
    return smart_resize(x, (th, tw))


# The reader (npmobile.io.config) writes which Keras wrote a RandomCrop into its config under this key:
# what predict computes depends on it, and a layer's shape is worked out from its config alone.
WRITER_KEY = "npmobile_keras_version"


def _crops_at_inference(node: Node) -> bool:
    return int(node.config.get(WRITER_KEY, 3)) < 3  # tf_keras resizes; Keras 3 crops only in training


def random_crop_output_shape(node: Node, inputs: list) -> tuple:
    x = next(s for s in inputs if s is not None)
    return (None, *_target(node), x[-1]) if _crops_at_inference(node) else x


def random_crop_reference(node: Node, inputs, keras_version: int) -> np.ndarray:
    if _crops_at_inference(node):
        return smart_resize(inputs[0], _target(node))  # tf_keras: the aspect-ratio crop, resized
    return inputs[0]


def _window_validate(node: Node, keras_version: int) -> None:
    _check_target(node)


# --------------------------------------------------------------------------------------------------
# 'caffe' mode's channel flip: tf_keras's x[..., ::-1]; Keras 3's x[..., 2], x[..., 1], x[..., 0] stacked
# --------------------------------------------------------------------------------------------------


def reverse_channels_reference(node: Node, inputs, keras_version: int) -> np.ndarray:
    return np.ascontiguousarray(inputs[0][..., ::-1])


def get_item_validate(node: Node, keras_version: int) -> None:
    channel = node.config.get("channel")
    if not isinstance(channel, int) or isinstance(channel, bool):
        raise UnsupportedLayerError(f"layer {node.name!r} (GetItem) indexes a tensor other than by channel "
                                    "(x[..., k]); npmobile reads only that, as preprocess_input's 'caffe' mode "
                                    "writes it")


def get_item_output_shape(node: Node, inputs: list) -> tuple:
    x = next(s for s in inputs if s is not None)
    channel = node.config["channel"]
    if x[-1] is not None and not -x[-1] <= channel < x[-1]:
        raise ModelFileError(f"layer {node.name!r} (GetItem): channel {channel} of {x[-1]}")
    return x[:-1]


def get_item_reference(node: Node, inputs, keras_version: int) -> np.ndarray:
    return np.ascontiguousarray(inputs[0][..., node.config["channel"]])


def stack_validate(node: Node, keras_version: int) -> None:
    if node.config.get("axis", 0) != -1:
        raise UnsupportedLayerError(f"layer {node.name!r} (Stack): npmobile stacks along the last axis only "
                                    f"(axis=-1), not axis={node.config.get('axis', 0)!r}")
    if not node.inputs or not all(isinstance(i, str) for i in node.inputs):
        raise ModelFileError(f"layer {node.name!r} (Stack) stacks tensors only")


def stack_output_shape(node: Node, inputs: list) -> tuple:
    shapes = [s for s in inputs if s is not None]
    if len({len(s) for s in shapes}) != 1:
        raise ModelFileError(f"layer {node.name!r} (Stack) stacks tensors of different ranks")
    return (*shapes[0], len(shapes))


def stack_reference(node: Node, inputs, keras_version: int) -> np.ndarray:
    return np.stack(inputs, axis=-1)


register(
    *(LayerType(name=name, reference=identity_reference, identity=True) for name in IDENTITY_AT_INFERENCE),
    LayerType(name="Normalization", reference=normalization_reference, output_shape=normalization_output_shape,
              weights=normalization_weights, validate=normalization_validate, preprocessing=True),
    LayerType(name="Resizing", reference=resizing_reference, output_shape=resized_shape, validate=resizing_validate),
    LayerType(name="CenterCrop", reference=center_crop_reference, output_shape=resized_shape,
              validate=_window_validate),
    LayerType(name="ReverseChannels", reference=reverse_channels_reference),
    LayerType(name="GetItem", reference=get_item_reference, output_shape=get_item_output_shape,
              validate=get_item_validate),
    LayerType(name="Stack", reference=stack_reference, output_shape=stack_output_shape, validate=stack_validate),
    LayerType(name="RandomCrop", reference=random_crop_reference, output_shape=random_crop_output_shape,
              validate=_window_validate, identity=lambda node: not _crops_at_inference(node)),
)
