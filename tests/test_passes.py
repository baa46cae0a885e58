"""Each pass makes the graph smaller and leaves its answers alone; requested layers stop fusion."""

from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import pytest

from npmobile import applications
from npmobile.passes import (
    drop_dropout,
    fold_batchnorm,
    fold_rescaling,
    fuse_activation,
    fuse_residual_add,
    fuse_squeeze_excite,
    fuse_zero_padding,
)


def _with_batchnorm_statistics(model, seed=0):
    """Give every BatchNorm non-trivial statistics so folding has something to fold."""
    rng = np.random.default_rng(seed)
    for node in model.graph.nodes:
        if node.op == "BatchNormalization":
            c = node.weights["gamma"].shape[0]
            node.weights = {
                "gamma": (rng.uniform(0.5, 1.5, c) * np.where(rng.random(c) < 0.1, -1, 1)).astype(np.float32),
                "beta": rng.normal(0, 0.2, c).astype(np.float32),
                "moving_mean": rng.normal(0, 0.2, c).astype(np.float32),
                "moving_variance": rng.uniform(0.5, 2.0, c).astype(np.float32),
            }
    return model


MODELS = {
    "v1": lambda: applications.MobileNet(weights=None, input_shape=(64, 64, 3), alpha=0.25),
    "v2": lambda: applications.MobileNetV2(weights=None, input_shape=(64, 72, 3), alpha=0.35),
    "v3small": lambda: applications.MobileNetV3Small(weights=None, input_shape=(64, 64, 3)),
    "v3large-min": lambda: applications.MobileNetV3Large(weights=None, input_shape=(65, 65, 3), minimalistic=True),
}


@pytest.mark.parametrize("family", MODELS)
def test_optimized_graph_gives_the_unfused_answer(family):
    model = _with_batchnorm_statistics(MODELS[family]())
    x = np.random.default_rng(1).uniform(-1, 1, (2, *model.input_shape[1:])).astype(np.float32)
    if family.startswith("v3"):
        x = (x + 1) * 127.5
    every_layer = [n.name for n in model.graph.nodes if n.op != "InputLayer"]
    unfused = model.predict(x, outputs=every_layer)  # asking for every layer leaves nothing to fuse
    dropouts = sum(n.op == "Dropout" for n in model.graph.nodes)  # the identity: dropped even when asked for
    assert len(model.optimized_graph(every_layer).nodes) == len(model.graph.nodes) - dropouts
    final = model.graph.outputs[0]
    fused = model.predict(x)
    assert len(model.optimized_graph().nodes) < len(model.graph.nodes) / 2
    np.testing.assert_allclose(fused, unfused[final], rtol=0, atol=2e-6)


def test_v2_plan_has_only_convolutions_and_the_head():
    model = MODELS["v2"]()
    ops = Counter(n.op for n in model.optimized_graph().nodes)
    assert ops == Counter({"Conv2D": 35, "DepthwiseConv2D": 17, "InputLayer": 1, "GlobalAveragePooling2D": 1,
                           "Dense": 1})
    conv = model.optimized_graph().node("block_2_project")
    assert conv.config["residual"] and conv.keras_names == ["block_2_project", "block_2_project_BN", "block_2_add"]
    assert model.optimized_graph().node("block_1_depthwise").config["padding"] == ((0, 1), (0, 1))


def test_v3_squeeze_excite_becomes_one_node():
    model = MODELS["v3small"]()
    plan = model.optimized_graph()
    se = plan.node("expanded_conv_squeeze_excite_mul")
    assert se.op == "SqueezeExcite"
    assert Counter(n.op for n in plan.nodes)["SqueezeExcite"] == 9


def test_v3_rescaling_is_read_by_the_stem_exactly():
    """The stem convolution reads x * scale + offset inside the image and zeros in its padding, so
    the folded Rescaling gives Keras's answer at the border pixels too (the image's edge columns
    are where folding into the weights would be wrong)."""
    model = _with_batchnorm_statistics(MODELS["v3small"]())
    stem = model.optimized_graph().node("conv")
    assert "Rescaling" not in Counter(n.op for n in model.optimized_graph().nodes)
    assert (stem.config["input_scale"], stem.config["input_offset"]) == (1 / 127.5, -1.0)
    assert stem.inputs == [model.graph.inputs[0]]
    x = np.random.default_rng(5).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    x[:, :, 0], x[:, 0] = 255.0, 0.0  # edge pixels far from 127.5, where a weight fold would differ
    keras_order = model.predict(x, outputs=["rescaling", "conv"])  # asking for rescaling keeps the layer
    assert model.optimized_graph(["rescaling", "conv"]).node("rescaling").op == "Rescaling"
    folded = model.predict(x, outputs=["conv"])["conv"]
    np.testing.assert_allclose(folded, keras_order["conv"], rtol=0, atol=2e-6)


def test_requested_layer_is_not_absorbed():
    model = _with_batchnorm_statistics(MODELS["v2"]())
    x = np.random.default_rng(2).uniform(-1, 1, (1, 64, 72, 3)).astype(np.float32)
    out = model.predict(x, outputs=["block_3_depthwise", "block_3_depthwise_BN"])
    plan = model.optimized_graph(["block_3_depthwise", "block_3_depthwise_BN"])
    assert plan.node("block_3_depthwise").keras_names == ["block_3_depthwise"]
    assert plan.node("block_3_depthwise_BN").op == "BatchNormalization"
    assert out["block_3_depthwise"].shape[1:] == model.shapes["block_3_depthwise"][1:]
    # Asking for a fused-away layer's name still answers: the node that absorbed it has its output.
    relu = model.predict(x, outputs=["block_3_depthwise_relu"])["block_3_depthwise_relu"]
    assert relu.min() >= 0 and relu.max() <= 6


@pytest.mark.parametrize(
    "fuse,op_gone",
    [(drop_dropout, "Dropout"), (fold_batchnorm, "BatchNormalization"), (fuse_zero_padding, "ZeroPadding2D"),
     (fuse_activation, "ReLU"), (fuse_squeeze_excite, "GlobalAveragePooling2D"), (fold_rescaling, "Rescaling")],
)
def test_each_pass_removes_what_it_fuses(fuse, op_gone):
    model = applications.MobileNetV3Small(weights=None, input_shape=(64, 64, 3), dropout_rate=0.2)
    g = copy.deepcopy(model.graph)
    before = Counter(n.op for n in g.nodes)[op_gone]
    fuse(g, set())
    after = Counter(n.op for n in g.nodes)[op_gone]
    assert before > 0 and after < before


def test_residual_pass_moves_add_into_projection():
    model = MODELS["v2"]()
    g = copy.deepcopy(model.graph)
    fold_batchnorm(g, set())
    fuse_residual_add(g, set())
    assert not [n for n in g.nodes if n.op == "Add"]
    assert g.node("block_16_project").config.get("residual") is None  # 160 -> 320 channels: no shortcut


@pytest.mark.parametrize("family", MODELS)
def test_fast_plan_matches_layer_by_layer_reference(family):
    model = _with_batchnorm_statistics(MODELS[family](), seed=3)
    x = np.random.default_rng(4).uniform(0, 255, (3, *model.input_shape[1:])).astype(np.float32)
    if not family.startswith("v3"):
        x = x / 127.5 - 1
    expected = model.predict(x, reference=True)
    np.testing.assert_allclose(model.predict(x), expected, rtol=0, atol=2e-6)
    np.testing.assert_allclose(model.predict(x, batch_size=2), expected, rtol=0, atol=2e-6)


def test_hard_swish_spelled_as_layers_becomes_one_activation_with_the_same_rounding():
    from npmobile.graph import Graph
    from npmobile.interpreter import Model
    from npmobile.spec import CallSpec, LayerSpec, ModelSpec, TensorRef

    def layer(name, cls, config, *args):
        return LayerSpec(name, cls, config, [CallSpec([TensorRef(a) if isinstance(a, str) else a for a in args])])

    layers = [
        LayerSpec("img", "InputLayer", {"batch_shape": (None, 4, 4, 8)}, []),
        layer("plus3", "Add", {}, "img", 3.0),
        layer("relu6", "ReLU", {"max_value": 6.0}, "plus3"),
        layer("sixth", "Multiply", {}, "relu6", 1 / 6),
        layer("hswish", "Multiply", {}, "img", "sixth"),
    ]
    model = Model(Graph.from_spec(ModelSpec("m", layers, [TensorRef("img")], [TensorRef("hswish")], keras_version=2)))
    plan = model.optimized_graph()
    assert [n.op for n in plan.nodes] == ["InputLayer", "Activation"]
    x = np.random.default_rng(0).uniform(-5, 5, (2, 4, 4, 8)).astype(np.float32)
    np.testing.assert_array_equal(model.predict(x), model.predict(x, reference=True))


def test_plan_without_blas_gives_the_same_answer(monkeypatch):
    """With a NumPy whose BLAS npmobile cannot call from Numba, the 1x1 and stem convolutions take the
    np.matmul path (kernels/blas.py AVAILABLE False): same answers, end to end."""
    from npmobile.kernels import blas

    model = _with_batchnorm_statistics(MODELS["v3small"](), seed=6)
    x = np.random.default_rng(7).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    with_blas = model.predict(x)
    monkeypatch.setattr(blas, "AVAILABLE", False)
    np.testing.assert_allclose(model.predict(x), with_blas, rtol=0, atol=2e-6)
    np.testing.assert_allclose(model.predict(x, reference=True), with_blas, rtol=0, atol=2e-6)


def test_model_plan_is_a_deprecated_name_of_optimized_graph():
    model = applications.MobileNetV3Small(weights=None, input_shape=(32, 32, 3))
    with pytest.warns(DeprecationWarning, match="optimized_graph"):
        old = model.plan()
    assert old is model.optimized_graph()
