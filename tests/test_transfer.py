"""The model TensorFlow's "Transfer learning and fine-tuning" tutorial writes (augmentation in a nested
Sequential, preprocess_input on the input tensor, the base called with training=False, a Dense(1) logit
head), and its cousins, written by Keras 3 (.keras, .h5) and tf_keras (.h5): they load, answer as
Keras's predict does, run the preprocessing once, and classify/verify work on them (issue 24)."""

from __future__ import annotations

import importlib
import io
import json
import shutil
import zipfile

import h5py
import numpy as np
import pytest
from test_cli import PHOTOS, run_cli
from test_parity import assert_bit_close
from tutorial_models import TRANSFER_MODELS, TRANSFER_WRITERS

import npmobile
from npmobile.errors import UnsupportedLayerError
from npmobile.opening import binary_head, carries_preprocessing, preprocess_for, two_class_probabilities

IDENTITY_OPS = {"Dropout", "RandomFlip", "RandomRotation", "RandomZoom", "RandomContrast", "RandomTranslation",
                "RandomBrightness", "Cast"}


@pytest.mark.parametrize("writer", TRANSFER_WRITERS)
@pytest.mark.parametrize("kind", TRANSFER_MODELS)
def test_transfer_model_matches_keras(transfer_models, kind, writer):
    case = transfer_models(kind, writer)
    model = npmobile.load_model(case.path)
    assert_bit_close(model.predict(case.x), case.y, f"{kind} {writer}")
    assert preprocess_for(model) == "none"  # the model maps its own pixels: never a second time
    assert binary_head(model) == "logits"


def test_tutorial_graph_has_its_augmentation_and_preprocessing(transfer_models):
    keras3 = npmobile.load_model(transfer_models("tutorial", "keras3_keras").path)
    ops = [n.op for n in keras3.graph.nodes[:6]]
    assert ops == ["InputLayer", "RandomFlip", "RandomRotation", "TrueDivide", "Subtract", "Conv2D"]
    tf_keras = npmobile.load_model(transfer_models("tutorial", "tfkeras_h5").path)
    assert [n.op for n in tf_keras.graph.nodes[3:5]] == ["TrueDivide", "Subtract"]  # math.truediv, math.subtract
    assert tf_keras.graph.nodes[3].inputs[1] == 127.5 and tf_keras.graph.nodes[4].inputs[1] == 1.0


@pytest.mark.parametrize("writer", TRANSFER_WRITERS)
def test_optimized_tutorial_has_no_identities_and_its_preprocessing_is_in_the_stem(transfer_models, writer):
    """The augmentation and Dropout vanish; ``x / 127.5 - 1``, which Keras's predict computes as
    x * float32(1 / 127.5) - 1, is exactly a Rescaling: the stem convolution reads it."""
    case = transfer_models("tutorial", writer)
    model = npmobile.load_model(case.path)
    plan = model.optimized_graph()
    assert not {n.op for n in plan.nodes} & IDENTITY_OPS
    assert [n.op for n in plan.nodes[:2]] == ["InputLayer", "Conv2D"]
    stem = plan.nodes[1]
    assert stem.config["input_scale"] == float(np.float32(1) / np.float32(127.5)) and stem.config["input_offset"] == -1
    assert [n.op for n in model.graph.nodes[3:5]] == ["TrueDivide", "Subtract"]
    # The stem's output, with the preprocessing folded in and with it run on its own: the same bits.
    subtract = model.graph.nodes[4].name
    folded = model.predict(case.x, outputs=["Conv1"])["Conv1"]
    np.testing.assert_array_equal(folded, model.predict(case.x, outputs=["Conv1", subtract])["Conv1"])


@pytest.mark.parametrize("framework", ["keras", "tf_keras"])
def test_constant_scaling_folds_into_the_stem_exactly(tmp_path, framework):
    """``x / 128 - 1``, ``(x - 127) * 0.5`` and the division of ``(-x) / 127.5`` are exactly Rescaling's
    x * s + o (as Keras's predict computes a division by a constant): the stem reads them. ``1 - x`` stays."""
    keras = importlib.import_module(framework)
    inputs = keras.Input((20, 24, 3))
    a = keras.layers.Conv2D(4, 3, strides=2, padding="same", name="stem_a")(inputs / 128.0 - 1.0)
    b = keras.layers.Conv2D(4, 3, padding="valid", name="stem_b")((inputs - 127.0) * 0.5)
    c = keras.layers.Conv2D(4, 1, name="stem_c")(1.0 - inputs)  # constant first: stays an op
    d = keras.layers.Conv2D(4, 3, name="stem_d")((-inputs) / 127.5)
    outputs = keras.layers.Concatenate()([keras.layers.GlobalAveragePooling2D()(t) for t in (a, b, c, d)])
    model = keras.Model(inputs, outputs)
    path = tmp_path / ("ops.keras" if framework == "keras" else "ops.h5")
    model.save(str(path))
    got = npmobile.load_model(path)
    plan = got.optimized_graph()
    assert plan.node("stem_a").config["input_scale"] == 1 / 128 and plan.node("stem_a").config["input_offset"] == -1
    assert plan.node("stem_b").config["input_scale"] == 0.5
    assert "input_scale" not in plan.node("stem_c").config
    assert plan.node("stem_d").config["input_scale"] == float(np.float32(1) / np.float32(127.5))  # after -x
    x = np.random.default_rng(2).uniform(0, 255, (2, 20, 24, 3)).astype(np.float32)
    every_layer = [n.name for n in got.graph.nodes if n.op != "InputLayer"]
    np.testing.assert_array_equal(got.predict(x), got.predict(x, outputs=every_layer)[got.graph.outputs[0]])
    assert_bit_close(got.predict(x), model.predict(x, verbose=0), f"constant ops {framework}")


def _groups_named(f: h5py.File, names: tuple[str, ...]) -> list[str]:
    found: list[str] = []
    f.visit(lambda path: found.append(path) if path.rsplit("/", 1)[-1] in names else None)
    return found


def test_seed_generator_state_does_not_trip_weight_binding(transfer_models, tmp_path):
    """Keras 3 versions store a random layer's seed-generator state as its variable; it is no weight of the
    layer at inference, so binding ignores it."""
    case = transfer_models("tutorial", "keras3_keras")
    path = tmp_path / "seeded.keras"
    with zipfile.ZipFile(case.path) as source, zipfile.ZipFile(path, "w") as target:
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename == "model.weights.h5":
                buffer = io.BytesIO(data)
                with h5py.File(buffer, "r+") as f:
                    found = _groups_named(f, ("random_flip", "random_rotation"))
                    assert len(found) == 2, found
                    for layer in found:
                        group = f[layer]
                        group.require_group("vars").create_dataset("0", data=np.array([1, 42], np.uint32))
                        group.require_group("seed_generator/vars").create_dataset("0", data=np.array([0, 7]))
                data = buffer.getvalue()
            target.writestr(item, data)
    assert_bit_close(npmobile.load_model(path).predict(case.x), case.y, "seed state")


def test_plain_mobilenets_still_get_tf_preprocessing():
    from npmobile import applications

    v2 = applications.MobileNetV2(weights=None, input_shape=(64, 64, 3), alpha=0.35)
    v3 = applications.MobileNetV3Small(weights=None, input_shape=(64, 64, 3))
    assert (preprocess_for(v2), preprocess_for(v3)) == ("tf", "none")
    assert not carries_preprocessing(v2.graph) and binary_head(v2) is None


def _applications_modules(keras) -> list[str]:
    return sorted(name for name in dir(keras.applications)
                  if hasattr(getattr(keras.applications, name), "preprocess_input") and name != "imagenet_utils")


@pytest.mark.parametrize("framework", ["keras", "tf_keras"])
def test_every_preprocess_input_loads(tmp_path, framework):
    """Each keras.applications family's preprocess_input, called on the input tensor, loads and matches Keras:
    'tf' and 'torch' modes, the identity (V3, EfficientNet, ConvNeXt) and 'caffe' mode's RGB -> BGR flip and
    mean subtraction (ResNet50, VGG)."""
    keras = importlib.import_module(framework)
    x = np.random.default_rng(6).uniform(0, 255, (2, 12, 14, 3)).astype(np.float32)
    modules = _applications_modules(keras)
    assert {"mobilenet", "mobilenet_v2", "densenet", "resnet50", "vgg16"} <= set(modules)
    for name in modules:
        inputs = keras.Input((12, 14, 3))
        y = getattr(keras.applications, name).preprocess_input(inputs)
        model = keras.Model(inputs, keras.layers.Conv2D(4, 3, name="conv")(y))
        path = tmp_path / f"{name}.h5"
        model.save(str(path))
        got = npmobile.load_model(path)
        assert_bit_close(got.predict(x), model.predict(x, verbose=0), f"{framework} {name}.preprocess_input")
        if name in ("resnet50", "vgg16"):
            assert {"ReverseChannels"} <= {n.op for n in got.graph.nodes} or \
                {"GetItem", "Stack"} <= {n.op for n in got.graph.nodes}
            assert preprocess_for(got) == "none"


def test_other_indexing_is_refused_by_name(tmp_path):
    import keras

    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Conv2D(2, 1)(inputs[:, 1:]))
    model.save(str(tmp_path / "slice.keras"))
    with pytest.raises(UnsupportedLayerError, match="GetItem"):
        npmobile.load_model(tmp_path / "slice.keras")


def test_lambda_refusal_says_what_to_use_instead(tmp_path):
    import tf_keras

    inputs = tf_keras.Input((8, 8, 3))
    y = tf_keras.layers.Lambda(lambda t: t / 127.5 - 1)(inputs)
    model = tf_keras.Model(inputs, tf_keras.layers.Conv2D(2, 3)(y))
    model.save(str(tmp_path / "lambda.h5"))
    with pytest.raises(UnsupportedLayerError, match=r"Lambda.*Rescaling\(1/127.5, offset=-1\)"):
        npmobile.load_model(tmp_path / "lambda.h5")


def test_classify_prints_the_probability_keras_gives(transfer_models, tmp_path):
    """The tutorial's model on a photo: keras.utils.load_img, the model's own preprocessing, the sigmoid of
    Keras's logit; npmobile shows it as class 1's probability and 1 - it as class 0's."""
    import keras

    case = transfer_models("tutorial", "keras3_keras")
    size = case.x.shape[1:3]
    image = keras.utils.img_to_array(keras.utils.load_img(PHOTOS[0], target_size=size))[None]
    logit = float(np.asarray(case.keras_model.predict(image, verbose=0)).ravel()[0])
    expected = 1.0 / (1.0 + np.exp(-logit))
    labels = tmp_path / "labels.txt"
    labels.write_text("cats\ndogs\n")
    result = run_cli("classify", str(PHOTOS[0]), "--weights", str(case.path), "--labels", str(labels), "--json")
    assert result.returncode == 0, result.stderr
    top = {entry["label"]: entry["probability"] for entry in json.loads(result.stdout)[0]["top"]}
    assert set(top) == {"cats", "dogs"}
    assert abs(top["dogs"] - expected) < 1e-4 * max(1.0, abs(logit)) and abs(top["cats"] + top["dogs"] - 1) < 1e-6
    text = run_cli("classify", str(PHOTOS[0]), "--weights", str(case.path))
    assert text.returncode == 0 and f"{expected:.4f}"[:5] in text.stdout.replace(f"{1 - expected:.4f}", "")


@pytest.mark.parametrize("writer", TRANSFER_WRITERS)
@pytest.mark.parametrize("kind", TRANSFER_MODELS)
def test_verify_passes_on_transfer_models(transfer_models, kind, writer, tmp_path):
    case = transfer_models(kind, writer)
    path = tmp_path / case.path.name
    shutil.copyfile(case.path, path)
    result = run_cli("verify", str(path), "--json")
    assert result.returncode == 0, result.stderr + result.stdout[-2000:]
    report = json.loads(result.stdout)
    size = "(224, 224, 3)" if kind == "resize_normalize" else "(96, 96, 3)"  # any size: verify's default
    assert report["ok"] and report["inputs"].startswith(f"2 random input(s) {size} in 0..255")
    if writer == "keras3_h5" and kind != "resize_normalize":  # op nodes (preprocess_input, V3's hard-swish),
        # which Keras 3 cannot load back from its own .h5: verify said what it did
        assert any("op nodes" in note for note in report["notes"])


def test_verify_passes_on_keras3_mobilenet_v3_h5(keras_files):
    """Keras 3.15 cannot load the .h5 it writes for MobileNetV3 ("Only input tensors may be passed as
    positional arguments"); verify rebuilds it for Keras from the file and compares."""
    import keras

    case = keras_files.get("MobileNetV3Small", "keras3_h5", input_shape=(96, 96, 3), alpha=0.75)
    with pytest.raises(ValueError):
        keras.saving.load_model(case.path)
    result = run_cli("verify", str(case.path), "--json")
    assert result.returncode == 0, result.stderr + result.stdout[-2000:]
    assert json.loads(result.stdout)["ok"]


def test_a_sigmoid_head_is_shown_as_it_is(tmp_path):
    import keras

    inputs = keras.Input((16, 16, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x))
    model.save(str(tmp_path / "sigmoid.keras"))
    got = npmobile.load_model(tmp_path / "sigmoid.keras")
    x = np.random.default_rng(0).uniform(0, 255, (3, 16, 16, 3)).astype(np.float32)
    p = got.predict(x)
    assert binary_head(got) == "probability"
    np.testing.assert_allclose(two_class_probabilities(got, p), np.concatenate([1 - p, p], axis=1), atol=1e-7)


@pytest.mark.parametrize("framework,suffix", [("keras", ".keras"), ("keras", ".h5"), ("tf_keras", ".h5")])
def test_elementwise_ops_with_constants_match_keras(tmp_path, framework, suffix):
    """Op nodes / TFOpLambda arithmetic: casts to float32, negation, division either way, subtraction from a
    constant, a per-channel vector; each one float32 operation, as Keras computes it."""
    keras = importlib.import_module(framework)
    inputs = keras.Input((10, 12, 3))
    if framework == "keras":
        ops = keras.ops
        x = ops.cast(inputs, "float32")
        x = ops.divide(ops.negative(x) - 3.0, 7.0)
    else:
        import tensorflow as tf

        x = tf.cast(inputs, "float32")
        x = tf.math.divide(tf.math.negative(x) - 3.0, 7.0)
    x = 255.0 / (x - 0.5)
    x = (1.0 - x) * np.array([0.25, -2.0, 3.0], np.float32) + np.array([1.0, 2.0, 3.0], np.float32)
    model = keras.Model(inputs, keras.layers.Conv2D(2, 3, name="conv")(x))
    path = tmp_path / f"ops{suffix}"
    model.save(str(path))
    got = npmobile.load_model(path)
    assert {"Cast", "Negative", "TrueDivide", "Subtract"} <= {n.op for n in got.graph.nodes}
    assert "Cast" not in {n.op for n in got.optimized_graph().nodes}
    x = np.random.default_rng(8).uniform(1, 255, (2, 10, 12, 3)).astype(np.float32)
    expected = model.predict(x, verbose=0)
    assert_bit_close(got.predict(x), expected, f"elementwise ops {framework}{suffix}")
    assert_bit_close(got.predict(x, reference=True), expected, "reference path")
    probe = keras.Model(model.inputs, model.get_layer("conv").input)  # the preprocessed image itself
    np.testing.assert_array_equal(got.predict(x, outputs=[got.graph.node("conv").inputs[0]])[
        got.graph.node("conv").inputs[0]], probe.predict(x, verbose=0))
