"""The architectures build the graph keras.applications builds: same layer names and classes, same
weight shapes, same output shapes, and (with Keras's weights copied over by layer name) the same
numbers. Files are not involved here; tests/test_parity.py covers the file paths."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import keras  # noqa: E402  (the reference: a missing install must fail the run, never skip)

from npmobile import applications  # noqa: E402
from npmobile.errors import NpmobileError  # noqa: E402

CASES = [
    ("MobileNet", dict(input_shape=(128, 128, 3), alpha=0.25)),
    ("MobileNet", dict(input_shape=(97, 131, 3), alpha=0.5, depth_multiplier=2)),
    ("MobileNet", dict(input_shape=(96, 96, 3), include_top=False, pooling="max")),
    ("MobileNetV2", dict(input_shape=(96, 96, 3), alpha=0.35)),
    ("MobileNetV2", dict(input_shape=(96, 128, 3), alpha=1.4, include_top=False, pooling="avg")),
    ("MobileNetV2", dict(input_shape=(97, 97, 3), alpha=1.3, classes=10, classifier_activation=None)),
    ("MobileNetV3Small", dict(input_shape=(96, 96, 3))),
    ("MobileNetV3Small", dict(input_shape=(96, 96, 3), alpha=0.75, minimalistic=True, include_preprocessing=False)),
    ("MobileNetV3Large", dict(input_shape=(128, 96, 3), include_top=False, pooling="avg")),
    ("MobileNetV3Large", dict(input_shape=(99, 99, 3), alpha=1.25, minimalistic=True)),
]


# Layers Keras names automatically get a session-wide counter (re_lu_17): compare their stems.
AUTO_NAMED = re.compile(r"^(input_layer|re_lu|activation|global_average_pooling2d|global_max_pooling2d|flatten|"
                        r"dropout|rescaling)(_\d+)?$")


def _stable_name(name: str) -> str:
    match = AUTO_NAMED.match(name)
    return match.group(1) if match else name


def _keras_weights_by_name(model) -> dict[str, dict[str, np.ndarray]]:
    """Keras's weights keyed by layer name and npmobile's canonical variable names."""
    out = {}
    for layer in model.layers:
        arrays = layer.get_weights()
        if not arrays:
            continue
        cls = type(layer).__name__
        if cls == "BatchNormalization":
            names = ["gamma"] * layer.scale + ["beta"] * layer.center + ["moving_mean", "moving_variance"]
        elif cls == "DepthwiseConv2D":
            names = ["depthwise_kernel", "bias"]
        else:
            names = ["kernel", "bias"]
        out[layer.name] = dict(zip(names, arrays))
    return out


def _perturb_batchnorm(model, rng) -> None:
    for layer in model.layers:
        if type(layer).__name__ == "BatchNormalization":
            c = layer.get_weights()[0].shape[0]
            sign = np.where(rng.random(c) < 0.1, -1.0, 1.0)
            layer.set_weights([(rng.uniform(0.5, 1.5, c) * sign).astype("f4"), rng.normal(0, 0.2, c).astype("f4"),
                               rng.normal(0, 0.2, c).astype("f4"), rng.uniform(0.5, 2.0, c).astype("f4")])


@pytest.mark.parametrize("family,kwargs", CASES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(CASES)])
def test_architecture_matches_keras_applications(family, kwargs):
    reference = getattr(keras.applications, family)(weights=None, **kwargs)
    ours = getattr(applications, family)(weights=None, **kwargs)

    assert ours.name == reference.name
    keras_layers = [(_stable_name(layer.name), type(layer).__name__) for layer in reference.layers]
    # Keras 3 lists the scalar ops of V3's hard_sigmoid (x + 3, x * 1/6) as graph nodes, not layers.
    scalar_ops = {n.name for n in ours.graph.nodes if n.op in ("Add", "Multiply") and len(n.inputs) == 2
                  and not all(isinstance(i, str) for i in n.inputs)}
    our_layers = [(_stable_name(n.name), n.op) for n in ours.graph.nodes if n.name not in scalar_ops]
    assert sorted(our_layers) == sorted(keras_layers)
    assert ours.count_params() == reference.count_params()
    assert ours.shapes[ours.graph.outputs[0]] == tuple(reference.output_shape)

    rng = np.random.default_rng(0)
    _perturb_batchnorm(reference, rng)
    for name, weights in _keras_weights_by_name(reference).items():
        node = ours.graph.node(name)
        assert {k: v.shape for k, v in node.weights.items()} == {k: v.shape for k, v in weights.items()}, name
        node.weights = {k: np.asarray(v, np.float32) for k, v in weights.items()}
    shape = tuple(d for d in kwargs["input_shape"])
    x = rng.uniform(-1, 1, (2, *shape)).astype(np.float32)
    if family.startswith("MobileNetV3") and kwargs.get("include_preprocessing", True):
        x = (x + 1) * 127.5
    expected = reference.predict(x, verbose=0)
    got = ours.predict(x)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * max(1.0, float(np.abs(expected).max())))


def test_unknown_input_size_keeps_keras_names_and_runs_any_size():
    model = applications.MobileNetV2(weights=None, include_top=False, alpha=0.35)
    reference = keras.applications.MobileNetV2(weights=None, include_top=False, alpha=0.35)
    assert model.name == reference.name
    assert model.input_shape == tuple(reference.input_shape)
    x = np.zeros((1, 65, 80, 3), np.float32)  # correct_pad assumed an even size; Keras pads the same way
    assert model.predict(x).shape == reference.predict(x, verbose=0).shape


@pytest.mark.parametrize(
    "call",
    [
        lambda: applications.MobileNetV2(weights=None, input_shape=(31, 64, 3)),
        lambda: applications.MobileNetV2(weights="imagenet", classes=10),
        lambda: applications.MobileNet(weights="imagenet", alpha=0.3, include_top=False),
        lambda: applications.MobileNetV3Small(weights="imagenet", alpha=0.5),
    ],
    ids=["too-small", "imagenet-classes", "imagenet-alpha-v1", "imagenet-alpha-v3"],
)
def test_invalid_arguments_fail_with_our_error(call):
    with pytest.raises(NpmobileError):
        call()
