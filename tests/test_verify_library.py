"""``npmobile.verify`` called from Python: a function of keyword arguments returning a VerifyReport (per-layer rows,
the verdict, the exit status it means), the same object ``npmobile verify --json`` prints, read back from JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest

from npmobile.verify import (
    EXIT_BEYOND,
    EXIT_OK,
    FEATURE_RTOL,
    PROBABILITY_ATOL,
    Difference,
    LayerRow,
    Side,
    UsageProblem,
    VerifyReport,
    verify,
)


@pytest.fixture(scope="module")
def small_v2(keras_files):
    return keras_files.get("MobileNetV2", "keras3_keras", input_shape=(96, 96, 3), alpha=0.35)


def test_a_keras_written_file_verifies_from_python(small_v2):
    report = verify(small_v2.path, samples=1, seed=3)
    assert isinstance(report, VerifyReport) and report.reference == "Keras"
    assert report.ok and report.exit_status == EXIT_OK and report.first_layer_beyond_tolerance is None
    assert report.inputs.startswith("1 random input(s) (96, 96, 3)") and "seed 3" in report.inputs
    assert len(report.layers) > 50 and all(isinstance(row, LayerRow) for row in report.layers)
    assert report.layers[-1].name == "predictions"
    assert all(row.versus.ok and row.versus.max_abs <= row.versus.tolerance for row in report.layers)
    assert report.final.versus.ok and report.final.top5_agree == "yes"
    assert report.final.versus.tolerance == PROBABILITY_ATOL  # a softmax output: the probability tolerance
    assert set(report.float64) == {"npmobile", "Keras"}


def test_the_report_round_trips_through_json(small_v2):
    report = verify(small_v2.path, samples=1)
    data = json.loads(json.dumps(report.as_dict()))
    assert data["ok"] is True and data["first_layer_beyond_tolerance"] is None
    again = VerifyReport.from_dict(data)
    assert again.as_dict() == data and again.ok == report.ok and again.exit_status == report.exit_status
    assert [row.name for row in again.layers] == [row.name for row in report.layers]


def test_an_altered_weight_makes_the_verdict_beyond(small_v2, monkeypatch):
    import npmobile

    load = npmobile.load_model

    def altered(path, **options):
        model = load(path, **options)
        model.graph.node("block_3_depthwise").weights["depthwise_kernel"][1, 1, 0, 0] += 0.05
        return model

    monkeypatch.setattr(npmobile, "load_model", altered)
    report = verify(small_v2.path, samples=1, without_keras=True)
    assert report.reference == "npmobile reference" and "--without-keras" in report.reference_detail
    # The reference path runs the same altered weights: only the fast path's own arithmetic is compared.
    assert report.ok

    report = verify(small_v2.path, samples=1)
    assert not report.ok and report.exit_status == EXIT_BEYOND
    assert report.first_layer_beyond_tolerance == "block_3_depthwise"
    bad = next(row for row in report.layers if row.name == "block_3_depthwise")
    assert bad.versus.max_abs > bad.versus.tolerance


def test_options_that_cannot_be_used_raise_usage_problem(small_v2, tmp_path):
    with pytest.raises(UsageProblem, match="no such file"):
        verify(tmp_path / "missing.keras")
    with pytest.raises(UsageProblem, match="--torch-model is for"):
        verify(small_v2.path, torch_model="net.py:build")
    with pytest.raises(UsageProblem, match="no such file"):
        verify(small_v2.path, [tmp_path / "missing.jpg"])


def test_the_tolerances_are_the_parity_tolerances():
    probabilities = np.array([[0.7, 0.2, 0.1]])
    within, beyond = Difference(), Difference()
    within.add(probabilities + [[PROBABILITY_ATOL / 2, 0, 0]], probabilities)
    beyond.add(probabilities + [[PROBABILITY_ATOL * 2, 0, 0]], probabilities)
    assert within.ok and not beyond.ok and within.tolerance == PROBABILITY_ATOL
    features = np.full((1, 4, 4, 2), 10.0)
    relative = Difference()
    relative.add(features + 0.5 * FEATURE_RTOL * 10, features)
    assert relative.ok and relative.tolerance == pytest.approx(FEATURE_RTOL * 10)


def test_each_side_follows_the_protocol(small_v2):
    import npmobile
    from npmobile.verify.sides import NpmobileReference

    side = NpmobileReference(npmobile.load_model(small_v2.path), "a test")
    assert isinstance(side, Side)
    names = [name for name, _ in side.layers()][:2]
    x = np.zeros((1, 96, 96, 3), np.float32)
    assert set(side.predict_layers(x, names)) == set(names) and side.predict(x).shape == (1, 1000)
