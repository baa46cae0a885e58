"""Readers on real Keras files: what they read equals what Keras holds, and broken files fail with
npmobile's own errors, in one line that names the file."""

from __future__ import annotations

import io
import json
import zipfile

import h5py
import numpy as np
import pytest

import npmobile
from npmobile import applications
from npmobile.errors import ModelFileError, UnsupportedLayerError, WeightsError
from npmobile.io import read_model, read_weights
from npmobile.io.variables import variable_order

V3 = dict(input_shape=(96, 96, 3))


def _keras_weights(model) -> dict[str, list[np.ndarray]]:
    out = {}
    for layer in model.layers:
        if hasattr(layer, "layers"):
            out.update(_keras_weights(layer))
        elif layer.get_weights():
            out[layer.name] = layer.get_weights()
    return out


def _spec_weights(spec) -> dict[str, dict[str, np.ndarray]]:
    out = dict(spec.weights)
    for layer in spec.layers:
        if layer.submodel is not None:
            out.update(_spec_weights(layer.submodel))
    return out


@pytest.mark.parametrize("writer", ["keras3_h5", "keras3_keras", "tfkeras_h5"])
@pytest.mark.parametrize("family", ["MobileNetV3Small", "nested"])
def test_every_weight_read_equals_keras_by_layer_name(keras_files, family, writer):
    kwargs = V3 if family != "nested" else dict(input_shape=(96, 96, 3), alpha=0.35)
    case = keras_files.get(family, writer, **kwargs)
    spec = read_model(case.path)
    ours = _spec_weights(spec)
    theirs = _keras_weights(case.keras_model)
    assert set(ours) == set(theirs)
    for name, arrays in theirs.items():
        layer_class = type(next(la for la in _all(case.keras_model) if la.name == name)).__name__
        order = variable_order(layer_class, next(la for la in _all(case.keras_model) if la.name == name).get_config())
        assert list(ours[name]) == order, name
        for var, array in zip(order, arrays):
            np.testing.assert_array_equal(ours[name][var], array, err_msg=f"{name}/{var}")


def _all(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _all(layer)


def test_keras2_scalar_ops_and_keras3_op_nodes_normalize_to_the_same_form(keras_files):
    tf_spec = read_model(keras_files.get("MobileNetV3Small", "tfkeras_h5", **V3).path)
    k3_spec = read_model(keras_files.get("MobileNetV3Small", "keras3_h5", **V3).path)
    for spec in (tf_spec, k3_spec):
        scalar_adds = [la for la in spec.layers if la.class_name == "Add"
                       and any(isinstance(a, float) for a in la.inbound[0].args)]
        assert scalar_adds and all(3.0 in la.inbound[0].args for la in scalar_adds)
        assert not [la for la in spec.layers if la.class_name == "TFOpLambda"]
    assert tf_spec.keras_version == 2 and k3_spec.keras_version == 3


def test_official_layout_binds_by_order_where_names_differ(keras_files):
    case = keras_files.get("MobileNetV3Small", "official_h5", **V3)
    stored = [layer.name for layer in read_weights(case.path).layers if layer.variables]
    assert "Conv/BatchNorm" in stored and "expanded_conv/squeeze_excite/Conv" in stored
    model = case.load()
    np.testing.assert_array_equal(model.graph.node("conv_bn").weights["gamma"],
                                  case.keras_model.get_layer("Conv/BatchNorm").get_weights()[0])


def test_chunked_layer_names_attribute_is_read(keras_files, tmp_path):
    case = keras_files.get("MobileNetV2", "official_h5", input_shape=(96, 96, 3), alpha=0.35)
    chunked = tmp_path / "chunked.h5"
    with h5py.File(case.path, "r") as src, h5py.File(chunked, "w") as dst:
        for key in src:
            src.copy(src[key], dst, key)
        names = list(src.attrs["layer_names"])
        half = len(names) // 2
        dst.attrs["layer_names0"] = names[:half]  # as Keras splits attributes over HDF5's size limit
        dst.attrs["layer_names1"] = names[half:]
        for key in ("backend", "keras_version"):
            dst.attrs[key] = src.attrs[key]
    model = applications.MobileNetV2(weights=str(chunked), **case.kwargs)
    np.testing.assert_allclose(model.predict(case.x), case.y, atol=5e-5)


def test_weights_only_file_given_to_load_model_says_what_to_do(keras_files):
    case = keras_files.get("MobileNetV2", "official_h5", input_shape=(96, 96, 3), alpha=0.35)
    with pytest.raises(ModelFileError, match="weights only.*architecture"):
        npmobile.load_model(case.path)


def test_weights_for_another_width_fail_naming_the_file(keras_files):
    case = keras_files.get("MobileNetV2", "official_h5", input_shape=(96, 96, 3), alpha=0.35)
    with pytest.raises((WeightsError, ModelFileError), match=str(case.path.name)):
        applications.MobileNetV2(weights=str(case.path), input_shape=(96, 96, 3), alpha=0.5)


def _one_line(error: Exception) -> str:
    message = str(error)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "content,expected",
    [
        (b"", "empty"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(100), "not a Keras file"),
        (b"\x89HDF\r\n\x1a\n" + bytes(64), "corrupt or truncated"),
        (b"PK\x03\x04" + bytes(64), "corrupt"),
    ],
    ids=["empty", "jpeg-named-h5", "truncated-hdf5", "truncated-zip"],
)
def test_wrong_or_broken_files_raise_our_error(tmp_path, content, expected):
    path = tmp_path / "model.h5"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match=expected) as info:
        npmobile.load_model(path)
    assert str(path) in _one_line(info.value)


def test_truncated_real_file_fails_cleanly(keras_files, tmp_path):
    data = keras_files.get("MobileNetV3Small", "keras3_h5", **V3).path.read_bytes()
    path = tmp_path / "half.h5"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError) as info:
        npmobile.load_model(path)
    _one_line(info.value)


def _rewrite_keras_zip(source, target, edit_config=None, extra_member=None):
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "config.json" and edit_config is not None:
                data = json.dumps(edit_config(json.loads(data))).encode()
            dst.writestr(info.filename, data)
        if extra_member is not None:
            dst.writestr(extra_member, b"x")


def test_keras_zip_with_path_escaping_member_is_refused(keras_files, tmp_path):
    source = keras_files.get("MobileNetV3Small", "keras3_keras", **V3).path
    evil = tmp_path / "evil.keras"
    _rewrite_keras_zip(source, evil, extra_member="../evil.txt")
    with pytest.raises(ModelFileError, match="unsafe path"):
        npmobile.load_model(evil)


def test_lambda_layer_in_a_real_file_is_refused(tmp_path):
    import keras

    inputs = keras.Input((8, 8, 3))
    outputs = keras.layers.Lambda(lambda t: t * 2.0, name="double")(inputs)
    path = tmp_path / "lambda.h5"
    keras.Model(inputs, outputs).save(path)
    with pytest.raises(UnsupportedLayerError, match="'double' is a Lambda layer.*never executes code"):
        npmobile.load_model(path)


def test_unknown_layer_class_in_a_real_file_names_it(keras_files, tmp_path):
    source = keras_files.get("MobileNetV3Small", "keras3_keras", **V3).path

    def rename(config):
        for layer in config["config"]["layers"]:
            if layer["name"] == "conv_1_bn":
                layer["class_name"] = "LayerNormalization"
        return config

    target = tmp_path / "unknown.keras"
    _rewrite_keras_zip(source, target, edit_config=rename)
    with pytest.raises(UnsupportedLayerError, match="'conv_1_bn' has class 'LayerNormalization'"):
        npmobile.load_model(target)


def test_missing_weight_dataset_names_the_layer(keras_files, tmp_path):
    source = keras_files.get("MobileNetV2", "keras3_h5", input_shape=(96, 96, 3), alpha=0.35).path
    target = tmp_path / "missing.h5"
    target.write_bytes(source.read_bytes())
    with h5py.File(target, "r+") as f:
        del f["model_weights/block_3_project/block_3_project/kernel"]
    with pytest.raises(ModelFileError, match="block_3_project"):
        npmobile.load_model(target)


def test_read_model_works_from_bytes_in_memory_for_keras_zips(keras_files):
    # .keras weights are read from memory, never extracted next to the file.
    path = keras_files.get("MobileNetV3Small", "keras3_keras", **V3).path
    before = set(path.parent.iterdir())
    read_model(path)
    assert set(path.parent.iterdir()) == before
    assert zipfile.is_zipfile(io.BytesIO(path.read_bytes()))
