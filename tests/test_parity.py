"""Parity with Keras on files Keras writes: every family, every file flavour, the flags that change
the graph. Bit-close means: the same top-5, probabilities within 5e-5, feature maps within
1e-4 x max(1, max|reference|) -- float32 rounding differences only."""

from __future__ import annotations

import numpy as np
import pytest
from keras_files import NESTED, WRITERS, segmentation_head

from npmobile.verify import FEATURE_RTOL, PROBABILITY_ATOL

# (family, keras.applications kwargs): each flag that changes the graph, on small inputs.
VARIANTS = [
    ("MobileNet", dict(input_shape=(128, 128, 3), alpha=0.25)),
    ("MobileNet", dict(input_shape=(97, 113, 3), alpha=0.5, depth_multiplier=2)),
    ("MobileNetV2", dict(input_shape=(96, 96, 3), alpha=0.35)),
    ("MobileNetV2", dict(input_shape=(128, 96, 3), alpha=1.4, include_top=False, pooling="avg")),
    ("MobileNetV3Small", dict(input_shape=(96, 96, 3))),
    ("MobileNetV3Small", dict(input_shape=(112, 112, 3), alpha=0.75, include_preprocessing=False)),
    ("MobileNetV3Large", dict(input_shape=(96, 96, 3), minimalistic=True)),
    ("MobileNetV3Large", dict(input_shape=(128, 128, 3), alpha=0.75, include_top=False, pooling="max")),
]
FULL_SIZE = [
    ("MobileNet", dict(input_shape=(224, 224, 3))),
    ("MobileNetV2", dict(input_shape=(224, 224, 3))),
    ("MobileNetV3Small", dict(input_shape=(224, 224, 3))),
    ("MobileNetV3Large", dict(input_shape=(224, 224, 3))),
]


def _id(family, kwargs):
    return family + "-" + "-".join(f"{k}={v}" for k, v in kwargs.items() if k != "input_shape") + \
        "-" + "x".join(str(d) for d in kwargs["input_shape"][:2])


def assert_bit_close(got: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert got.shape == expected.shape, what
    is_probability = expected.ndim == 2 and np.allclose(expected.sum(axis=1), 1, atol=1e-3) and expected.min() >= 0
    if is_probability:
        np.testing.assert_array_equal(np.argsort(-got, axis=1)[:, :5], np.argsort(-expected, axis=1)[:, :5],
                                      err_msg=f"{what}: top-5 differs")
        np.testing.assert_allclose(got, expected, rtol=0, atol=PROBABILITY_ATOL, err_msg=what)
    else:
        scale = max(1.0, float(np.abs(expected).max()))
        np.testing.assert_allclose(got, expected, rtol=0, atol=FEATURE_RTOL * scale, err_msg=what)


@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("family,kwargs", VARIANTS, ids=[_id(*v) for v in VARIANTS])
def test_file_flavour_matches_keras(keras_files, family, kwargs, writer):
    case = keras_files.get(family, writer, **kwargs)
    model = case.load()
    assert_bit_close(model.predict(case.x), case.y, f"{family} {writer}")


@pytest.mark.parametrize("writer", ["keras3_h5", "keras3_keras", "tfkeras_h5"])
def test_custom_head_on_nested_backbone(keras_files, writer):
    case = keras_files.get(NESTED, writer, input_shape=(128, 128, 3), alpha=0.35)
    model = case.load()
    assert_bit_close(model.predict(case.x), case.y, f"nested {writer}")
    # The nested backbone's layers keep their Keras names.
    maps = model.predict(case.x, outputs=["block_3_depthwise", "out_relu"])
    backbone = case.keras_model.layers[1]
    assert maps["block_3_depthwise"].shape[1:] == tuple(backbone.get_layer("block_3_depthwise").output.shape[1:])
    assert maps["out_relu"].shape[1:] == tuple(backbone.output.shape[1:])


@pytest.mark.parametrize("writer", ["keras3_keras", "tfkeras_h5"])
def test_batch_larger_than_one_and_chunked(keras_files, writer):
    case = keras_files.get("MobileNetV2", writer, batch=5, input_shape=(96, 96, 3), alpha=0.5)
    model = case.load()
    assert_bit_close(model.predict(case.x), case.y, "batch 5")
    assert_bit_close(model.predict(case.x, batch_size=2), case.y, "batch 5 in chunks of 2")


LAYERS = {
    "MobileNet": ["conv1_relu", "conv_dw_2", "conv_pw_6_bn", "conv_pw_13_relu"],
    "MobileNetV2": ["Conv1", "block_1_pad", "block_3_depthwise", "block_5_add", "out_relu"],
    "MobileNetV3Small": ["conv_bn", "expanded_conv_squeeze_excite_mul", "expanded_conv_3_depthwise",
                         "expanded_conv_5_add", "conv_1_bn"],
    # the Large variant tested here is minimalistic: no squeeze-excite
    "MobileNetV3Large": ["expanded_conv_1_expand", "expanded_conv_3_depthwise", "expanded_conv_14_add"],
}


LAYER_BY_LAYER = [VARIANTS[i] for i in (0, 2, 4, 6)]  # one variant per family


@pytest.mark.parametrize("family,kwargs", LAYER_BY_LAYER, ids=[f for f, _ in LAYER_BY_LAYER])
def test_intermediate_layers_match_keras_layer_by_layer(keras_files, family, kwargs):
    case = keras_files.get(family, "keras3_keras", **kwargs)
    names = LAYERS[family]
    got = case.load().predict(case.x, outputs=names)
    for name, expected in case.intermediate(names).items():
        assert_bit_close(got[name], expected, f"{family} layer {name}")


@pytest.mark.parametrize("family,kwargs", FULL_SIZE, ids=[f for f, _ in FULL_SIZE])
def test_full_size_224(keras_files, family, kwargs):
    case = keras_files.get(family, "keras3_keras", **kwargs)
    assert_bit_close(case.load().predict(case.x), case.y, f"{family} 224")


@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("family,kwargs", FULL_SIZE, ids=[f for f, _ in FULL_SIZE])
def test_full_size_224_every_flavour(keras_files, family, kwargs, writer):
    case = keras_files.get(family, writer, **kwargs)
    assert_bit_close(case.load().predict(case.x), case.y, f"{family} 224 {writer}")


def _every_layer_model(keras):
    """A small model with every layer class npmobile supports beyond the four MobileNets."""
    layers = keras.layers
    inputs = keras.Input((33, 29, 3))
    x = layers.Rescaling(1 / 255.0, offset=0.1)(inputs)
    x = layers.ZeroPadding2D(((1, 2), (0, 1)))(x)
    a = layers.SeparableConv2D(8, 3, strides=2, padding="same", depth_multiplier=2, activation="swish")(x)
    b = layers.Conv2D(8, 3, strides=2, padding="same", dilation_rate=1, activation="sigmoid")(x)
    x = layers.Concatenate()([a, b])
    x = layers.ReLU(max_value=4.0, negative_slope=0.1, threshold=0.5)(x)
    x = layers.DepthwiseConv2D(5, padding="same", depth_multiplier=2, use_bias=True, activation="relu")(x)
    x = layers.AveragePooling2D(3, strides=2, padding="same")(x)
    x = layers.Conv2D(12, 3, padding="valid", dilation_rate=2, activation="tanh")(x)
    y = layers.MaxPooling2D(2, padding="valid")(x)
    z = layers.GlobalMaxPooling2D(keepdims=True)(x)
    x = layers.Multiply()([y, z])
    x = layers.Activation("hard_sigmoid")(x)
    x = layers.Flatten()(x)
    x = layers.Dense(20, activation="relu")(x)
    x = layers.Reshape((4, 5))(x)
    x = layers.Dense(6)(x)
    x = layers.Reshape((24,))(x)
    outputs = layers.Activation("softmax")(x)
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize("framework,suffix", [("keras", ".keras"), ("keras", ".h5"), ("tf_keras", ".h5")])
def test_every_supported_layer_class_matches_keras(tmp_path, framework, suffix):
    import importlib

    import npmobile

    keras = importlib.import_module(framework)
    model = _every_layer_model(keras)
    rng = np.random.default_rng(5)
    for layer in model.layers:
        weights = layer.get_weights()
        if weights:
            layer.set_weights([rng.normal(0, 0.5, w.shape).astype(np.float32) for w in weights])
    x = rng.uniform(0, 255, (3, 33, 29, 3)).astype(np.float32)
    path = tmp_path / f"every_layer{suffix}"
    model.save(str(path))
    got = npmobile.load_model(path)
    assert_bit_close(got.predict(x), model.predict(x, verbose=0), f"every layer, {framework} {suffix}")
    # Keras 2 meant hard_sigmoid as clip(0.2x + 0.5); Keras 3 as relu6(x + 3) / 6: both read right.
    assert got.graph.keras_version == (2 if framework == "tf_keras" else 3)



@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
@pytest.mark.parametrize("framework,suffix", [("keras", ".keras"), ("keras", ".h5"), ("tf_keras", ".h5")])
def test_upsampling2d_matches_keras(tmp_path, framework, suffix, interpolation):
    """UpSampling2D, the layer type README's "Adding a layer type" walks through, against Keras itself."""
    import importlib

    import npmobile

    keras = importlib.import_module(framework)
    model = segmentation_head(keras, interpolation)
    rng = np.random.default_rng(11)
    for layer in model.layers:
        weights = layer.get_weights()
        if weights:
            layer.set_weights([rng.normal(0, 0.5, w.shape).astype(np.float32) for w in weights])
    x = rng.uniform(-1, 1, (2, 21, 27, 3)).astype(np.float32)
    path = tmp_path / f"segmentation{suffix}"
    model.save(str(path))
    got = npmobile.load_model(path)
    assert got.predict(x).shape == (2, 36, 28, 4)
    assert_bit_close(got.predict(x), model.predict(x, verbose=0), f"UpSampling2D {interpolation}, {framework}")
    assert_bit_close(got.predict(x, reference=True), model.predict(x, verbose=0), "reference path")
