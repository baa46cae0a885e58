"""MobileNets as tutorials build them: layer by layer, blocks written out by hand, activations as Python
functions (``def hard_swish(x): return x * K.relu(x + 3.0, max_value=6.0) / 6.0``). Keras writes such a function
into the file by name only, so npmobile reads these files with ``custom_objects={"hard_swish": "hard_swish"}``.

    case = tutorial_case(tmp_path, "MobileNetV3Small", "tfkeras_h5")
    npmobile.load_model(case.path, custom_objects=case.mapping).predict(case.x)   # ~ case.y

Each family is a short version of the real one (stem, a few blocks of its kind, its head) at 64x64, with
non-trivial BatchNorm statistics (keras_files.prepare), written by Keras 3 (.h5, .keras) or tf_keras
(.h5). The V3 models start with a Rescaling layer, as keras.applications' do, and take 0..255.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from keras_files import _stable_seed, prepare

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

FAMILIES = ("MobileNet", "MobileNetV2", "MobileNetV3Small", "MobileNetV3Large")
WRITERS = ("keras3_h5", "keras3_keras", "tfkeras_h5")
SUFFIX = {"keras3_h5": ".h5", "keras3_keras": ".keras", "tfkeras_h5": ".h5"}
INPUT_SHAPE = (64, 64, 3)
CLASSES = 10
# What a user tells npmobile: each of the tutorial's functions is this built-in. (relu6, named like the
# built-in, is written as the plain string "relu6"; mapping it anyway is harmless, and what a Keras user types.)
MAPPING = {"relu6": "relu6", "hard_swish": "hard_swish", "h_sigmoid": "hard_sigmoid"}


def tutorial_functions(framework: str) -> dict:
    """The activations as a tutorial for ``framework`` writes them (the Keras side's custom_objects)."""
    if framework == "tf_keras":
        from tf_keras import backend as K

        def relu6(x):
            return K.relu(x, max_value=6.0)

        def hard_swish(x):
            return x * K.relu(x + 3.0, max_value=6.0) / 6.0

        def h_sigmoid(x):
            return K.relu(x + 3.0, max_value=6.0) / 6.0
    else:
        from keras import ops

        def relu6(x):
            return ops.relu6(x)

        def hard_swish(x):
            return x * ops.relu6(x + 3.0) / 6.0

        def h_sigmoid(x):
            return ops.relu6(x + 3.0) / 6.0

    return {"relu6": relu6, "hard_swish": hard_swish, "h_sigmoid": h_sigmoid}


def _conv_bn(L, x, filters: int, kernel: int, strides: int, act, name: str):
    x = L.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = L.BatchNormalization(epsilon=1e-3, name=f"{name}_bn")(x)
    return x if act is None else L.Activation(act, name=f"{name}_act")(x)


def _depthwise_bn(L, x, kernel: int, strides: int, act, name: str):
    x = L.DepthwiseConv2D(kernel, strides=strides, padding="same", use_bias=False, name=f"{name}_dw")(x)
    x = L.BatchNormalization(epsilon=1e-3, name=f"{name}_dw_bn")(x)
    return L.Activation(act, name=f"{name}_dw_act")(x)


def _squeeze_excite(L, x, gate, name: str):
    channels = x.shape[-1]
    s = L.GlobalAveragePooling2D(keepdims=True, name=f"{name}_se_pool")(x)
    s = L.Conv2D(max(8, channels // 4), 1, activation="relu", name=f"{name}_se_reduce")(s)
    s = L.Conv2D(channels, 1, activation=gate, name=f"{name}_se_expand")(s)
    return L.Multiply(name=f"{name}_se_mul")([x, s])


def _inverted_residual(L, x, expansion: int, filters: int, kernel: int, strides: int, se: bool, act, gate,
                       name: str):
    shortcut, channels = x, x.shape[-1]
    if expansion != 1:
        x = _conv_bn(L, x, channels * expansion, 1, 1, act, f"{name}_expand")
    x = _depthwise_bn(L, x, kernel, strides, act, name)
    if se:
        x = _squeeze_excite(L, x, gate, name)
    x = _conv_bn(L, x, filters, 1, 1, None, f"{name}_project")
    if strides == 1 and channels == filters:
        x = L.Add(name=f"{name}_add")([shortcut, x])
    return x


def _head(L, x, act, name_hidden: str, hidden: int):
    x = L.GlobalAveragePooling2D(name="avg_pool")(x)
    x = L.Dense(hidden, activation=act, name=name_hidden)(x)
    x = L.Dropout(0.2, name="dropout")(x)
    return L.Dense(CLASSES, activation="softmax", name="predictions")(x)


def build(framework: str, family: str):
    """A tutorial's MobileNet of ``family``, built in ``framework`` ("keras" or "tf_keras")."""
    keras = importlib.import_module(framework)
    L = keras.layers
    f = tutorial_functions(framework)
    relu6, hard_swish, h_sigmoid = f["relu6"], f["hard_swish"], f["h_sigmoid"]
    inputs = keras.Input(INPUT_SHAPE)
    if family == "MobileNet":  # depthwise separable blocks: depthwise 3x3 + pointwise 1x1, ReLU6 after each
        x = _conv_bn(L, inputs, 32, 3, 2, relu6, "stem")
        for i, (filters, strides) in enumerate([(64, 1), (128, 2), (128, 1), (256, 2)]):
            x = _depthwise_bn(L, x, 3, strides, relu6, f"block{i}")
            x = _conv_bn(L, x, filters, 1, 1, relu6, f"block{i}_pw")
        outputs = _head(L, x, relu6, "fc", 64)
    elif family == "MobileNetV2":  # inverted residuals with linear bottlenecks
        x = _conv_bn(L, inputs, 32, 3, 2, relu6, "stem")
        table = [(1, 16, 1), (6, 24, 2), (6, 24, 1), (6, 32, 2), (6, 32, 1)]
        for i, (t, filters, strides) in enumerate(table):
            x = _inverted_residual(L, x, t, filters, 3, strides, False, relu6, None, f"block{i}")
        x = _conv_bn(L, x, 320, 1, 1, relu6, "top")
        outputs = _head(L, x, relu6, "fc", 64)
    else:  # V3: hard-swish, squeeze-excite gated by a hard sigmoid, some blocks with ReLU
        x = L.Rescaling(1.0 / 127.5, offset=-1.0, name="rescaling")(inputs)
        x = _conv_bn(L, x, 16, 3, 2, hard_swish, "stem")
        relu = "relu"
        if family == "MobileNetV3Small":
            table = [(1, 16, 3, 2, True, relu), (4.5, 24, 3, 2, False, relu), (3.67, 24, 3, 1, False, relu),
                     (4, 40, 5, 2, True, hard_swish), (6, 40, 5, 1, True, hard_swish)]
        else:
            table = [(1, 16, 3, 1, False, relu), (4, 24, 3, 2, False, relu), (3, 24, 3, 1, False, relu),
                     (3, 40, 5, 2, True, relu), (3, 40, 5, 1, True, relu), (6, 80, 3, 2, False, hard_swish),
                     (2.5, 80, 3, 1, False, hard_swish), (6, 112, 3, 1, True, hard_swish)]
        for i, (t, filters, kernel, strides, se, act) in enumerate(table):
            expansion = t if t == 1 else max(2, round(t))
            x = _inverted_residual(L, x, expansion, filters, kernel, strides, se, act, h_sigmoid, f"block{i}")
        x = _conv_bn(L, x, 6 * x.shape[-1], 1, 1, hard_swish, "top")
        outputs = _head(L, x, hard_swish, "fc", 128)
    return keras.Model(inputs, outputs, name=f"tutorial_{family}")


@dataclass
class TutorialCase:
    family: str
    writer: str
    path: Path
    x: np.ndarray
    y: np.ndarray
    keras_model: object = field(repr=False)
    mapping: dict = field(default_factory=lambda: dict(MAPPING))


def tutorial_case(root: Path, family: str, writer: str, batch: int = 2) -> TutorialCase:
    """Build, give statistics, find inputs with a clear top-5, save with ``writer``."""
    framework = "tf_keras" if writer.startswith("tfkeras") else "keras"
    seed = _stable_seed("tutorial", family, framework)
    importlib.import_module(framework).utils.set_random_seed(seed)  # the same model in every run
    model = build(framework, family)
    x, y = prepare(model, family, {"input_shape": INPUT_SHAPE}, batch, seed)
    path = Path(root) / f"tutorial-{family}-{writer}{SUFFIX[writer]}"
    model.save(str(path))
    return TutorialCase(family, writer, path, x, y, model)


class TutorialFiles:
    """Tutorial cases built once per test session (conftest's ``tutorials`` fixture)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.cases: dict[tuple[str, str], TutorialCase] = {}

    def __call__(self, family: str, writer: str) -> TutorialCase:
        if (family, writer) not in self.cases:
            self.cases[family, writer] = tutorial_case(self.root, family, writer)
        return self.cases[family, writer]


# --------------------------------------------------------------------------------------------------
# Transfer learning as TensorFlow's tutorial does it: augmentation, preprocess_input on the input tensor,
# a frozen base called with training=False, a new head (issue 24).
# --------------------------------------------------------------------------------------------------

TRANSFER_MODELS = ("tutorial", "v3small_augmented", "v1_preprocess", "resize_normalize")
TRANSFER_WRITERS = ("keras3_keras", "keras3_h5", "tfkeras_h5")
# Small where the point holds (Keras builds slowly on two cores): the tutorial's 160 px is the bench's.
TRANSFER_SIZE = 96


def _pixels(shape: tuple, batch: int, seed: int) -> np.ndarray:
    """Smooth random 0..255 'images' (tests/keras_files.py's, in pixels)."""
    from keras_files import _inputs

    return _inputs("MobileNetV3Small", {"input_shape": shape}, batch, seed)


def _augmentation(keras, kind: str):
    """The augmentation block: a nested Sequential (the tutorial's), or Keras 3's Pipeline."""
    L = keras.layers
    if kind == "v3small_augmented":
        layers = [L.RandomZoom(0.1), L.RandomContrast(0.2), L.RandomTranslation(0.1, 0.1), L.RandomBrightness(0.1)]
    else:
        layers = [L.RandomFlip("horizontal"), L.RandomRotation(0.2)]
    if kind == "v3small_augmented" and keras.__name__ == "keras":
        return L.Pipeline(layers, name="augmentation")
    return keras.Sequential(layers, name="augmentation")


def build_transfer(framework: str, kind: str, seed: int):
    """One of TRANSFER_MODELS in ``framework``, with non-trivial BatchNorm statistics in its base."""
    from keras_files import _give_statistics

    keras = importlib.import_module(framework)
    L = keras.layers
    apps = keras.applications
    keras.utils.set_random_seed(seed)
    shape = (TRANSFER_SIZE, TRANSFER_SIZE, 3)
    inputs = keras.Input(shape)
    if kind == "tutorial":  # TensorFlow's "Transfer learning and fine-tuning", at a smaller size
        base = apps.MobileNetV2(input_shape=shape, include_top=False, weights=None, alpha=0.35)
        x = _augmentation(keras, kind)(inputs)
        x = apps.mobilenet_v2.preprocess_input(x)
    elif kind == "v3small_augmented":
        base = apps.MobileNetV3Small(input_shape=shape, include_top=False, weights=None, alpha=0.75,
                                     include_preprocessing=True)
        x = _augmentation(keras, kind)(inputs)
        x = apps.mobilenet_v3.preprocess_input(x)  # the identity: V3 rescales inside
    elif kind == "v1_preprocess":
        base = apps.MobileNet(input_shape=shape, include_top=False, weights=None, alpha=0.25)
        x = apps.mobilenet.preprocess_input(inputs)
    else:  # images of any size, resized and normalized by the model itself
        shape = (None, None, 3)
        inputs = keras.Input(shape)
        base = apps.MobileNetV2(input_shape=(64, 64, 3), include_top=False, weights=None, alpha=0.35)
        x = L.Resizing(64, 64, interpolation="bilinear")(inputs)
        x = L.Normalization(mean=[123.7, 116.3, 103.5], variance=[3409.0, 3262.0, 3291.0])(x)
    if kind != "resize_normalize":
        probe = _pixels((TRANSFER_SIZE, TRANSFER_SIZE, 3), 8, seed + 1)
    else:
        probe = _pixels((64, 64, 3), 8, seed + 1)
    scaled = probe / np.float32(127.5) - np.float32(1.0) if kind != "v3small_augmented" else probe
    if kind == "resize_normalize":
        scaled = (probe - np.float32([123.7, 116.3, 103.5])) / np.float32([58.4, 57.1, 57.4])
    _give_statistics(base, scaled, seed)
    x = base(x, training=False)
    x = L.GlobalAveragePooling2D()(x)
    x = L.Dropout(0.2)(x)
    head = L.Dense(1, name="logit")
    outputs = head(x)
    model = keras.Model(inputs, outputs, name=f"transfer_{kind}")
    rng = np.random.default_rng(seed)
    head.kernel.assign(rng.normal(0, 0.5, head.kernel.shape).astype(np.float32))
    head.bias.assign(np.float32([0.3]))
    return model


@dataclass
class TransferCase:
    kind: str
    writer: str
    path: Path
    x: np.ndarray
    y: np.ndarray
    keras_model: object = field(repr=False)


class TransferFiles:
    """Transfer-learning cases built once per test session (conftest's ``transfer_models`` fixture):
    one model per kind and framework, saved once per writer, with Keras's own predict as the reference."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.models: dict[tuple[str, str], tuple] = {}
        self.cases: dict[tuple[str, str], TransferCase] = {}

    def model(self, kind: str, framework: str):
        if (kind, framework) not in self.models:
            seed = _stable_seed("transfer", kind, framework)
            model = build_transfer(framework, kind, seed)
            size = (72, 88, 3) if kind == "resize_normalize" else (TRANSFER_SIZE, TRANSFER_SIZE, 3)
            x = _pixels(size, 2, seed + 7)
            self.models[kind, framework] = (model, x, np.asarray(model.predict(x, verbose=0)))
        return self.models[kind, framework]

    def __call__(self, kind: str, writer: str) -> TransferCase:
        if (kind, writer) not in self.cases:
            framework = "tf_keras" if writer.startswith("tfkeras") else "keras"
            model, x, y = self.model(kind, framework)
            path = self.root / f"transfer-{kind}-{writer}{SUFFIX[writer]}"
            model.save(str(path))
            self.cases[kind, writer] = TransferCase(kind, writer, path, x, y, model)
        return self.cases[kind, writer]
