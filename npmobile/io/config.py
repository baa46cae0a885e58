"""Keras model configs (the JSON in a .h5's ``model_config`` or a .keras's config.json) -> ModelSpec.

Two dialects, one result:
- Keras 3: ``inbound_nodes`` is a list of calls ``{"args": [...], "kwargs": {...}}`` whose tensors are
  ``{"class_name": "__keras_tensor__", "config": {"keras_history": [layer, node, tensor]}}``; a merge
  layer gets one list of tensors; ``x + 3.0`` is a node of class "Add" with a float among its args.
- Keras 2 / tf_keras: ``inbound_nodes`` is a list of calls, each a list of
  ``[layer, node_index, tensor_index, kwargs]``; ``x + 3`` is a ``TFOpLambda`` with ``y`` in kwargs
  (``3 - x`` puts ``["_CONSTANT_VALUE", -1, 3.0]`` first and the tensor in ``y``);
  a nested model's own construction counts as its node 0, so calls of it are numbered from 1.
Constant operands are data: a number, or a per-channel vector (Keras 3's ``__tensor__`` / ``__numpy__``
values, tf_keras's ``y`` or ``bias`` lists), kept as a float or a tuple of floats.
Nothing in a config is executed: a Lambda layer anywhere in it is refused by name.
"""

from __future__ import annotations

from typing import Any

from npmobile.errors import ModelFileError, UnsupportedLayerError
from npmobile.ops import canonical_class
from npmobile.ops.preprocessing import INSTEAD_OF_CODE, REFUSED
from npmobile.spec import CallSpec, LayerSpec, ModelSpec, TensorRef

MODEL_CLASSES = ("Functional", "Model", "Sequential")
# Keras 3's preprocessing container: a chain of layers called as one layer (read like a Sequential).
PIPELINE_CLASS = "Pipeline"
# tf_keras TFOpLambda functions that are elementwise arithmetic, and the op they amount to
# (npmobile.ops.arithmetic). ``nn.bias_add`` is how tf_keras writes preprocess_input's mean subtraction.
TF_OP_LAMBDAS = {
    "__operators__.add": "Add",
    "math.add": "Add",
    "nn.bias_add": "Add",
    "__operators__.mul": "Multiply",
    "math.multiply": "Multiply",
    "__operators__.sub": "Subtract",
    "math.subtract": "Subtract",
    "__operators__.truediv": "TrueDivide",
    "math.truediv": "TrueDivide",
    "math.divide": "TrueDivide",
    "__operators__.neg": "Negative",
    "math.negative": "Negative",
    "cast": "Cast",
}
# The most values a constant operand may hold: a per-channel vector, never an image's worth.
MAX_CONSTANT_VALUES = 4096


def parse_model_config(config: dict, keras_version: int, source: str) -> ModelSpec:
    """A whole model config ({"class_name": ..., "config": {...}}) -> ModelSpec (no weights yet)."""
    try:
        return _parse_model(config, keras_version, source)
    except ModelFileError as error:
        if str(error).startswith(source):
            raise
        raise ModelFileError(f"{source}: {error}") from None
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as error:
        raise ModelFileError(f"{source}: the model config is malformed ({type(error).__name__}: {error})") from None


def _parse_model(config: dict, keras_version: int, source: str) -> ModelSpec:
    if not isinstance(config, dict) or "config" not in config:
        raise ModelFileError(f"{source}: the model config has no 'config' entry")
    class_name = config.get("class_name")
    body = config["config"]
    if class_name == "Sequential":
        return _parse_sequential(body, keras_version, source)
    if class_name not in ("Functional", "Model"):
        raise ModelFileError(f"{source}: the top-level model has class {class_name!r}; "
                             "npmobile reads Functional and Sequential models")
    layers = [_parse_layer(raw, keras_version, source) for raw in body["layers"]]
    model_classes = {layer.name for layer in layers if layer.class_name in MODEL_CLASSES}
    if keras_version < 3:
        _renumber_nested_calls(layers, model_classes)
    inputs = [_history_ref(ref) for ref in _ref_list(body["input_layers"])]
    outputs = [_history_ref(ref) for ref in _ref_list(body["output_layers"])]
    if keras_version < 3:
        outputs = [_shift(ref, model_classes) for ref in outputs]
    return ModelSpec(name=str(body.get("name", "model")), layers=layers, inputs=inputs, outputs=outputs,
                     keras_version=keras_version, source=source)


def _parse_sequential(body: dict, keras_version: int, source: str) -> ModelSpec:
    """A Sequential model is a chain: each layer takes the previous layer's output."""
    raw_layers = body["layers"] if isinstance(body, dict) else body
    layers: list[LayerSpec] = []
    previous: str | None = None
    for raw in raw_layers:
        layer = _parse_layer({**raw, "inbound_nodes": []}, keras_version, source)
        if previous is None and layer.class_name != "InputLayer":
            shape = layer.config.get("batch_input_shape") or layer.config.get("batch_shape") or (
                body.get("build_input_shape") if isinstance(body, dict) else None)
            if shape is None:
                raise ModelFileError(f"{source}: Sequential model {body.get('name')!r} has no input shape")
            input_name = f"{layer.name}_input"
            layers.append(LayerSpec(input_name, "InputLayer", {"batch_shape": list(shape)}, []))
            previous = input_name
        if layer.class_name != "InputLayer":
            layer.inbound = [CallSpec([TensorRef(previous)])]
        layers.append(layer)
        previous = layer.name
    if not layers:
        raise ModelFileError(f"{source}: Sequential model has no layers")
    return ModelSpec(name=str(body.get("name", "sequential")), layers=layers, inputs=[TensorRef(layers[0].name)],
                     outputs=[TensorRef(previous)], keras_version=keras_version, source=source)


def _parse_layer(raw: dict, keras_version: int, source: str) -> LayerSpec:
    class_name = _class_name(raw)
    config = raw.get("config") or {}
    if not isinstance(config, dict):
        raise ModelFileError(f"{source}: layer {raw.get('name')!r} ({class_name}) has a config that is not a mapping")
    name = str(raw.get("name") or config.get("name"))
    if not name or name == "None":
        raise ModelFileError(f"{source}: a layer of class {class_name} has no name")
    if class_name == "Lambda":
        # Refused wherever it is, even where no output depends on it: a file that holds code is never
        # passed on (``npmobile verify`` would hand it to Keras, and tf_keras unmarshals a Lambda's code).
        raise UnsupportedLayerError(f"{source}: layer {name!r} is a Lambda layer, which holds Python code; npmobile "
                                    f"never executes code from a file (rebuild the model with built-in layers; "
                                    f"{INSTEAD_OF_CODE})")
    if class_name == "GetItem":  # Keras 3's x[..., k] ('caffe' mode's channel flip): data, or refused by name
        class_name, config, calls = _get_item(name, raw.get("inbound_nodes", []))
        return LayerSpec(name=name, class_name=class_name, config=config, inbound=calls)
    try:
        calls = [_parse_call(node, keras_version) for node in raw.get("inbound_nodes", [])]
    except ModelFileError:
        if canonical_class(class_name) not in REFUSED:
            raise
        # A layer refused by name (caffe mode's GetItem takes an Ellipsis): its tensors are enough for the
        # graph to reach it and say why.
        calls = [_tensors_only(node) for node in raw.get("inbound_nodes", [])]
    submodel = None
    if class_name in MODEL_CLASSES:
        submodel = _parse_model({"class_name": class_name, "config": config}, keras_version, source)
        submodel.name = name
    elif class_name == PIPELINE_CLASS:
        submodel = _parse_pipeline(name, config, keras_version, source)
    elif class_name == "TFOpLambda":
        class_name, config = _tf_op_lambda(name, config, calls)
    elif class_name == "SlicingOpLambda" and all(call.kwargs.get("slice_spec") == CHANNEL_FLIP for call in calls):
        class_name, config = "ReverseChannels", {"name": name}  # x[..., ::-1]: 'caffe' mode's RGB -> BGR
    elif class_name == "RandomCrop":  # what its predict computes depends on the writer (npmobile.ops.preprocessing)
        config = {**config, "npmobile_keras_version": keras_version}
    return LayerSpec(name=name, class_name=class_name, config=config, inbound=calls, submodel=submodel)


def _parse_pipeline(name: str, config: dict, keras_version: int, source: str) -> ModelSpec:
    """Keras 3's Pipeline: its layers applied in turn, a chain like a Sequential without an input layer
    (the outer call feeds it, so its input's shape is never needed)."""
    raw_layers = config.get("layers")
    if not isinstance(raw_layers, list):
        raise ModelFileError(f"{source}: Pipeline {name!r} has no list of layers")
    input_name = f"{name}_input"
    layers = [LayerSpec(input_name, "InputLayer", {"batch_shape": [None, None, None, None]}, [])]
    for raw in raw_layers:
        layer = _parse_layer({**raw, "inbound_nodes": []}, keras_version, source)
        layer.inbound = [CallSpec([TensorRef(layers[-1].name)])]
        layers.append(layer)
    return ModelSpec(name=name, layers=layers, inputs=[TensorRef(input_name)], outputs=[TensorRef(layers[-1].name)],
                     keras_version=keras_version, source=source)


# tf_keras's slice_spec of x[..., ::-1], the channel flip of preprocess_input's 'caffe' mode.
CHANNEL_FLIP = [{"class_name": "__ellipsis__"}, {"start": None, "stop": None, "step": -1}]


def _get_item(name: str, nodes: list) -> tuple[str, dict, list[CallSpec]]:
    """Keras 3's ``x[..., k]`` (a GetItem node called with ``[tensor, [Ellipsis, k]]``) as the channel it
    takes; any other indexing keeps only its tensors, and the layer record refuses it by name."""
    indices, calls = set(), []
    for node in nodes:
        args = node.get("args", []) if isinstance(node, dict) else []
        tensor = args[0] if args and _is_tensor(args[0]) else None
        key = args[1] if len(args) == 2 else None
        if (tensor is not None and isinstance(key, list) and len(key) == 2 and isinstance(key[0], dict)
                and key[0].get("class_name") == "__ellipsis__" and isinstance(key[1], int)
                and not isinstance(key[1], bool)):
            indices.add(key[1])
        else:
            indices.add(None)
        calls.append(_tensors_only(node))
    if len(indices) == 1 and None not in indices:
        return "GetItem", {"name": name, "channel": indices.pop()}, calls
    return "GetItem", {"name": name}, calls


def _tf_op_lambda(name: str, config: dict, calls: list[CallSpec]) -> tuple[str, dict]:
    """A TFOpLambda that is elementwise arithmetic on one tensor (and constants) becomes the op it
    amounts to; any other stays a TFOpLambda, which the graph refuses by name."""
    op = TF_OP_LAMBDAS.get(config.get("function"))
    if op is None or not calls or any(len(call.tensors()) != 1 for call in calls):
        return "TFOpLambda", config
    if any(call.kwargs.get("data_format", "NHWC") != "NHWC" for call in calls):  # bias_add on channels first
        return "TFOpLambda", config
    if op == "Cast":
        if any(call.kwargs.get("dtype") != "float32" for call in calls):
            return "TFOpLambda", config
        return op, {"name": name, "dtype": "float32"}
    if op == "Negative":
        return (op, {"name": name}) if all(len(call.args) == 1 for call in calls) else ("TFOpLambda", config)
    if all(len(call.args) == 2 for call in calls):
        return op, {"name": name}
    return "TFOpLambda", config


def _class_name(raw: dict) -> str:
    """The layer's class, or ``"module>Class"`` when the file says user code defines it: a subclass of
    ReLU registered as "mypkg>ReLU" is not Keras's ReLU, so it must not run as one (the graph refuses
    any name with ">", as Keras 2 files already spell custom classes)."""
    class_name = str(raw["class_name"])
    registered, module = raw.get("registered_name"), raw.get("module")
    if isinstance(registered, str) and registered and registered != class_name:
        return registered if ">" in registered else f"{module}>{registered}"
    # Keras 3 names the module of every built-in class ("keras.layers"); user classes get None or theirs.
    if "module" in raw and not _keras_module(module):
        return f"{module or 'custom'}>{class_name}"
    return class_name


def _keras_module(module: Any) -> bool:
    """Keras's own modules, exactly: ``keras``, ``keras.*``, ``tf_keras``, ``tf_keras.*`` (not ``keras_evil``)."""
    return isinstance(module, str) and any(module == root or module.startswith(root + ".")
                                           for root in ("keras", "tf_keras"))


def _parse_call(node: Any, keras_version: int) -> CallSpec:
    if isinstance(node, dict):  # Keras 3
        args: list = []
        for arg in node.get("args", []):
            if isinstance(arg, list):  # a merge layer's list of tensors
                args.extend(_keras3_arg(a) for a in arg)
            else:
                args.append(_keras3_arg(arg))
        kwargs = {k: v for k, v in (node.get("kwargs") or {}).items() if not _is_tensor(v)}
        return CallSpec(args=args, kwargs=kwargs)
    # Keras 2: [[layer, node_index, tensor_index, kwargs], ...]; TFOpLambda calls drop one level:
    # [layer, node_index, tensor_index, kwargs].
    if node and isinstance(node[0], str):
        node = [node]
    args, kwargs = [], {}
    for entry in node:
        if entry[0] == "_CONSTANT_VALUE":  # tf_keras: a constant as the first operand (3 - x)
            args.append(_constant(entry[2]))
        else:
            args.append(TensorRef(str(entry[0]), int(entry[1]), int(entry[2])))
        if len(entry) > 3 and isinstance(entry[3], dict):
            kwargs.update(entry[3])
    # TFOpLambda puts the other operand of x + 3 in kwargs["y"] (a constant, or the tensor of 3 - x),
    # and nn.bias_add its vector in kwargs["bias"].
    for key in ("y", "bias"):
        if key not in kwargs:
            continue
        other = kwargs.pop(key)
        if _is_history(other):
            args.append(TensorRef(str(other[0]), int(other[1]), int(other[2])))
        else:
            args.append(_constant(other))
    return CallSpec(args=args, kwargs={k: v for k, v in kwargs.items() if k != "name"})


def _is_history(value: Any) -> bool:
    """A tf_keras tensor reference [layer, node_index, tensor_index]."""
    return (isinstance(value, list) and len(value) == 3 and isinstance(value[0], str)
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value[1:]))


def _constant(value: Any) -> float | tuple[float, ...]:
    """A constant operand as data: a number, or a per-channel vector (any leading axes of size 1, as
    Keras 3 writes preprocess_input's mean with shape (1, 1, 1, 3)) as a tuple of floats."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, list):
        flat = value
        while len(flat) == 1 and isinstance(flat[0], list):  # leading axes of size 1
            flat = flat[0]
        if (0 < len(flat) <= MAX_CONSTANT_VALUES
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat)):
            return tuple(float(v) for v in flat)
    raise ModelFileError(f"unsupported constant operand {str(value)[:80]!r} (npmobile reads numbers and "
                         "per-channel vectors)")


def _tensors_only(node: Any) -> CallSpec:
    """A Keras 3 call's tensor arguments, whatever else it holds."""
    args = node.get("args", []) if isinstance(node, dict) else []
    flat = [a for arg in args for a in (arg if isinstance(arg, list) else [arg])]
    return CallSpec(args=[_history_ref(a["config"]["keras_history"]) for a in flat if _is_tensor(a)])


def _is_tensor(value: Any) -> bool:
    return isinstance(value, dict) and value.get("class_name") == "__keras_tensor__"


def _keras3_arg(arg: Any):
    if _is_tensor(arg):
        return _history_ref(arg["config"]["keras_history"])
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return float(arg)
    if isinstance(arg, dict) and arg.get("class_name") in ("__tensor__", "__numpy__"):
        constant = arg.get("config") or {}
        if constant.get("dtype", "float32") not in ("float32", "float64", "int32", "int64"):
            raise ModelFileError(f"unsupported constant of dtype {constant.get('dtype')!r}")
        return _constant(constant.get("value"))
    raise ModelFileError(f"unsupported call argument {str(arg)[:80]!r}")


def _ref_list(refs: Any) -> list:
    """input_layers / output_layers: one [name, node, tensor] (Keras 3, single) or a list of them."""
    if isinstance(refs, list) and refs and isinstance(refs[0], str):
        return [refs]
    return list(refs)


def _history_ref(ref: Any) -> TensorRef:
    return TensorRef(str(ref[0]), int(ref[1]), int(ref[2]))


def _shift(ref: TensorRef, model_classes: set[str]) -> TensorRef:
    if ref.layer in model_classes and ref.node_index > 0:
        return TensorRef(ref.layer, ref.node_index - 1, ref.tensor_index)
    return ref


def _renumber_nested_calls(layers: list[LayerSpec], model_classes: set[str]) -> None:
    """In Keras 2 configs a nested model's node 0 is its own construction, not saved: calls of it are
    numbered from 1. Number them from 0, like every other layer's."""
    if not model_classes:
        return
    for layer in layers:
        for call in layer.inbound:
            call.args = [_shift(a, model_classes) if isinstance(a, TensorRef) else a for a in call.args]
