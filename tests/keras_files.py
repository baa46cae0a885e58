"""Real Keras-written files for the tests: every model is built by keras.applications (Keras 3) or
tf_keras.applications (Keras 2), given non-trivial BatchNorm statistics and biases, saved in the
flavours npmobile reads, and kept with the writing framework's own outputs as the reference.

    case = cases.get("MobileNetV2", "keras3_keras", alpha=0.35, input_shape=(96, 96, 3))
    model = case.load()                  # npmobile: load_model(path), or the architecture + weights=path
    np.testing.assert_allclose(model.predict(case.x), case.y, ...)
    case.intermediate(["block_3_depthwise"])   # Keras's own output of any layer, by name

Writers:
- keras3_h5      Keras 3 ``model.save("m.h5")``       (legacy full model)
- keras3_keras   Keras 3 ``model.save("m.keras")``    (zip)
- keras3_weights Keras 3 ``model.save_weights("m.weights.h5")``, loaded with an architecture
- tfkeras_h5     tf_keras ``model.save("m.h5")``      (Keras 2 full model: TFOpLambda, ``:0`` names)
- official_h5    tf_keras ``model.save_weights("w.h5")``: the official keras-applications layout,
                 loaded with an architecture
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

KERAS3_WRITERS = ("keras3_h5", "keras3_keras", "keras3_weights")
TFKERAS_WRITERS = ("tfkeras_h5", "official_h5")
WRITERS = KERAS3_WRITERS + TFKERAS_WRITERS
WEIGHTS_ONLY = ("keras3_weights", "official_h5")
SUFFIX = {"keras3_h5": ".h5", "keras3_keras": ".keras", "keras3_weights": ".weights.h5",
          "tfkeras_h5": ".h5", "official_h5": ".h5"}
NESTED = "nested"  # a custom head on a nested MobileNetV2 backbone
CLASSIFIERS = ("conv_preds", "predictions", "logits", "Logits", "head")


@dataclass
class KerasCase:
    family: str
    writer: str
    kwargs: dict
    path: Path
    x: np.ndarray
    y: np.ndarray
    keras_model: object = field(repr=False)

    def load(self):
        """The npmobile model for this file, the way a user would load it."""
        import npmobile
        from npmobile import applications

        if self.writer in WEIGHTS_ONLY:
            return getattr(applications, self.family)(weights=str(self.path), **self.kwargs)
        return npmobile.load_model(self.path)

    def intermediate(self, names: list[str]) -> dict[str, np.ndarray]:
        """Keras's own outputs of the named layers on ``self.x``."""
        model = self.keras_model
        keras = _framework(self.writer)
        outputs = [_layer_output(model, name) for name in names]
        probe = keras.Model(model.inputs, outputs)
        values = probe.predict(self.x, verbose=0)
        values = values if isinstance(values, list) else [values]
        return dict(zip(names, values))


def _framework(writer: str):
    if writer in TFKERAS_WRITERS:
        import tf_keras

        return tf_keras
    import keras

    return keras


def _layer_output(model, name: str):
    for layer in model.layers:
        if layer.name == name:
            return layer.output
        if hasattr(layer, "layers"):  # a nested backbone
            for inner in layer.layers:
                if inner.name == name:
                    raise ValueError("ask for nested layers through a flat case")
    raise KeyError(name)


def _inputs(family: str, kwargs: dict, batch: int, seed: int) -> np.ndarray:
    """Smooth random 'images' (low-frequency patterns plus noise), in the range the model takes."""
    shape = kwargs.get("input_shape", (224, 224, 3))
    rng = np.random.default_rng(seed)
    h, w, c = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    images = []
    for _ in range(batch):
        img = np.zeros((h, w, c), np.float32)
        for ch in range(c):
            fy, fx, phase = rng.uniform(0.01, 0.15), rng.uniform(0.01, 0.15), rng.uniform(0, 6.3)
            img[:, :, ch] = 127.5 + 90 * np.sin(fy * yy + fx * xx + phase)
        img += rng.normal(0, 20, img.shape).astype(np.float32)
        images.append(np.clip(img, 0, 255))
    x = np.stack(images).astype(np.float32)
    takes_pixels = family.startswith("MobileNetV3") and kwargs.get("include_preprocessing", True)
    return x if takes_pixels else x / np.float32(127.5) - np.float32(1.0)


def _batchnorm_layers(model):
    for layer in model.layers:
        if hasattr(layer, "layers"):
            yield from _batchnorm_layers(layer)
        elif type(layer).__name__ == "BatchNormalization":
            yield layer


def _give_statistics(model, x: np.ndarray, seed: int) -> None:
    """Non-trivial BatchNorm statistics that keep activations O(1), and nonzero biases.

    gamma in ±[0.5, 1.5] (10% negative) and beta ~ N(0, 0.2) first; then one forward pass in
    training mode with momentum 0 sets each layer's moving statistics to what it actually sees,
    so the network neither saturates nor collapses; then the statistics are perturbed (mean
    offsets, variances scaled 0.5-2) so folding has real work to do.
    """
    rng = np.random.default_rng(seed)
    layers = list(_batchnorm_layers(model))
    for layer in layers:
        c = layer.gamma.shape[0]
        sign = np.where(rng.random(c) < 0.1, -1.0, 1.0)
        layer.gamma.assign((rng.uniform(0.5, 1.5, c) * sign).astype(np.float32))
        layer.beta.assign(rng.normal(0, 0.2, c).astype(np.float32))
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.momentum = 0.0
    model(x, training=True)
    for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum
        mean, var = layer.moving_mean.numpy(), layer.moving_variance.numpy()
        c = mean.shape[0]
        std = np.sqrt(var + 1e-3)
        layer.moving_mean.assign((mean + rng.normal(0, 0.2, c) * std).astype(np.float32))
        layer.moving_variance.assign((var * rng.uniform(0.5, 2.0, c)).astype(np.float32))
    for layer in _all_layers(model):
        bias = getattr(layer, "bias", None)
        if bias is not None and type(layer).__name__ != "BatchNormalization":
            bias.assign(rng.normal(0, 0.1, bias.shape).astype(np.float32))
        if layer.name in CLASSIFIERS and hasattr(layer, "kernel"):
            # Random glorot weights give an almost flat softmax over 1000 classes; a trained
            # classifier is confident. Sharpen it so the top-5 is decided by the weights.
            layer.kernel.assign(layer.kernel.numpy() * np.float32(4.0))


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)


def _build(family: str, writer: str, kwargs: dict):
    keras = _framework(writer)
    if family == NESTED:
        kw = dict(kwargs)
        shape = kw.pop("input_shape")
        backbone = keras.applications.MobileNetV2(weights=None, include_top=False, input_shape=shape, **kw)
        backbone.trainable = False  # transfer learning: the frozen backbone's weights are non-trainable
        inputs = keras.Input(shape)
        x = backbone(inputs)
        x = keras.layers.GlobalAveragePooling2D()(x)
        x = keras.layers.Dropout(0.2)(x)
        outputs = keras.layers.Dense(7, activation="softmax", name="head")(x)
        return keras.Model(inputs, outputs, name="transfer")
    return getattr(keras.applications, family)(weights=None, **kwargs)


def _top_gap_ok(y: np.ndarray) -> bool:
    """Top-5 must be decided by the weights, not by float noise: neighbouring probabilities among
    the top 6 differ by far more than float32 rounding (about 1e-8 on these probabilities)."""
    if y.ndim != 2:
        return True
    top = -np.sort(-y, axis=1)[:, :6]
    return bool(np.all(np.abs(np.diff(top, axis=1)) > 1e-6))


def _stable_seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode()) % 2**31


class KerasFiles:
    """Builds and caches cases under ``root`` for one test session: one model per family, arguments
    and framework, saved once per writer."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.models: dict[tuple, tuple] = {}
        self.cases: dict[tuple, KerasCase] = {}

    def get(self, family: str, writer: str, batch: int = 2, **kwargs) -> KerasCase:
        key = (family, writer, batch, tuple(sorted(kwargs.items())))
        if key not in self.cases:
            model, x, y = self._model(family, writer in TFKERAS_WRITERS, batch, kwargs)
            path = self.root / f"{family}-{writer}-{_stable_seed(key)}{SUFFIX[writer]}"
            if writer in WEIGHTS_ONLY:
                model.save_weights(str(path))
            else:
                model.save(str(path))
            self.cases[key] = KerasCase(family, writer, kwargs, path, x, y, model)
        return self.cases[key]

    def _model(self, family: str, tf_keras: bool, batch: int, kwargs: dict):
        key = (family, tf_keras, batch, tuple(sorted(kwargs.items())))
        if key not in self.models:
            seed = _stable_seed(key)
            writer = "tfkeras_h5" if tf_keras else "keras3_h5"
            # Keras's initializers draw from the framework's global generator: seed it, so a case is the
            # same model in every run (an unseeded one could, rarely, have no clear top-5 for any input).
            _framework(writer).utils.set_random_seed(seed)
            model = _build(family, writer, kwargs)
            self.models[key] = (model, *prepare(model, family, kwargs, batch, seed))
        return self.models[key]


def prepare(model, family: str, kwargs: dict, batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Give ``model`` non-trivial statistics, then draw inputs whose top-5 is clear: (x, Keras's outputs)."""
    _give_statistics(model, _inputs(family, kwargs, 8, seed + 1), seed)
    for attempt in range(20):
        x = _inputs(family, kwargs, batch, seed + 100 + attempt)
        y = np.asarray(model.predict(x, verbose=0))
        if _top_gap_ok(y):
            return x, y
    raise AssertionError(f"{family} {kwargs}: could not draw inputs with a clear top-5")


def segmentation_head(keras, interpolation: str):
    """A tutorial-style decoder on a small MobileNet-like encoder: UpSampling2D back up, odd sizes."""
    layers = keras.layers
    inputs = keras.Input((21, 27, 3))
    x = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu6")(inputs)
    x = layers.DepthwiseConv2D(3, strides=2, padding="same", activation="relu")(x)
    x = layers.Conv2D(16, 1, activation="relu")(x)
    x = layers.UpSampling2D((2, 2), interpolation=interpolation)(x)
    x = layers.Conv2D(4, 1)(x)
    outputs = layers.UpSampling2D((3, 2), interpolation=interpolation)(x)
    return keras.Model(inputs, outputs)
