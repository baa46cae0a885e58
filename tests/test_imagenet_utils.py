"""decode_predictions gives Keras's output, from labels shipped in the package (no network)."""

from __future__ import annotations

import hashlib
import shutil
from importlib import resources

import numpy as np
import pytest

from npmobile.applications import mobilenet, mobilenet_v2, mobilenet_v3
from npmobile.applications.imagenet_utils import class_index, decode_predictions
from npmobile.errors import InputShapeError, NpmobileError

# The md5 keras.applications.imagenet_utils checks its downloaded class index against.
KERAS_CLASS_INDEX_MD5 = "c2c37ea517e94d9795004a39431a14cb"


def _packaged_index():
    return resources.files("npmobile").joinpath("data/imagenet_class_index.json")


@pytest.fixture
def offline_keras(tmp_path, monkeypatch):
    """Keras reading its class index from a private KERAS_HOME holding our packaged copy; any attempt
    to download fails the test."""
    import keras
    from keras.src.applications import imagenet_utils as keras_imagenet_utils
    from keras.src.backend import config
    from keras.src.utils import file_utils

    (tmp_path / "models").mkdir()
    with resources.as_file(_packaged_index()) as packaged:
        shutil.copyfile(packaged, tmp_path / "models" / "imagenet_class_index.json")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(config, "_KERAS_DIR", str(tmp_path))  # Keras read KERAS_HOME when it was imported
    monkeypatch.setattr(keras_imagenet_utils, "CLASS_INDEX", None)  # make it read the file again

    def no_network(*args, **kwargs):
        raise AssertionError("Keras tried to download")

    monkeypatch.setattr(file_utils, "urlretrieve", no_network)
    return keras


def test_packaged_labels_are_the_file_keras_checks_against():
    assert hashlib.md5(_packaged_index().read_bytes()).hexdigest() == KERAS_CLASS_INDEX_MD5


@pytest.mark.parametrize("top", [1, 5, 7, 1000])
def test_decode_matches_keras(offline_keras, top):
    rng = np.random.default_rng(top)
    preds = rng.random((3, 1000)).astype(np.float32)
    preds[1, 10:20] = preds[1, 10]  # ties are ordered as Keras orders them
    expected = offline_keras.applications.imagenet_utils.decode_predictions(preds, top=top)
    for module in (mobilenet, mobilenet_v2, mobilenet_v3):
        got = module.decode_predictions(preds, top=top)
        assert got == expected
        assert all(type(a[2]) is type(b[2]) for row_a, row_b in zip(got, expected) for a, b in zip(row_a, row_b))
    assert len(expected[0]) == top


def test_rows_are_sorted_most_likely_first():
    preds = np.zeros((2, 1000), np.float32)
    preds[0, [281, 285, 1]] = [0.5, 0.3, 0.2]
    preds[1, 504] = 1.0
    decoded = decode_predictions(preds, top=3)
    assert [label for _, label, _ in decoded[0]] == ["tabby", "Egyptian_cat", "goldfish"]
    assert decoded[1][0] == ("n03063599", "coffee_mug", np.float32(1.0))


def test_labels_ship_with_the_package():
    index = class_index()
    assert len(index) == 1000 and sorted(index) == list(range(1000))
    assert index[281] == ("n02123045", "tabby")


@pytest.mark.parametrize("shape", [(2, 10), (1000,), (1, 1000, 1)])
def test_wrong_shape_is_our_error_and_a_value_error(shape):
    with pytest.raises(InputShapeError, match=r"shape \(samples, 1000\)") as error:
        decode_predictions(np.zeros(shape))
    assert isinstance(error.value, NpmobileError) and isinstance(error.value, ValueError)
