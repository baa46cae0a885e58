"""Models written by hand from tutorials, with activations as Python functions: Keras writes only the
function's name, so npmobile reads them when the user names the built-in each function computes
(``custom_objects={"hard_swish": "hard_swish"}``) and refuses them otherwise, and never runs code."""

from __future__ import annotations

import numpy as np
import pytest
from test_parity import assert_bit_close
from tutorial_models import FAMILIES, MAPPING, WRITERS

import npmobile


@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_tutorial_model_with_function_activations_matches_keras(tutorials, family, writer):
    case = tutorials(family, writer)
    model = npmobile.load_model(case.path, custom_objects=case.mapping)
    assert_bit_close(model.predict(case.x), case.y, f"tutorial {family} {writer}")
    assert_bit_close(model.predict(case.x, reference=True), case.y, f"tutorial {family} {writer} reference")


@pytest.mark.parametrize("writer", WRITERS)
def test_tutorial_layers_match_keras_layer_by_layer(tutorials, writer):
    case = tutorials("MobileNetV3Small", writer)
    names = ["stem_act", "block0_se_expand", "block0_se_mul", "block3_dw_act", "block4_add", "fc"]
    got = npmobile.load_model(case.path, custom_objects=case.mapping).predict(case.x, outputs=names)
    import importlib

    keras = importlib.import_module("tf_keras" if writer == "tfkeras_h5" else "keras")
    probe = keras.Model(case.keras_model.inputs, [case.keras_model.get_layer(n).output for n in names])
    for name, expected in zip(names, probe.predict(case.x, verbose=0)):
        assert_bit_close(got[name], expected, f"{writer} layer {name}")


@pytest.mark.parametrize("writer", WRITERS)
def test_unmapped_custom_function_is_refused_with_the_way_to_map_it(tutorials, writer):
    case = tutorials("MobileNetV3Small", writer)
    with pytest.raises(npmobile.UnsupportedLayerError) as error:
        npmobile.load_model(case.path)
    message = str(error.value)
    assert str(case.path) in message and "is a custom function" in message
    assert "custom_objects={'hard_swish': 'hard_swish'}" in message
    assert "--custom-object hard_swish=hard_swish" in message
    # Half a mapping is still refused, naming the function left over.
    with pytest.raises(npmobile.UnsupportedLayerError, match="'h_sigmoid' is a custom function"):
        npmobile.load_model(case.path, custom_objects={"hard_swish": "hard_swish"})


def test_a_python_function_as_value_is_refused_showing_the_string_to_pass(tutorials):
    case = tutorials("MobileNetV3Small", "keras3_keras")

    def hard_swish(x):
        return x

    with pytest.raises(npmobile.CustomObjectError) as error:
        npmobile.load_model(case.path, custom_objects={"hard_swish": hard_swish, "h_sigmoid": "hard_sigmoid"})
    assert "custom_objects={'hard_swish': 'hard_swish'}" in str(error.value)
    with pytest.raises(npmobile.CustomObjectError, match="not a built-in activation npmobile knows"):
        npmobile.load_model(case.path, custom_objects={"hard_swish": "hard_swish", "h_sigmoid": "gelu"})


def test_mapping_names_the_function_computed_not_a_guess(tutorials):
    """Mapped to another built-in, the model computes that built-in: npmobile takes the user's word."""
    case = tutorials("MobileNetV3Small", "keras3_keras")
    model = npmobile.load_model(case.path, custom_objects={**MAPPING, "hard_swish": "relu"})
    assert model.graph.node("stem_act").config["activation"] == "relu"
    assert not np.allclose(model.predict(case.x), case.y, atol=5e-5)


def test_mapped_hard_sigmoid_means_keras3s_in_a_file_keras2_wrote(tutorials):
    """The plain name "hard_sigmoid" in a Keras 2 file keeps Keras 2's 0.2x + 0.5 (tests/test_parity.py); a
    function mapped to hard_sigmoid means npmobile's, relu6(x + 3) / 6, whoever wrote the file."""
    case = tutorials("MobileNetV3Small", "tfkeras_h5")
    model = npmobile.load_model(case.path, custom_objects=case.mapping)
    assert model.graph.keras_version == 2
    assert model.graph.node("block0_se_expand").config["activation"] == "hard_sigmoid_keras3"
    assert_bit_close(model.predict(case.x), case.y, "tf_keras h_sigmoid -> hard_sigmoid")


@pytest.mark.parametrize("framework,suffix", [("keras", ".keras"), ("keras", ".h5"), ("tf_keras", ".h5")])
def test_lambda_layers_stay_refused_whatever_the_mapping(tmp_path, framework, suffix):
    import importlib

    keras = importlib.import_module(framework)
    inputs = keras.Input((8, 8, 3))
    outputs = keras.layers.Lambda(lambda t: t * 2.0, name="doubling")(inputs)
    path = tmp_path / f"lambda{suffix}"
    keras.Model(inputs, outputs).save(str(path))
    with pytest.raises(npmobile.UnsupportedLayerError, match="'doubling' is a Lambda layer"):
        npmobile.load_model(path, custom_objects={"doubling": "linear", "<lambda>": "linear", "lambda": "linear"})


def test_float64_reference_is_float64_and_close_to_float32(tutorials):
    case = tutorials("MobileNetV2", "keras3_keras")
    model = npmobile.load_model(case.path, custom_objects=case.mapping)
    exact = model.predict(case.x, reference=True, dtype=np.float64)
    assert exact.dtype == np.float64
    assert_bit_close(model.predict(case.x).astype(np.float64), exact, "float32 fast path vs float64 reference")
    maps = model.predict(case.x, reference=True, dtype=np.float64, outputs=["block1_dw_act"])
    assert maps["block1_dw_act"].dtype == np.float64
    with pytest.raises(npmobile.InputShapeError, match="float64 runs only with reference=True"):
        model.predict(case.x, dtype=np.float64)


def test_the_activation_table_and_the_kernel_codes_agree():
    """npmobile/activations.py is the one table of activations (free of Numba, for the readers' child); the
    kernels' name -> code dict covers exactly its names that have an epilogue, and every layer it fuses."""
    from npmobile.activations import ACTIVATIONS, FUSABLE_ACTIVATIONS, lookup
    from npmobile.kernels.activations import ACT_NONE, ACTIVATION_CODES

    assert all(lookup(name) is not None for name in ACTIVATION_CODES if name is not None)
    assert set(FUSABLE_ACTIVATIONS) <= set(ACTIVATION_CODES)
    assert {a.name for a in ACTIVATIONS if a.keras2 is not None} == {"hard_sigmoid"}
    assert ACTIVATION_CODES["hard_sigmoid_keras3"] == ACTIVATION_CODES["hard_sigmoid"] != ACT_NONE
