"""Every image preprocessing and augmentation layer of the installed Keras 3 and tf_keras, against that
Keras's own predict: each loads and answers as Keras does, or is refused by name with the reason listed
in docs/reading-keras-files.md's table of refusals. Whether a layer is the identity at inference is measured
here, on the installed versions, never assumed."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import numpy as np
import pytest
from test_parity import assert_bit_close

import npmobile
from npmobile.errors import UnsupportedLayerError
from npmobile.ops.preprocessing import IDENTITY_AT_INFERENCE, REFUSED

REFUSALS_PAGE = Path(__file__).parent.parent / "docs" / "reading-keras-files.md"
FRAMEWORKS = ("keras", "tf_keras")
SHAPE = (30, 38, 3)
# Preprocessing layers for data that is not an image (text, categories, audio): outside this check.
NOT_IMAGE_LAYERS = {"CategoryEncoding", "Discretization", "HashedCrossing", "Hashing", "IntegerLookup", "StringLookup",
                    "TextVectorization", "MelSpectrogram", "STFTSpectrogram"}
# The noise and dropout layers augment too (they are regularization layers in Keras's tree).
NOISE_LAYERS = ("GaussianNoise", "GaussianDropout", "AlphaDropout", "SpatialDropout1D", "SpatialDropout2D",
                "SpatialDropout3D")
# The list: the identity at inference, and npmobile may never refuse them.
MUST_LOAD = ("RandomFlip", "RandomRotation", "RandomZoom", "RandomContrast", "RandomTranslation", "RandomBrightness",
             "RandomHeight", "RandomWidth", "GaussianNoise", "GaussianDropout", "AlphaDropout", "SpatialDropout1D",
             "SpatialDropout2D", "SpatialDropout3D")

# Arguments that make each layer do something (a range of 0..255 pixels where the layer asks for one).
ARGS = {
    "AutoContrast": {"value_range": (0, 255)},
    "CenterCrop": {"height": 16, "width": 21},
    "ContrastLimitedAdaptiveHistogramEqualization": {"value_range": (0, 255)},
    "Equalization": {"value_range": (0, 255)},
    "MaxNumBoundingBoxes": {"max_number": 3},
    "Normalization": {"mean": [100.0, 110.0, 120.0], "variance": [900.0, 1000.0, 1100.0]},
    "RandomBrightness": {"factor": 0.2},
    "RandomColorDegeneration": {"factor": 0.5},
    "RandomColorJitter": {"value_range": (0, 255), "brightness_factor": 0.2, "contrast_factor": 0.2},
    "RandomContrast": {"factor": 0.2},
    "RandomCrop": {"height": 16, "width": 21},
    "RandomHue": {"factor": 0.2},
    "RandomPosterization": {"factor": (1, 4)},
    "RandomRotation": {"factor": 0.2},
    "RandomSaturation": {"factor": 0.2},
    "RandomSharpness": {"factor": 0.2},
    "RandomShear": {"x_factor": 0.2, "y_factor": 0.1},
    "RandomTranslation": {"height_factor": 0.1, "width_factor": 0.1},
    "RandomZoom": {"height_factor": 0.2},
    "RandomHeight": {"factor": 0.2},
    "RandomWidth": {"factor": 0.2},
    "Resizing": {"height": 17, "width": 45},
    "Rescaling": {"scale": 1 / 127.5, "offset": -1.0},
    "GaussianNoise": {"stddev": 0.1},
    "GaussianDropout": {"rate": 0.2},
    "AlphaDropout": {"rate": 0.2},
    "SpatialDropout1D": {"rate": 0.2},
    "SpatialDropout2D": {"rate": 0.2},
    "SpatialDropout3D": {"rate": 0.2},
}
INPUT_SHAPES = {"SpatialDropout1D": (20, 3), "SpatialDropout3D": (4, 6, 6, 3)}


def image_layer_classes(framework: str) -> list[str]:
    """Every image preprocessing and augmentation layer class the installed ``framework`` exports."""
    keras = importlib.import_module(framework)
    package = f"{framework}.src.layers.preprocessing"
    names = {name for name in dir(keras.layers) if inspect.isclass(getattr(keras.layers, name))
             and getattr(keras.layers, name).__module__.startswith(package)}
    return sorted((names - NOT_IMAGE_LAYERS) | {n for n in NOISE_LAYERS if hasattr(keras.layers, n)})


def _build(framework: str, name: str):
    keras = importlib.import_module(framework)
    layers = keras.layers
    shape = INPUT_SHAPES.get(name, SHAPE)
    inputs = keras.Input(shape)
    if name == "Pipeline":
        x = layers.Pipeline([layers.RandomFlip(), layers.RandomZoom(0.2)])(inputs)
    else:
        x = getattr(layers, name)(**ARGS.get(name, {}))(inputs)
    # Rescaling(1, 0) is the identity on every value: the model's output is the layer's, and a layer that
    # returns its input tensor at build (Equalization does) still makes a model.
    return keras.Model(inputs, layers.Rescaling(1.0, offset=0.0)(x)), shape


def _pixels(shape, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (2, *shape)).astype(np.float32)


def _cases():
    return [(framework, name) for framework in FRAMEWORKS for name in image_layer_classes(framework)]


def test_every_image_layer_is_covered():
    """Each class is computed (checked below) or refused with a reason; the issue's identities load."""
    for framework, name in _cases():
        assert name in ARGS or name in REFUSED or name in IDENTITY_AT_INFERENCE or name == "Pipeline" \
            or name in ("CenterCrop",), f"{framework} {name}: neither computed nor refused"
    assert not set(MUST_LOAD) & set(REFUSED)


@pytest.mark.parametrize("framework,name", _cases())
def test_image_layer_matches_keras_or_is_refused(tmp_path, framework, name):
    model, shape = _build(framework, name)
    x = _pixels(shape)
    expected = np.asarray(model.predict(x, verbose=0))
    if name in IDENTITY_AT_INFERENCE:  # the claim, measured on the installed Keras
        np.testing.assert_array_equal(expected, x, err_msg=f"{framework} {name} is not the identity at inference")
    suffixes = (".keras", ".h5") if framework == "keras" else (".h5",)
    for suffix in suffixes:
        path = tmp_path / f"{name}{suffix}"
        try:
            model.save(str(path))
        except TypeError:  # Keras 3 cannot write some layers to a legacy .h5 (it fails to copy their config)
            assert suffix == ".h5" and framework == "keras", f"{framework} cannot save {name} as {suffix}"
            continue
        if name in REFUSED:
            with pytest.raises(UnsupportedLayerError, match=re.escape(name)) as refused:
                npmobile.load_model(path)
            assert REFUSED[name][:40] in str(refused.value)
            continue
        got = npmobile.load_model(path)
        assert_bit_close(got.predict(x), expected, f"{framework} {name} {suffix}")
        assert_bit_close(got.predict(x, reference=True), expected, f"{framework} {name} {suffix}, reference")
        if name in IDENTITY_AT_INFERENCE:
            assert all(n.op in ("InputLayer", "Rescaling") for n in got.optimized_graph().nodes), name


def test_random_crop_follows_the_writer(tmp_path):
    """tf_keras's predict resizes the aspect-ratio crop to the crop size; Keras 3's returns the input
    unchanged although its model declares the crop size. npmobile does what the writer's predict does."""
    x = _pixels(SHAPE)
    for framework in FRAMEWORKS:
        model, _ = _build(framework, "RandomCrop")
        expected = np.asarray(model.predict(x, verbose=0))
        path = tmp_path / f"crop-{framework}.h5"
        model.save(str(path))
        assert npmobile.load_model(path).predict(x).shape == expected.shape
    assert _build("tf_keras", "RandomCrop")[0].predict(x, verbose=0).shape[1:3] == (16, 21)
    assert _build("keras", "RandomCrop")[0].predict(x, verbose=0).shape[1:3] == SHAPE[:2]


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("interpolation,crop", [("bilinear", False), ("nearest", False), ("bilinear", True)])
def test_resizing_up_and_down_matches_keras(tmp_path, framework, interpolation, crop):
    keras = importlib.import_module(framework)
    inputs = keras.Input(SHAPE)
    down = keras.layers.Resizing(13, 19, interpolation=interpolation, crop_to_aspect_ratio=crop)(inputs)
    up = keras.layers.Resizing(47, 61, interpolation=interpolation, crop_to_aspect_ratio=crop)(down)
    model = keras.Model(inputs, up)
    path = tmp_path / "resize.h5"
    model.save(str(path))
    x = _pixels(SHAPE, 9)
    np.testing.assert_allclose(npmobile.load_model(path).predict(x), model.predict(x, verbose=0), rtol=0, atol=1e-4)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_normalization_adapted_and_inverted(tmp_path, framework):
    keras = importlib.import_module(framework)
    x = _pixels(SHAPE, 4)
    adapted = keras.layers.Normalization()
    adapted.adapt(x)
    inputs = keras.Input(SHAPE)
    y = adapted(inputs)
    y = keras.layers.Normalization(mean=[0.5, -0.2, 0.0], variance=[4.0, 0.25, 1.0], invert=True)(y)
    model = keras.Model(inputs, keras.layers.Normalization(mean=3.0, variance=2.0)(y))
    suffix = ".keras" if framework == "keras" else ".h5"
    model.save(str(tmp_path / f"norm{suffix}"))
    assert_bit_close(npmobile.load_model(tmp_path / f"norm{suffix}").predict(x), model.predict(x, verbose=0),
                     f"Normalization {framework}")


def test_docs_list_every_refusal():
    text = REFUSALS_PAGE.read_text()
    for name in REFUSED:
        assert f"`{name}`" in text, f"docs/reading-keras-files.md's table of refusals does not list {name}"
