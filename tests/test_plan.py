"""The plan binds each step to its buffers once (npmobile/plan.py, kernels/entry.py): what that must not change."""

from __future__ import annotations

import dataclasses
import functools
import gc
import weakref

import numpy as np
import pytest

from npmobile import applications
from npmobile.errors import ModelFileError
from npmobile.kernels import reference as ref
from npmobile.kernels.activations import ACT_RELU6
from npmobile.kernels.entry import in_order
from npmobile.kernels.pointwise import pointwise_conv2d, prepare_weights
from npmobile.ops import LAYER_TYPES


def _model():
    model = applications.MobileNetV3Small(weights=None, input_shape=(32, 40, 3))
    rng = np.random.default_rng(0)
    for node in model.graph.nodes:  # non-trivial BatchNorm statistics, as everywhere in the tests
        if node.op == "BatchNormalization":
            c = node.weights["gamma"].shape[0]
            node.weights["moving_mean"] = rng.normal(0, 0.2, c).astype(np.float32)
            node.weights["moving_variance"] = rng.uniform(0.5, 2.0, c).astype(np.float32)
    return model


def _images(seed: int, n: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, 32, 40, 3)).astype(np.float32)


def test_each_run_reads_the_arrays_it_is_given_now():
    model = _model()
    x1, x2 = _images(1), _images(2)
    first = model.predict(x1)
    second = model.predict(x2)
    np.testing.assert_allclose(second, model.predict(x2, reference=True), rtol=0, atol=2e-6)
    np.testing.assert_array_equal(model.predict(x1), first)  # the same input, the same bits
    # The same array object, new values: the bound steps read the values, not a copy made earlier.
    x = x1.copy()
    model.predict(x)
    x[...] = x2
    np.testing.assert_array_equal(model.predict(x), second)
    # Outputs are copies: the next run does not overwrite an answer already returned.
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(model.predict(x1), first)


def test_intermediate_outputs_and_batches_of_other_sizes_use_plans_of_their_own():
    model = _model()
    x = _images(3, n=3)
    whole = model.predict(x)
    for size in (1, 2):
        np.testing.assert_array_equal(model.predict(x, batch_size=size), whole)
    name = "expanded_conv_depthwise"
    maps = model.predict(x, outputs=[name])[name]
    np.testing.assert_allclose(maps, model.predict(x, outputs=[name], reference=True)[name], rtol=0,
                               atol=2e-5 * max(1.0, float(np.abs(maps).max())))


def test_a_run_lets_go_of_the_callers_arrays():
    model = _model()
    x = _images(4)
    model.predict(x)
    alive = weakref.ref(x)
    del x
    gc.collect()
    assert alive() is None


def _bound_plan(model):
    return next(iter(model._runners[None].plans.values()))


@pytest.mark.parametrize("family", ["MobileNetV3Small", "MobileNetV2"])
def test_the_steps_that_read_the_input_are_bound_once_and_given_each_input(family):
    """V3's stem rescales its input (an indirect product reading a rescaled copy), V2's reads it as it is."""
    model = getattr(applications, family)(weights=None, input_shape=(32, 40, 3))
    x1, x2 = _images(1), _images(2)
    model.predict(x1)
    second = model.predict(x2)
    bound = _bound_plan(model)
    assert bound.feed_steps and all(bound.rebinders[k] is not None for k in bound.feed_steps)  # the quick way
    np.testing.assert_array_equal(type(model)(model.graph).predict(x2), second)  # bound from scratch
    read_only = x2.copy()
    read_only.flags.writeable = False  # another kind of array: another kernel signature, bound as before
    np.testing.assert_array_equal(model.predict(read_only), second)
    np.testing.assert_array_equal(model.predict(x2), second)


def test_a_step_whose_binder_keeps_a_copy_of_the_input_is_bound_at_each_run(monkeypatch):
    """The first run compares the quick way's call with a fresh binding; where they differ, the step is bound
    at every run as before."""
    original = LAYER_TYPES["Conv2D"]
    kept = []

    def prepare(node, in_shapes, out_shape, keras_version):
        bind = original.prepare(node, in_shapes, out_shape, keras_version)

        def bind_keeping_a_copy(args, out):
            kept.append(args[0].copy())  # something made from the input at binding
            return in_order(functools.partial(np.copyto, np.empty_like(kept[-1]), kept[-1]), bind(args, out))

        return bind_keeping_a_copy

    monkeypatch.setitem(LAYER_TYPES, "Conv2D", dataclasses.replace(original, prepare=prepare))
    model = _model()
    x1, x2 = _images(1), _images(2)
    model.predict(x1)
    second = model.predict(x2)
    bound = _bound_plan(model)
    assert bound.feed_steps and all(bound.rebinders[k] is None for k in bound.feed_steps)
    np.testing.assert_array_equal(kept[-1], x2)
    monkeypatch.setitem(LAYER_TYPES, "Conv2D", original)
    np.testing.assert_array_equal(_model().predict(x2), second)


def _failing_depthwise(at: str):
    """The depthwise record with a fast path that raises when bound (``at="bind"``) or when run."""

    def prepare(node, in_shapes, out_shape, keras_version):
        def bind(args, out):
            if at == "bind":
                raise ValueError("shapes do not fit")

            def call():
                raise ValueError("shapes do not fit")

            return call

        return bind

    return dataclasses.replace(LAYER_TYPES["DepthwiseConv2D"], prepare=prepare)


@pytest.mark.parametrize("at", ["bind", "run"])
def test_a_kernel_error_is_reported_naming_the_layer(monkeypatch, at):
    monkeypatch.setitem(LAYER_TYPES, "DepthwiseConv2D", _failing_depthwise(at))
    model = _model()
    with pytest.raises(ModelFileError, match=r"layer 'expanded_conv_depthwise' \(DepthwiseConv2D\) cannot run: "
                                             r"ValueError: shapes do not fit"):
        model.predict(_images(5))


def test_a_bound_kernel_call_reads_its_arrays_when_called():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, 5, 7, 24)).astype(np.float32)
    kernel = rng.normal(size=(24, 40)).astype(np.float32)
    bias = rng.normal(size=40).astype(np.float32)
    out = np.empty((2, 5, 7, 40), np.float32)
    call = pointwise_conv2d.bind(x, prepare_weights(kernel, bias, 70), bias, out, ACT_RELU6)
    for seed in (7, 8):
        x[...] = np.random.default_rng(seed).normal(size=x.shape)
        call()
        expected = np.clip(ref.pointwise_conv2d(x, kernel, bias), 0, 6)
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)


def test_a_bound_kernel_call_checks_its_arrays_once_when_bound():
    x = np.zeros((1, 4, 4, 8), np.float32)
    with pytest.raises(ValueError, match="shapes do not fit"):
        pointwise_conv2d.bind(x, prepare_weights(np.zeros((8, 16), np.float32), np.zeros(16, np.float32), 16),
                              None, np.empty((1, 4, 4, 15), np.float32))


def test_a_stem_whose_pixels_suit_7_row_tiles_runs_on_a_tile_the_indirect_product_has():
    """113 x 113 output pixels: choose_tile picks the 7-row tile, which the indirect GEMM is not built
    with; the stem's weights are packed for the 8x32 tile instead (same bits)."""
    from npmobile.kernels import gemm_rules

    assert gemm_rules.choose_tile(113 * 113, 32, avx512=True) == gemm_rules.AVX512_7X32
    model = applications.MobileNetV2(weights=None, input_shape=(226, 226, 3), include_top=False, alpha=0.35)
    x = np.random.default_rng(9).uniform(-1, 1, (1, 226, 226, 3)).astype(np.float32)
    stem = model.predict(x, outputs=["Conv1"])["Conv1"]
    np.testing.assert_allclose(stem, model.predict(x, outputs=["Conv1"], reference=True)["Conv1"], rtol=0, atol=1e-5)


def test_a_reshape_is_a_view_of_its_input_not_a_step():
    """Reshape and Flatten (``view=True`` records) share their input's buffer: no step runs for them."""
    model = applications.MobileNet(weights=None, input_shape=(32, 32, 3))
    x = np.random.default_rng(4).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    probabilities = model.predict(x)
    np.testing.assert_allclose(probabilities, model.predict(x, reference=True), rtol=0, atol=2e-6)
    plan = next(iter(model._runners[None].plans.values())).plan
    assert "Reshape" not in [step.node.op for step in plan.steps]
    # Asked for both, the reshape and what it reshapes come back right (and as copies of their own).
    wanted = ["conv_preds", "reshape_2"]
    got = model.predict(x, outputs=wanted)
    want = model.predict(x, outputs=wanted, reference=True)
    for name in wanted:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=2e-6)
    np.testing.assert_array_equal(got["reshape_2"], got["conv_preds"].reshape(2, -1))
    assert not np.shares_memory(got["reshape_2"], got["conv_preds"])
    np.testing.assert_array_equal(model.predict(x), probabilities)
