"""Graph building from a ModelSpec: wiring, nested models, and the errors for graphs we refuse."""

from __future__ import annotations

import re

import numpy as np
import pytest

from npmobile.errors import ModelFileError, UnsupportedLayerError
from npmobile.graph import Graph
from npmobile.interpreter import Model
from npmobile.spec import CallSpec, LayerSpec, ModelSpec, TensorRef


def _input(name="img", shape=(None, 8, 8, 3)) -> LayerSpec:
    return LayerSpec(name, "InputLayer", {"batch_shape": shape}, [])


def _layer(name, cls, config, *sources) -> LayerSpec:
    args = [TensorRef(s) if isinstance(s, str) else s for s in sources]
    return LayerSpec(name, cls, config, [CallSpec(args)])


def _spec(layers, output, weights=None, name="m") -> ModelSpec:
    return ModelSpec(name, layers, [TensorRef(layers[0].name)], [TensorRef(output)], weights or {},
                     source="test.h5")


def _conv_weights(cin, cout, k=1, seed=0):
    rng = np.random.default_rng(seed)
    return {"kernel": rng.normal(size=(k, k, cin, cout)).astype(np.float32),
            "bias": rng.normal(size=cout).astype(np.float32)}


CONV = {"filters": 4, "kernel_size": (1, 1), "strides": (1, 1), "padding": "same", "use_bias": True,
        "activation": "linear"}


def test_layers_out_of_order_are_sorted_by_their_inputs():
    layers = [_input(), _layer("relu", "ReLU", {}, "conv"), _layer("conv", "Conv2D", CONV, "img")]
    graph = Graph.from_spec(_spec(layers, "relu", {"conv": _conv_weights(3, 4)}))
    assert [n.name for n in graph.nodes] == ["img", "conv", "relu"]


def test_scalar_operands_are_kept_as_numbers():
    layers = [_input(), _layer("plus3", "Add", {}, "img", 3.0), _layer("sixth", "Multiply", {}, "plus3", 1 / 6)]
    model = Model(Graph.from_spec(_spec(layers, "sixth")))
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(model.predict(x), (x + np.float32(3)) * np.float32(1 / 6), rtol=1e-6)


def test_nested_model_is_inlined_with_its_names_and_addressable():
    inner = _spec([_input("inner_in"), _layer("inner_conv", "Conv2D", CONV, "inner_in")], "inner_conv",
                  {"inner_conv": _conv_weights(3, 4, seed=1)}, name="backbone")
    backbone = LayerSpec("backbone", "Functional", {}, [CallSpec([TensorRef("img")])], submodel=inner)
    layers = [_input(), backbone, _layer("pool", "GlobalAveragePooling2D", {}, "backbone")]
    model = Model(Graph.from_spec(_spec(layers, "pool")))
    x = np.random.default_rng(2).normal(size=(1, 8, 8, 3)).astype(np.float32)
    out = model.predict(x, outputs=["backbone", "inner_conv", "pool"])
    np.testing.assert_array_equal(out["backbone"], out["inner_conv"])
    np.testing.assert_allclose(out["pool"], out["inner_conv"].mean(axis=(1, 2)), rtol=1e-5)


# Graphs refused as they are built: (the layers after the input, the output, the error, what it says).
REFUSED = {
    "cycle": ([_layer("a", "ReLU", {}, "b"), _layer("b", "ReLU", {}, "a")], "b", ModelFileError, "cycle"),
    "dangling-input-names-both-layers": ([_layer("a", "ReLU", {}, "ghost")], "a", ModelFileError,
                                         "'a' takes input from 'ghost'"),
    "lambda-without-running-anything": ([_layer("evil", "Lambda", {"function": "4wEAAAAAAAAA"}, "img")], "evil",
                                        UnsupportedLayerError, "never executes code"),
    "unknown-layer-names-class-and-name": ([_layer("attn", "MultiHeadAttention", {}, "img")], "attn",
                                           UnsupportedLayerError, "'attn' has class 'MultiHeadAttention'"),
}


@pytest.mark.parametrize("case", REFUSED, ids=list(REFUSED))
def test_a_graph_that_cannot_run_is_refused_saying_why(case):
    layers, output, error, message = REFUSED[case]
    with pytest.raises(error, match=message):
        Graph.from_spec(_spec([_input(), *layers], output))


def test_weight_shape_disagreeing_with_config_fails_at_load():
    layers = [_input(), _layer("conv", "Conv2D", CONV, "img")]
    with pytest.raises(ModelFileError, match=r"layer 'conv' \(Conv2D\): weight 'kernel' has shape \(1, 1, 5, 4\)"):
        Model(Graph.from_spec(_spec(layers, "conv", {"conv": _conv_weights(5, 4)})))


def test_missing_weight_fails_at_load():
    layers = [_input(), _layer("conv", "Conv2D", CONV, "img")]
    with pytest.raises(ModelFileError, match="'bias' is missing"):
        Model(Graph.from_spec(_spec(layers, "conv", {"conv": {"kernel": np.zeros((1, 1, 3, 4), np.float32)}})))


def test_wrong_input_shape_says_what_the_model_takes():
    layers = [_input(), _layer("relu", "ReLU", {}, "img")]
    model = Model(Graph.from_spec(_spec(layers, "relu")))
    with pytest.raises(ValueError, match=r"expects input of shape \(batch, 8, 8, 3\)"):
        model.predict(np.zeros((1, 8, 9, 3), np.float32))


@pytest.mark.parametrize("config,error,words", [
    ({"size": (2**15, 2**15)}, ModelFileError, "values per image; refusing it"),  # the generic size check
    ({"size": (0, 2)}, ModelFileError, "size=(0, 2) must be positive integers"),
    ({"size": (2, 2), "interpolation": "bicubic"}, UnsupportedLayerError, "interpolation 'bicubic'"),
    ({"size": (2, 2), "data_format": "channels_first"}, UnsupportedLayerError, "channels_last"),
])
def test_upsampling2d_refuses_what_it_cannot_run_at_load(config, error, words):
    layers = [_input(), _layer("up", "UpSampling2D", config, "img")]
    with pytest.raises(error, match=re.escape(words)):
        Model(Graph.from_spec(_spec(layers, "up")))


def test_a_layer_class_without_a_record_is_refused_not_given_a_default_shape():
    layers = [_input(), _layer("norm", "LayerNormalization", {"axis": -1}, "img")]
    with pytest.raises(UnsupportedLayerError, match="'LayerNormalization', which npmobile does not support"):
        Model(Graph.from_spec(_spec(layers, "norm")))
