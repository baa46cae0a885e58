"""The sides verify compares npmobile's fast path with: Keras's own run of the file, or npmobile's reference path
when Keras is not there (the PyTorch side is in ``torch_side``). All share the ``Side`` protocol. This package is
the only place npmobile imports TensorFlow / Keras or PyTorch, and only when it runs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from npmobile.ops import is_input
from npmobile.verify.report import CouldNotRun, UsageProblem


@runtime_checkable
class Side(Protocol):
    """What verify compares npmobile with: an engine that runs the same file.

    ``label`` names it in the report ("Keras", "PyTorch", "npmobile reference"); ``detail`` says which engine and
    how the file was loaded; ``notes`` are what the reader must know about that load; ``skipped`` collects the
    layers it cannot compare (filled by ``layers()`` and by verify). ``data_format`` is the layout it runs in
    ("channels_last" or "channels_first"): inputs and per-layer values are compared in that layout.
    ``layers()`` lists (name, class) in the order the values are computed; ``predict_layers(x, names)`` gives
    each named layer's output on ``x``; ``predict(x)`` the final output."""

    label: str
    detail: str
    notes: list[str]
    skipped: list[str]
    data_format: str

    def layers(self) -> list[tuple[str, str]]: ...

    def predict_layers(self, x: np.ndarray, names: list[str]) -> dict[str, np.ndarray]: ...

    def predict(self, x: np.ndarray) -> np.ndarray: ...


class NpmobileReference:
    """npmobile's float32 reference path (plain NumPy kernels, the graph as written): what verify compares the
    fast path with when Keras is not there."""

    def __init__(self, model, why: str):
        self.model = model
        self.label = "npmobile reference"
        self.data_format = "channels_last"
        self.detail = f"npmobile's reference path (Keras not used: {why})"
        self.notes: list[str] = []
        self.skipped: list[str] = []

    def layers(self) -> list[tuple[str, str]]:
        return [(node.name, node.op) for node in self.model.graph.nodes if not is_input(node.op)]

    def predict_layers(self, x: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        return self.model.predict(x, outputs=names, reference=True)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.model.predict(x, reference=True)


class KerasSide:
    def __init__(self, framework, keras_model, detail: str, notes: list[str]):
        self.framework = framework
        self.keras_model = keras_model
        self.label = "Keras"
        self.data_format = "channels_last"
        self.detail = detail
        self.notes = notes
        self.skipped: list[str] = []
        self._outputs: dict[str, object] = {}  # layer name -> its symbolic output in the outer graph
        # A nested model's layers live in its own graph: layer name -> (nested model, output in that graph), and
        # nested model name -> what the outer graph feeds it.
        self._inner: dict[str, tuple[object, object]] = {}
        self._feeds: dict[str, object] = {}

    def layers(self) -> list[tuple[str, str]]:
        """(name, class) of every layer (and Keras 3 operation) in graph order, a nested model's own layers just
        before it."""
        model = self.keras_model
        found = []
        for op in getattr(model, "operations", None) or model.layers:
            if is_input(type(op).__name__):
                continue
            nested = isinstance(op, self.framework.Model)
            if nested:
                found.extend(self._nested_layers(op))
            output = _call_output(op) if nested else _symbolic_output(op)
            if output is None:
                self.skipped.append(f"{op.name} ({type(op).__name__}: no single output in this graph)")
                continue
            self._outputs[op.name] = output
            found.append((op.name, type(op).__name__))
        return found

    def _nested_layers(self, model) -> list[tuple[str, str]]:
        """The layers of a nested model (one level deep), run by a probe of that model on what the outer model
        feeds it."""
        try:
            feed = model._inbound_nodes[-1].input_tensors
        except (AttributeError, IndexError):
            feed = None
        feed = feed[0] if isinstance(feed, (list, tuple)) and len(feed) == 1 else feed
        if feed is None or isinstance(feed, (list, tuple)):
            self.skipped.append(f"the layers inside nested model {model.name} (compared through its output)")
            return []
        self._feeds[model.name] = feed
        found = []
        for layer in model.layers:
            if is_input(type(layer).__name__) or isinstance(layer, self.framework.Model):
                continue
            output = _symbolic_output(layer)
            if output is None:
                self.skipped.append(f"{layer.name} ({type(layer).__name__}, inside {model.name})")
                continue
            self._inner[layer.name] = (model, output)
            found.append((layer.name, type(layer).__name__))
        return found

    def predict_layers(self, x: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        outer = [n for n in names if n not in self._inner]
        nested = {id(self._inner[n][0]): self._inner[n][0] for n in names if n in self._inner}
        feeds = [self._feeds[m.name] for m in nested.values()]
        values = _run_probe(self.framework, self.keras_model.inputs, [self._outputs[n] for n in outer] + feeds, x)
        result = dict(zip(outer, values))
        for model, fed in zip(nested.values(), values[len(outer):]):
            inner = [n for n in names if n in self._inner and self._inner[n][0] is model]
            result.update(zip(inner, _run_probe(self.framework, model.inputs,
                                                [self._inner[n][1] for n in inner], fed)))
        return result

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.keras_model.predict(x, verbose=0))


def _run_probe(framework, inputs, outputs: list, x: np.ndarray) -> list[np.ndarray]:
    """Keras's own values of ``outputs`` (symbolic tensors of one graph) on ``x``, by ``predict`` as users run it."""
    if not outputs:
        return []
    values = framework.Model(inputs, outputs).predict(x, verbose=0)
    values = values if isinstance(values, list) else [values]
    return [np.asarray(v) for v in values]


def _symbolic_output(op):
    """A layer's output in the model's own graph: for a nested model or a layer called twice ``.output`` is
    ambiguous (Keras raises); such a layer is compared only through the layers after it."""
    try:
        output = op.output
    except (AttributeError, ValueError, RuntimeError):
        return None
    return None if isinstance(output, (list, tuple)) else output


def _call_output(model):
    """A nested model's output where the outer model calls it (its own ``.output`` belongs to its inner graph)."""
    try:
        node = model._inbound_nodes[-1]  # the last call: Keras 2 counts the model's construction as node 0
        outputs = node.output_tensors
    except (AttributeError, IndexError):
        return None
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    return outputs[0] if len(outputs) == 1 else None


def user_module(path: str, name: str = "npmobile_verify_user_activations"):
    """The user's own Python file (their activations, their PyTorch module), imported: their code, run only because
    they asked verify to."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UsageProblem(f"{path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # their code: any failure is theirs to see
        raise CouldNotRun(f"{path}: importing it failed ({type(error).__name__}: {error})") from None
    return module


def open_keras(path: str, keras_version: int, mapping: dict[str, str], module_path: str | None) -> KerasSide | str:
    """The file loaded in Keras, with each mapped custom function given Keras's built-in of the name npmobile
    was told (or the user's own function, from their module); or, when Keras cannot be imported, why."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        import keras
    except Exception as error:  # ImportError, or a Keras without a backend failing as it starts
        return f"Keras is not importable in this Python ({type(error).__name__}: {str(error)[:120]})"
    framework, name = keras, f"Keras {keras.__version__}"
    if keras_version < 3:
        try:
            import tf_keras

            framework, name = tf_keras, f"tf_keras {tf_keras.__version__}"
        except ImportError:
            name += " (tf_keras is not installed; Keras 3 reads the Keras 2 file)"
    user = user_module(module_path) if module_path else None
    custom, notes = {}, []
    for function, builtin in mapping.items():
        if user is not None:
            if not callable(getattr(user, function, None)):
                raise CouldNotRun(f"{module_path} defines no function {function!r}, which the model file names")
            custom[function] = getattr(user, function)
            notes.append(f"{function}: Keras runs your {Path(module_path).name}:{function} (your code, run only by "
                         f"verify); npmobile runs its built-in {builtin}")
        else:
            custom[function] = keras.activations.get(builtin)
            notes.append(f"{function}: Keras runs its built-in keras.activations.{builtin}, npmobile its {builtin} "
                         "(your own function is not checked: pass --custom-objects-module to check it)")
    try:
        keras_model = framework.models.load_model(path, custom_objects=custom, compile=False)
    except Exception as error:  # Keras's own failure on this file: report it, do not hide it as npmobile's
        if framework is keras and keras_version >= 3 and _is_hdf5(path):
            keras_model = _keras3_h5_with_op_modules(keras, path, custom, error)
            notes.append(f"{name} cannot load back the op nodes it writes into a legacy .h5 (x / 127.5, x + 3.0: "
                         "the config names no module, so Keras takes them for layers); verify rebuilt the model from "
                         "the file's config naming each op's module, as a .keras file does, and loaded the file's "
                         "weights into it (nothing else changed)")
            return KerasSide(framework, keras_model, name, notes)
        if framework is keras or not custom:
            raise CouldNotRun(f"{name} could not load {path} ({type(error).__name__}: {str(error)[:300]})") from None
        keras_model = _tf_keras_with_named_functions(framework, path, custom, error)
        notes.append("tf_keras cannot read back the {'class_name': 'function'} entries it writes for your functions; "
                     "verify gave it a temporary copy of the file naming them by plain name, as older tf_keras wrote "
                     "them (nothing else changed)")
    return KerasSide(framework, keras_model, name, notes)


def _is_hdf5(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89HDF\r\n\x1a\n"


# Where Keras 3 defines the op classes its functional graphs hold (``x / 127.5`` is a TrueDivide node).
_KERAS3_OP_MODULES = ("keras.src.ops.numpy", "keras.src.ops.nn", "keras.src.ops.core", "keras.src.ops.math")


def _with_op_modules(keras, layer: dict) -> dict:
    """A layer entry of a Keras 3 legacy .h5 config with its module named as a .keras config names it. An
    op node is told from a layer by its config, which has no "trainable" (``Add`` the op takes 3.0 as an
    argument; ``Add`` the layer takes only tensors)."""
    from importlib import import_module

    layer = dict(layer)
    class_name, config = layer.get("class_name"), layer.get("config")
    if "module" not in layer and isinstance(config, dict):
        if class_name in ("Functional", "Model"):
            layer["module"], layer["registered_name"] = "keras.src.models.functional", "Functional"
        elif class_name == "Sequential":
            layer["module"] = "keras"
        elif "trainable" not in config and not is_input(str(class_name)):
            module = next((m for m in _KERAS3_OP_MODULES if hasattr(import_module(m), str(class_name))), None)
            if module is not None:
                layer["module"], layer["registered_name"] = module, class_name
    if isinstance(config, dict) and isinstance(config.get("layers"), list):
        layer["config"] = {**config, "layers": [_with_op_modules(keras, inner) for inner in config["layers"]]}
    return layer


def _keras3_h5_with_op_modules(keras, path: str, custom: dict, error: Exception):
    """Keras 3.15 writes ``x + 3.0`` (MobileNetV3's hard-swish) and ``x / 127.5`` (preprocess_input) into a
    legacy .h5 as nodes of class "Add" / "TrueDivide" without their module, and its own loader then fails
    on them ("Unknown layer: 'TrueDivide'", "Only input tensors may be passed as positional arguments").
    Rebuild the model from the config with the modules named, then load the file's weights into it."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            config = f.attrs["model_config"]
        config = json.loads(config.decode() if isinstance(config, bytes) else config)
        model = keras.saving.deserialize_keras_object(_with_op_modules(keras, config), custom_objects=custom)
        model.load_weights(path)
        return model
    except Exception:
        raise CouldNotRun(f"Keras {keras.__version__} could not load {path} ({type(error).__name__}: "
                          f"{str(error)[:300]})") from None


def _tf_keras_with_named_functions(tf_keras, path: str, custom: dict, error: Exception):
    """tf_keras writes a user's function as {"class_name": "function", "config": "hard_swish", ...} and then
    refuses that entry on load, whatever custom_objects says (tf_keras 2.21). Load a temporary copy whose config
    names each function by its plain name, which tf_keras resolves through custom_objects."""
    import os
    import shutil
    import tempfile

    import h5py

    from npmobile.activations import custom_function_name

    def plain(value):
        if isinstance(value, dict):
            name = custom_function_name(value)
            return name if name is not None and name in custom else {k: plain(v) for k, v in value.items()}
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value

    handle, copy = tempfile.mkstemp(suffix=".h5")
    os.close(handle)
    try:
        shutil.copyfile(path, copy)
        with h5py.File(copy, "r+") as f:
            config = f.attrs["model_config"]
            config = json.loads(config.decode() if isinstance(config, bytes) else config)
            f.attrs["model_config"] = json.dumps(plain(config))
        return tf_keras.models.load_model(copy, custom_objects=custom, compile=False)
    except Exception:
        raise CouldNotRun(f"tf_keras could not load {path} ({type(error).__name__}: {str(error)[:300]})") from None
    finally:
        os.unlink(copy)
