"""decode_predictions gives Keras's output, from labels shipped in the package (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from npmobile.applications import mobilenet_v2, mobilenet_v3
from npmobile.applications.imagenet_utils import class_index, decode_predictions
from npmobile.errors import NpmobileError

SHARED_INDEX = Path(__file__).resolve().parents[1] / "npmobile" / "data" / "imagenet_class_index.json"


def test_decode_matches_keras(monkeypatch):
    # Keras downloads the class index on first use; hand it the same (byte-identical) file offline.
    import keras

    monkeypatch.setattr(keras.src.applications.imagenet_utils, "CLASS_INDEX", json.loads(SHARED_INDEX.read_text()))
    preds = np.random.default_rng(0).random((3, 1000)).astype(np.float32)
    expected = keras.applications.imagenet_utils.decode_predictions(preds, top=7)
    assert mobilenet_v2.decode_predictions(preds, top=7) == expected
    assert mobilenet_v3.decode_predictions(preds, top=7) == expected


def test_labels_ship_with_the_package():
    index = class_index()
    assert len(index) == 1000
    assert index[281] == ("n02123045", "tabby")


def test_wrong_shape_is_our_error():
    with pytest.raises(NpmobileError, match=r"shape \(samples, 1000\)"):
        decode_predictions(np.zeros((2, 10)))
