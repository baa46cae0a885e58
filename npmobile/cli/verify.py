"""``npmobile verify``: the user's own proof that npmobile answers like Keras (or PyTorch) on their model.

It loads the same file in Keras (tf_keras for files tf_keras / Keras 2 wrote, when installed; Keras 3 otherwise),
or, for a PyTorch state dict, in PyTorch (torchvision's module built with npmobile.applications.torchvision_modules,
or the user's own, and the file read by torch's own loader); runs both on the images (or seeded random inputs in
the model's range) and compares, layer by layer in graph order (PyTorch: by module path, in the order the modules
finish), with the parity tests' tolerances; then the final output of the fast, fused path ``predict`` uses, on its
own; and each engine's distance from npmobile's float64 reference, to show whose rounding a difference is.
This module is the only place npmobile imports TensorFlow / Keras or PyTorch, and only when it runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from npmobile.cli.models import add_custom_object_option, add_load_options, positive_int
from npmobile.errors import CustomObjectError, NpmobileError
from npmobile.io.torch import torch_format
from npmobile.opening import model_input, preprocess_for

# The parity tolerances (tests/test_parity.py): probabilities absolutely, feature maps relative to their range.
PROBABILITY_ATOL = 5e-5
FEATURE_RTOL = 1e-4
EXIT_OK, EXIT_BEYOND, EXIT_USAGE, EXIT_COULD_NOT_RUN = 0, 1, 2, 3

EXAMPLES = """\
examples:
  npmobile verify my_model.keras                                  seeded random inputs
  npmobile verify tutorial.h5 cat.jpg --custom-object hard_swish=hard_swish --custom-object h_sig=hard_sigmoid
  npmobile verify tutorial.h5 --custom-object hard_swish=hard_swish --custom-objects-module my_activations.py
  npmobile verify my_model.h5 --json > parity.json
  npmobile verify best.pth cat.jpg                                a PyTorch state dict, against PyTorch
  npmobile verify best.safetensors --torch-model my_net.py:build  against your own PyTorch module

A mapped name is given Keras's built-in of that name (keras.activations.hard_swish): that checks npmobile
against Keras. --custom-objects-module gives Keras your own functions instead (your code, run by verify only):
that checks your mapping too. A PyTorch state dict (.pth, .safetensors) is run in PyTorch (pip install torch)
as torchvision's MobileNet of the architecture npmobile reads from the file, or as the module --torch-model
builds: your code, run by verify only; its module paths must be torchvision's (features.0, ..., classifier).
exit status: 0 within tolerance, 1 beyond it, 2 usage error, 3 could not run.
"""


class CouldNotRun(Exception):
    """Something outside npmobile's control stopped the comparison: Keras cannot load the file, the user's module
    does not import."""


class UsageProblem(Exception):
    """An option that cannot be used as given."""


@dataclass
class Difference:
    """How far one engine's values are from another's on one layer (or the final output)."""

    max_abs: float = 0.0
    rel: float = 0.0  # max |diff| / max(1, max |reference|): the quantity the feature-map tolerance bounds
    tolerance: float = 0.0  # in max |diff| units
    ok: bool = True
    worst: float = 0.0  # max |diff| / tolerance over the inputs

    def add(self, got: np.ndarray, reference: np.ndarray) -> None:
        got, reference = np.asarray(got, np.float64), np.asarray(reference, np.float64)
        if got.shape != reference.shape:
            self.ok, self.worst, self.max_abs = False, float("inf"), float("inf")
            return
        diff = float(np.abs(got - reference).max()) if got.size else 0.0
        scale = max(1.0, float(np.abs(reference).max())) if reference.size else 1.0
        tolerance = PROBABILITY_ATOL if is_probability(reference) else FEATURE_RTOL * scale
        ratio = diff / tolerance if np.isfinite(diff) else float("inf")
        self.max_abs, self.rel = max(self.max_abs, diff), max(self.rel, diff / scale)
        if ratio >= self.worst:
            self.worst, self.tolerance = ratio, tolerance
        self.ok = self.ok and bool(diff <= tolerance)

    def as_dict(self) -> dict:
        return {"max_abs": self.max_abs, "rel": self.rel, "tolerance": self.tolerance, "ok": self.ok}


@dataclass
class LayerRow:
    name: str
    class_name: str
    shape: tuple
    versus: Difference = field(default_factory=Difference)  # npmobile (unfused fast kernels) vs the reference side
    npmobile_f64: Difference = field(default_factory=Difference)
    reference_f64: Difference = field(default_factory=Difference)

    def as_dict(self) -> dict:
        return {"name": self.name, "class": self.class_name, "shape": list(self.shape), **self.versus.as_dict(),
                "npmobile_vs_float64": self.npmobile_f64.max_abs, "reference_vs_float64": self.reference_f64.max_abs}


def is_probability(values: np.ndarray) -> bool:
    """[batch, classes] rows of non-negative values summing to 1 (a softmax output)."""
    return bool(values.ndim == 2 and values.shape[1] > 1 and values.min() >= 0
                and np.allclose(values.sum(axis=1), 1, atol=1e-3))


def top5_agreement(got: np.ndarray, reference: np.ndarray, logits: bool = False) -> str:
    """"yes", "yes (ties ...)" when the orders differ only between classes the reference scores within the
    tolerance of each other (probabilities: 5e-5; ``logits``: 1e-4 x max(1, max|reference|)), "no", or "n/a"
    for outputs that are neither."""
    if got.shape != reference.shape or reference.ndim != 2 or reference.shape[1] < 5:
        return "n/a"
    if logits:
        tie = FEATURE_RTOL * max(1.0, float(np.abs(reference).max()))
    elif is_probability(reference):
        tie = PROBABILITY_ATOL
    else:
        return "n/a"
    ties = []
    for n in range(got.shape[0]):
        ours = np.argsort(-got[n], kind="stable")[:5]
        theirs = np.argsort(-reference[n], kind="stable")[:5]
        for rank, (a, b) in enumerate(zip(ours, theirs)):
            if a == b:
                continue
            if abs(float(reference[n, a]) - float(reference[n, b])) > tie:
                return "no"
            ties.append(f"input {n} rank {rank + 1}")
    return "yes" if not ties else f"yes (tied within {tie:.2g} at {', '.join(ties)})"


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------


def add_parser(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "verify", help="check that npmobile answers like Keras (or PyTorch) on your model, layer by layer",
        description=textwrap.fill(
            "Load MODEL in npmobile and in Keras (a PyTorch state dict: in PyTorch), run both on the images (or on "
            "seeded random inputs in the model's range: 0..255 for a model that starts with a Rescaling layer, -1..1 "
            "otherwise, pixels 0..1 normalized with the ImageNet mean and std for a PyTorch state dict), and print, "
            "layer by layer, the largest absolute and relative difference, the first layer beyond the tolerances "
            "(probabilities 5e-5; feature maps and logits 1e-4 x max(1, max|reference|)), whether the top-5 agree, "
            "and each engine's distance from npmobile's float64 reference. Without Keras it compares npmobile's "
            "fast path with its reference path; without PyTorch it cannot check a state dict (exit 3).", 100),
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL",
                        help="a Keras file (.h5, .keras) or a PyTorch state dict of a torchvision MobileNetV2/V3 "
                             "(.pth, .safetensors; the architecture is read from the file)")
    parser.add_argument("images", nargs="*", metavar="IMAGE", help="images to run (default: random inputs)")
    add_custom_object_option(parser)
    add_load_options(parser)
    parser.add_argument("--custom-objects-module", metavar="FILE.py",
                        help="a Python file defining your activation functions by the names the model file uses: "
                             "Keras runs them instead of its built-ins (your code, run by verify only)")
    parser.add_argument("--torch-model", metavar="FILE.py:NAME",
                        help="for a PyTorch state dict: PyTorch runs the module that NAME() in your FILE.py returns "
                             "(a class or function called with no arguments; your code, run by verify only) "
                             "instead of torchvision's architecture")
    parser.add_argument("--samples", type=positive_int, default=2, metavar="N",
                        help="random inputs when no IMAGE is given (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    parser.add_argument("--size", type=positive_int, default=224,
                        help="input size for a model that takes any size (default 224)")
    parser.add_argument("--without-keras", action="store_true",
                        help="compare npmobile's fast path with its own reference path only (what verify does "
                             "when Keras is not installed)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--all", action="store_true", dest="all_layers",
                        help="list every layer (default: the first and last few, every one beyond tolerance and "
                             "the closest to it; the others are counted)")
    return parser


def run(args) -> int:
    try:
        report = verify(args)
    except (UsageProblem, CustomObjectError) as error:
        if getattr(args, "debug", False):
            raise
        print(f"npmobile verify: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (CouldNotRun, NpmobileError) as error:
        if getattr(args, "debug", False):
            raise
        print(f"npmobile verify: could not run: {error}", file=sys.stderr)
        return EXIT_COULD_NOT_RUN
    print(json.dumps(report, indent=2) if args.json else report_text(report, args.all_layers))
    return EXIT_OK if report["ok"] else EXIT_BEYOND


def verify(args) -> dict:
    import npmobile
    from npmobile.activations import check_custom_objects

    mapping = check_custom_objects(dict(args.custom_objects))
    module_path = args.custom_objects_module
    if module_path is not None and not Path(module_path).is_file():
        raise UsageProblem(f"{module_path}: no such file")
    if not Path(args.model).is_file():
        raise UsageProblem(f"{args.model}: no such file")
    pytorch = torch_format(args.model) is not None
    _check_options_fit(args, pytorch)
    torch = _import_torch() if pytorch else None  # before the load: without torch there is nothing to check
    model = npmobile.load_model(args.model, custom_objects=mapping, timeout=args.load_timeout, trusted=args.trusted)
    if len(model.graph.inputs) != 1:
        raise CouldNotRun(f"{args.model}: the model takes {len(model.graph.inputs)} inputs; verify runs models "
                          "with one input")
    x, inputs_text = _inputs(model, args)

    if pytorch:
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))  # NCHW: PyTorch's layout, and so the report's shapes
        side = _open_torch(torch, args.model, model, args.torch_model, x[:1])
    else:
        side = None if args.without_keras else _open_keras(args.model, model.graph.keras_version, mapping,
                                                           module_path)
        if not isinstance(side, _KerasSide):
            side = _NpmobileReference(model, "--without-keras" if args.without_keras else side)
    layout = side.data_format
    layers = _compare_layers(model, side, x)
    final = Difference()
    fast = np.asarray(model.predict(x, data_format=layout))
    reference_final = np.asarray(side.predict(x))
    final.add(fast, reference_final)
    exact = np.asarray(model.predict(x, reference=True, dtype=np.float64, data_format=layout))
    to_exact = {"npmobile": Difference(), side.label: Difference()}
    to_exact["npmobile"].add(fast, exact)
    to_exact[side.label].add(reference_final, exact)
    top5 = top5_agreement(fast, reference_final, logits=bool(getattr(model, "outputs_logits", False)))
    first_bad = next((row.name for row in layers if not row.versus.ok), None)
    ok = final.ok and first_bad is None and top5 != "no"
    if pytorch:
        writer = "PyTorch, a torchvision-named state dict"
    else:
        writer = "Keras 2 / tf_keras" if model.graph.keras_version < 3 else "Keras 3"
    return {
        "model": str(args.model), "model_name": model.name, "writer": writer,
        "inputs": inputs_text, "reference": side.label, "reference_detail": side.detail, "notes": side.notes,
        "layers": [row.as_dict() for row in layers], "skipped_layers": side.skipped,
        "first_layer_beyond_tolerance": first_bad,
        "final": {**final.as_dict(), "top5_agree": top5, "path": "predict (fast, fused)"},
        "float64": {name: d.max_abs for name, d in to_exact.items()},
        "ok": ok,
    }


def _check_options_fit(args, pytorch: bool) -> None:
    """Keras's options mean nothing to a state dict, --torch-model nothing to a Keras file: say so, not ignore."""
    if pytorch:
        keras_only = [option for option, given in (("--custom-object", args.custom_objects),
                                                    ("--custom-objects-module", args.custom_objects_module),
                                                    ("--without-keras", args.without_keras)) if given]
        if keras_only:
            raise UsageProblem(f"{args.model} is a PyTorch state dict: {keras_only[0]} is for Keras files")
    elif args.torch_model is not None:
        raise UsageProblem(f"{args.model} is not a PyTorch state dict: --torch-model is for .pth / .safetensors files")


def _inputs(model, args) -> tuple[np.ndarray, str]:
    """NHWC inputs as the model wants them: the images prepared its way, or seeded random ones in its range."""
    preprocessing = preprocess_for(model)
    if args.images:
        for path in args.images:
            if not Path(path).is_file():
                raise UsageProblem(f"{path}: no such file")
        x = np.concatenate([model_input(model, path, args.size) for path in args.images])
        prepared = {"none": "pixels 0..255", "tf": "preprocessed to -1..1",
                    "torchvision": "prepared the torchvision way (resize, center crop, ImageNet mean/std)"}
        return x, f"{len(args.images)} image(s), {prepared[preprocessing]}"
    shape = tuple(d or args.size for d in model.input_shape[1:])
    rng = np.random.default_rng(args.seed)
    if preprocessing == "torchvision":
        from npmobile.image import normalize_imagenet

        x = normalize_imagenet(rng.uniform(0.0, 1.0, (args.samples, *shape)).astype(np.float32))
        nchw = (shape[2], shape[0], shape[1])
        return x, (f"{args.samples} random input(s) {nchw} (pixels 0..1 normalized with the ImageNet mean and std, "
                   f"seed {args.seed})")
    low, high = (0.0, 255.0) if preprocessing == "none" else (-1.0, 1.0)
    x = rng.uniform(low, high, (args.samples, *shape)).astype(np.float32)
    return x, f"{args.samples} random input(s) {shape} in {low:g}..{high:g} (seed {args.seed})"


# --------------------------------------------------------------------------------------------------
# The reference side: Keras, or npmobile's own reference path
# --------------------------------------------------------------------------------------------------


class _NpmobileReference:
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
        return [(node.name, node.op) for node in self.model.graph.nodes if node.op != "InputLayer"]

    def predict_layers(self, x: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        return self.model.predict(x, outputs=names, reference=True)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.model.predict(x, reference=True)


class _KerasSide:
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
            if type(op).__name__ == "InputLayer":
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
            if type(layer).__name__ == "InputLayer" or isinstance(layer, self.framework.Model):
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


def _user_module(path: str, name: str = "npmobile_verify_user_activations"):
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


def _open_keras(path: str, keras_version: int, mapping: dict[str, str], module_path: str | None) -> _KerasSide | str:
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
    user = _user_module(module_path) if module_path else None
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
            return _KerasSide(framework, keras_model, name, notes)
        if framework is keras or not custom:
            raise CouldNotRun(f"{name} could not load {path} ({type(error).__name__}: {str(error)[:300]})") from None
        keras_model = _tf_keras_with_named_functions(framework, path, custom, error)
        notes.append("tf_keras cannot read back the {'class_name': 'function'} entries it writes for your functions; "
                     "verify gave it a temporary copy of the file naming them by plain name, as older tf_keras wrote "
                     "them (nothing else changed)")
    return _KerasSide(framework, keras_model, name, notes)


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
        elif "trainable" not in config and class_name != "InputLayer":
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


class _TorchSide:
    """PyTorch's own run of a state dict: the module (torchvision's architecture, or the user's) with the file read
    by torch's loader and bound by ``load_state_dict(strict=True)``, compared by module path (``features.3``,
    ``features.4.block.2.fc1``, ``classifier``) through forward hooks. NCHW in and out, as PyTorch runs."""

    def __init__(self, torch, module, detail: str, probe: np.ndarray):
        self.torch = torch
        self.module = module
        self.label = "PyTorch"
        self.data_format = "channels_first"
        self.detail = detail
        self.notes: list[str] = []
        self.skipped: list[str] = []
        self._order = self._finishing_order(probe)

    def _finishing_order(self, probe: np.ndarray) -> list[tuple[str, str]]:
        """(module path, class) in the order the modules finish their forward on ``probe``: graph order, a block
        after the layers inside it (named_modules() lists a block first). A module that never runs is left out."""
        modules = dict(self.module.named_modules())
        order: list[tuple[str, str]] = []
        seen: set[str] = set()

        def finished(name: str, module) -> None:
            if name not in seen:
                seen.add(name)
                order.append((name, type(module).__name__))

        hooks = [m.register_forward_hook(lambda m, i, o, name=name: finished(name, m))
                 for name, m in modules.items() if name]
        try:
            self.predict(probe)
        finally:
            for hook in hooks:
                hook.remove()
        return order

    def layers(self) -> list[tuple[str, str]]:
        return list(self._order)

    def predict_layers(self, x: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        modules = dict(self.module.named_modules())
        found: dict[str, np.ndarray] = {}

        def keep(name: str, output) -> None:
            # A copy now: an in-place activation after this module (torchvision's ReLU(inplace=True)) would change it.
            if isinstance(output, self.torch.Tensor):
                found.setdefault(name, output.detach().numpy().copy())

        hooks = [modules[name].register_forward_hook(lambda m, i, o, name=name: keep(name, o)) for name in names]
        try:
            self.predict(x)
        finally:
            for hook in hooks:
                hook.remove()
        return found

    def predict(self, x: np.ndarray) -> np.ndarray:
        try:
            with self.torch.inference_mode():
                output = self.module(self.torch.from_numpy(np.ascontiguousarray(x, np.float32)))
        except Exception as error:  # the module's own forward (the user's code, with --torch-model) failed
            raise CouldNotRun(f"PyTorch's forward failed on an input of shape {tuple(x.shape)} "
                              f"({_one_line(error)})") from None
        if not isinstance(output, self.torch.Tensor):
            raise CouldNotRun(f"the PyTorch module returned a {type(output).__name__}, not one tensor of logits")
        return output.numpy()


def _import_torch():
    """PyTorch, or why verify cannot check a state dict without it (one line, exit 3)."""
    try:
        import torch
    except Exception as error:  # ImportError, or a broken install failing as it starts
        raise CouldNotRun(f"checking a PyTorch state dict needs PyTorch, which is not importable in this Python "
                          f"({type(error).__name__}): pip install torch") from None
    return torch


def _one_line(error: Exception, limit: int = 300) -> str:
    """An exception from PyTorch (often several lines, with advice about weights_only) as one short line."""
    return f"{type(error).__name__}: {' '.join(str(error).split())[:limit]}"


def _torch_state_dict(torch, path: str) -> tuple[dict, str]:
    """The file's state dict as PyTorch reads it (its own loaders, not npmobile's reader): ``torch.load`` with
    ``weights_only=True`` for a .pth, safetensors' own for a .safetensors; unwrapped from a training checkpoint and
    DataParallel's ``module.`` as npmobile's reader does."""
    from npmobile.io.torch import state_dict_of, without_module_prefix

    if torch_format(path) == "safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise CouldNotRun(f"{path}: reading a .safetensors file in PyTorch needs the safetensors package: "
                              "pip install safetensors") from None
        how, load = "safetensors.torch.load_file", lambda: load_file(path)
    else:
        how, load = "torch.load(weights_only=True)", lambda: torch.load(path, map_location="cpu", weights_only=True)
    try:
        contents = load()
    except Exception as error:  # PyTorch's own failure on this file: report it, do not hide it as npmobile's
        raise CouldNotRun(f"PyTorch could not load {path} ({_one_line(error)})") from None
    state = state_dict_of(contents, path, torch.is_tensor)
    return {without_module_prefix(k): v for k, v in state.items() if torch.is_tensor(v)}, how


def _open_torch(torch, path: str, model, user_module: str | None, probe: np.ndarray) -> _TorchSide:
    """The reference module with the file's weights: torchvision's architecture as npmobile read it from the file
    (npmobile.applications.torchvision_modules), or the one the user's ``FILE.py:NAME`` builds."""
    if user_module is None:
        from npmobile.applications import torchvision_modules

        options = {"num_classes": model.num_classes, "width_mult": model.width_mult}
        if model.arch != "mobilenet_v2":
            options["reduced_tail"] = model.reduced_tail
        module = torchvision_modules.build(model.arch, **options)
        described = (f"torchvision's {model.arch}({', '.join(f'{k}={v}' for k, v in options.items())}) "
                     "(npmobile.applications.torchvision_modules)")
    else:
        module, described = _user_torch_module(torch, user_module)
    state, how = _torch_state_dict(torch, path)
    try:
        module.load_state_dict(state, strict=True)
    except Exception as error:  # a state dict that does not fit the module: PyTorch says which tensor
        raise CouldNotRun(f"PyTorch could not load {path} into {described} ({_one_line(error)})") from None
    module = module.float().eval()
    detail = f"PyTorch {torch.__version__}: {described}, the file read by {how}, load_state_dict(strict=True)"
    return _TorchSide(torch, module, detail, probe)


def _user_torch_module(torch, spec: str):
    """``FILE.py:NAME``: the module NAME() returns, from the user's file (their code, run by verify only)."""
    file, sep, name = spec.rpartition(":")
    if not sep or not file or not name.isidentifier():
        raise UsageProblem(f"--torch-model {spec}: expected FILE.py:NAME (e.g. my_net.py:MobileNetV3)")
    if not Path(file).is_file():
        raise UsageProblem(f"{file}: no such file")
    factory = getattr(_user_module(file, "npmobile_verify_user_torch_model"), name, None)
    if not callable(factory):
        raise CouldNotRun(f"{file} defines no class or function {name!r}")
    try:
        module = factory()
    except Exception as error:  # their code: any failure is theirs to see
        raise CouldNotRun(f"{file}: {name}() failed ({_one_line(error)})") from None
    if not isinstance(module, torch.nn.Module):
        raise CouldNotRun(f"{file}: {name}() returned a {type(module).__name__}, not a torch.nn.Module")
    return module, f"your {Path(file).name}:{name}() (your code, run only by verify)"


# --------------------------------------------------------------------------------------------------
# Comparing
# --------------------------------------------------------------------------------------------------


def _compare_layers(model, side, x: np.ndarray) -> list[LayerRow]:
    """Every layer both engines know by name, one input at a time (all of a model's feature maps at once, for a
    whole batch, would not fit in memory at 224 px)."""
    rows: list[LayerRow] = []
    names = []
    for name, class_name in side.layers():
        try:
            model.graph.resolve(name)
        except KeyError:
            side.skipped.append(f"{name} ({class_name}: not a layer npmobile keeps by that name)")
            continue
        names.append(name)
        rows.append(LayerRow(name, class_name, ()))
    for n in range(x.shape[0]):
        one = x[n : n + 1]
        theirs = side.predict_layers(one, names)
        ours = model.predict(one, outputs=names, data_format=side.data_format)
        exact = model.predict(one, outputs=names, reference=True, dtype=np.float64, data_format=side.data_format)
        for row in rows:
            row.shape = tuple(theirs[row.name].shape[1:])
            row.versus.add(ours[row.name], theirs[row.name])
            row.npmobile_f64.add(ours[row.name], exact[row.name])
            row.reference_f64.add(theirs[row.name], exact[row.name])
        del theirs, ours, exact
    return rows


# --------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------


def shown_layers(rows: list[dict], all_layers: bool, head: int = 4, tail: int = 3) -> list[dict | int]:
    """The layer rows to print, with the count of ok rows left out between them (an int) where some are."""
    if all_layers:
        return list(rows)
    worst = max(range(len(rows)), key=lambda k: rows[k]["max_abs"] / rows[k]["tolerance"] if rows[k]["tolerance"]
                else 0, default=None)
    keep = {k for k in range(len(rows)) if k < head or k >= len(rows) - tail or not rows[k]["ok"] or k == worst}
    shown: list[dict | int] = []
    for k, row in enumerate(rows):
        if k in keep:
            shown.append(row)
        elif shown and isinstance(shown[-1], int):
            shown[-1] += 1
        else:
            shown.append(1)
    return shown


def report_text(report: dict, all_layers: bool = False) -> str:
    ref = report["reference"]
    lines = [f"npmobile verify: {report['model']} (model {report['model_name']!r}, written by {report['writer']})",
             f"inputs: {report['inputs']}",
             f"compared with: {report['reference_detail']}"]
    lines += [f"  {note}" for note in report["notes"]]
    width = max([len(row["name"]) for row in report["layers"]] + [5])
    lines.append("f64: npmobile's float64 reference run of the same graph (near-exact arithmetic); rel: max |diff| / "
                 "max(1, max |reference|)")
    lines.append("")
    lines.append(f"{'layer':<{width}}  {'class':<22} {'max |diff|':>10} {'rel':>9} {'tolerance':>9}      "
                 f"{'npmobile↔f64':>12} {ref + '↔f64':>12}")
    for row in shown_layers(report["layers"], all_layers):
        if isinstance(row, int):
            lines.append(f"{'…':<{width}}  ({row} more layer{'s' if row > 1 else ''}, every one ok; --all lists them)")
            continue
        mark = "ok" if row["ok"] else "BEYOND"
        lines.append(f"{row['name']:<{width}}  {row['class']:<22} {row['max_abs']:>10.2e} {row['rel']:>9.2e} "
                     f"{row['tolerance']:>9.1e} {mark:<6} {row['npmobile_vs_float64']:>12.2e} "
                     f"{row['reference_vs_float64']:>12.2e}")
    if report["skipped_layers"]:
        lines.append(f"not compared: {', '.join(report['skipped_layers'])}")
    lines.append("")
    worst = max(report["layers"], key=lambda r: r["max_abs"] / r["tolerance"] if r["tolerance"] else 0,
                default=None)
    first = report["first_layer_beyond_tolerance"]
    lines.append(f"first layer beyond tolerance: {first or 'none'}"
                 + (" (the layers after it inherit its difference)" if first else "")
                 + (f" (closest to it: {worst['name']}, {worst['max_abs']:.2e} of {worst['tolerance']:.1e})"
                    if worst and not first else ""))
    final = report["final"]
    lines.append(f"final output ({final['path']}): max |diff| {final['max_abs']:.2e}, rel {final['rel']:.2e}, "
                 f"tolerance {final['tolerance']:.1e}: {'ok' if final['ok'] else 'BEYOND'}; "
                 f"top-5 agree: {final['top5_agree']}")
    distances = ", ".join(f"{name} {value:.2e}" for name, value in report["float64"].items())
    lines.append(f"distance from the float64 reference (final output, max |diff|): {distances}")
    verdict = "within tolerance" if report["ok"] else "BEYOND tolerance"
    lines.append(f"verdict: {verdict} (exit {EXIT_OK if report['ok'] else EXIT_BEYOND})")
    return "\n".join(lines)
