"""The Keras functional graph as data.

``Graph.from_spec`` turns a ModelSpec (from a reader or an architecture builder) into a list of nodes
in an order where every node comes after its inputs. Each node is one Keras layer call and keeps the
layer's name, class and config, so Keras names stay addressable (``predict(x, outputs=[...])``).
Nested models are inlined: their layers become nodes of the outer graph under their own names, and
the nested model's name becomes an alias of its output.

Passes (npmobile/passes/) rewrite the node list; a node remembers in ``keras_names`` which Keras
layers it now stands for, so a fused node still answers to the name of every layer folded into it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from npmobile.errors import ModelFileError, UnsupportedLayerError
from npmobile.nodes import Input, Node, last_readers  # noqa: F401 (the graph's node types, re-exported)
from npmobile.ops import INPUT_LAYER, canonical_class, file_classes, is_input
from npmobile.spec import LayerSpec, ModelSpec, TensorRef

NESTED_MODEL_CLASSES = frozenset({"Functional", "Model", "Sequential"})


@dataclass
class Graph:
    name: str
    nodes: list[Node]
    inputs: list[str]
    outputs: list[str]
    input_shapes: dict[str, tuple[int | None, ...]]
    aliases: dict[str, str] = field(default_factory=dict)  # nested model name -> node of its output
    keras_version: int = 3
    source: str = ""

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> Graph:
        try:
            return _GraphBuilder(spec).build()
        except RecursionError:  # only nested models recurse: thousands of levels is a hostile file
            raise ModelFileError(f"{spec.source or spec.name}: nested models are nested too deeply") from None

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def resolve(self, name: str) -> str:
        """The node whose output is the output of the Keras layer (or nested model) called ``name``."""
        name = self.aliases.get(name, name)
        for node in self.nodes:
            if node.name == name:
                return node.name
        for node in self.nodes:
            if name in node.keras_names:
                return node.name
        raise KeyError(f"no layer named {name!r} in model {self.name!r} ({self._closest_names(name)})")

    def _closest_names(self, name: str) -> str:
        """'did you mean ...' with the closest layer names, or a few names when none is close."""
        import difflib

        names = list(dict.fromkeys([*self.aliases, *(k for n in self.nodes for k in (n.name, *n.keras_names))]))
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        if close:
            return "did you mean " + ", ".join(repr(c) for c in close) + "?"
        return "layers include " + ", ".join(n.name for n in self.nodes[:5]) + ", …"

    def consumers(self) -> dict[str, list[Node]]:
        users: dict[str, list[Node]] = {n.name: [] for n in self.nodes}
        for node in self.nodes:
            for inp in node.inputs:
                if isinstance(inp, str):
                    users[inp].append(node)
        return users


class _GraphBuilder:
    """Flattens a ModelSpec (and the ModelSpecs nested in it) into topologically ordered nodes."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.nodes: list[Node] = []
        self.aliases: dict[str, str] = {}
        self.taken: set[str] = set()

    def build(self) -> Graph:
        spec = self.spec
        inputs, input_shapes = [], {}
        outputs = self._inline(spec, outer_inputs=None, collect_inputs=(inputs, input_shapes))
        return Graph(
            name=spec.name,
            nodes=self.nodes,
            inputs=inputs,
            outputs=outputs,
            input_shapes=input_shapes,
            aliases=self.aliases,
            keras_version=spec.keras_version,
            source=spec.source,
        )

    def _fail(self, spec: ModelSpec, message: str) -> ModelFileError:
        return ModelFileError(f"{spec.source or spec.name}: {message}")

    def _inline(self, spec: ModelSpec, outer_inputs: list[str] | None, collect_inputs=None) -> list[str]:
        """Add the nodes of ``spec``; returns the node names of its outputs.

        ``outer_inputs``: for a nested model, the outer nodes that feed its inputs, in order.
        """
        layers = {layer.name: layer for layer in spec.layers}
        if len(layers) != len(spec.layers):
            raise self._fail(spec, "two layers share one name")
        # (layer name, call index) -> graph node name
        produced: dict[tuple[str, int], str] = {}
        if outer_inputs is not None:
            if len(outer_inputs) != len(spec.inputs):
                raise self._fail(spec, f"nested model {spec.name!r} takes {len(spec.inputs)} inputs, "
                                       f"called with {len(outer_inputs)}")
            for ref, outer in zip(spec.inputs, outer_inputs):
                produced[(ref.layer, ref.node_index)] = outer

        def visit(ref: TensorRef, wanted_by: str) -> str:
            # Depth-first with an explicit stack, not recursion: a long chain of layers (thousands, in
            # a hostile or just deep file) must not hit Python's recursion limit.
            visiting: set[tuple[str, int]] = set()
            stack = [(ref, wanted_by)]
            while stack:
                top, by = stack[-1]
                key = (top.layer, top.node_index)
                if key in produced:
                    stack.pop()
                    continue
                layer = layers.get(top.layer)
                if layer is None:
                    raise self._fail(spec, f"layer {by!r} takes input from {top.layer!r}, which is not in the model")
                missing = [a for a in self._call_inputs(spec, layer, top.node_index)
                           if (a.layer, a.node_index) not in produced]
                if not missing:
                    produced[key] = self._add_call(spec, layer, top.node_index, visit, collect_inputs)
                    visiting.discard(key)
                    stack.pop()
                    continue
                if key in visiting or any((a.layer, a.node_index) in visiting for a in missing):
                    raise self._fail(spec, f"layer {top.layer!r} is part of a cycle; a model must be acyclic")
                visiting.add(key)
                stack.extend((a, layer.name) for a in missing)
            return produced[(ref.layer, ref.node_index)]

        outputs = [visit(ref, "the model's outputs") for ref in spec.outputs]
        if collect_inputs is not None:
            # Inputs nobody reaches still belong to the model's signature.
            for ref in spec.inputs:
                visit(ref, "the model's inputs")
        return outputs

    def _call_inputs(self, spec: ModelSpec, layer: LayerSpec, call: int) -> list[TensorRef]:
        """The tensors call number ``call`` of ``layer`` takes (none for an input layer)."""
        if is_input(layer.class_name):
            return []
        if not 0 <= call < len(layer.inbound):
            raise self._fail(spec, f"layer {layer.name!r} is referenced as call {call} "
                                   f"but has {len(layer.inbound)} calls")
        return [a for a in layer.inbound[call].args if isinstance(a, TensorRef)]

    def _add_call(self, spec: ModelSpec, layer: LayerSpec, call: int, visit, collect_inputs) -> str:
        cls = canonical_class(layer.class_name)
        if is_input(cls):
            return self._add_input(spec, layer, collect_inputs)
        if not 0 <= call < len(layer.inbound):
            raise self._fail(spec, f"layer {layer.name!r} is referenced as call {call} "
                                   f"but has {len(layer.inbound)} calls")
        if cls not in NESTED_MODEL_CLASSES and layer.submodel is None:
            check_supported(layer, spec)  # before its arguments: a refused layer's may be anything
        args: list[Input] = []
        for arg in layer.inbound[call].args:
            args.append(visit(arg, layer.name) if isinstance(arg, TensorRef) else _constant(arg))

        if cls in NESTED_MODEL_CLASSES or layer.submodel is not None:
            if layer.submodel is None:
                raise self._fail(spec, f"nested model {layer.name!r} has no layers")
            sub_outputs = self._inline(layer.submodel, outer_inputs=[a for a in args if isinstance(a, str)])
            if len(sub_outputs) != 1:
                raise UnsupportedLayerError(
                    f"{spec.source or spec.name}: nested model {layer.name!r} has {len(sub_outputs)} outputs;"
                    " npmobile runs nested models with one output"
                )
            self.aliases[layer.name] = sub_outputs[0]
            return sub_outputs[0]

        name = self._unique(layer.name if call == 0 else f"{layer.name}_{call}")
        self.nodes.append(
            Node(
                name=name,
                op=cls,
                config=dict(layer.config),
                inputs=args,
                weights=dict(spec.weights.get(layer.name, {})),
            )
        )
        return name

    def _add_input(self, spec: ModelSpec, layer: LayerSpec, collect_inputs) -> str:
        if collect_inputs is None:
            raise self._fail(spec, f"input {layer.name!r} of nested model {spec.name!r} is not fed")
        config = layer.config
        shape = config.get("batch_shape") or config.get("batch_input_shape")
        if shape is None:
            raise self._fail(spec, f"input layer {layer.name!r} has no shape")
        name = self._unique(layer.name)
        self.nodes.append(Node(name=name, op=INPUT_LAYER, config=dict(config), inputs=[]))
        if name not in collect_inputs[0]:
            collect_inputs[0].append(name)
            collect_inputs[1][name] = tuple(shape)
        return name

    def _unique(self, name: str) -> str:
        # Keras names are unique within one model; a nested model may reuse an outer name.
        candidate, k = name, 1
        while candidate in self.taken:
            candidate = f"{name}_{k}"
            k += 1
        self.taken.add(candidate)
        return candidate


def _constant(value) -> float | tuple:
    return tuple(float(v) for v in value) if isinstance(value, (tuple, list)) else float(value)


def check_supported(layer: LayerSpec, spec: ModelSpec) -> None:
    """Refuse, with one clear line, any layer npmobile does not run: nothing from a file is executed."""
    from npmobile.ops.preprocessing import INSTEAD_OF_CODE, REFUSED

    where = f"{spec.source or spec.name}: layer {layer.name!r}"
    cls = canonical_class(layer.class_name)
    if cls == "Lambda":
        raise UnsupportedLayerError(
            f"{where} is a Lambda layer, which holds Python code; npmobile never executes code from a file "
            f"(rebuild the model with built-in layers; {INSTEAD_OF_CODE})"
        )
    if cls == "TFOpLambda":
        function = layer.config.get("function", "?")
        raise UnsupportedLayerError(
            f"{where} is a TFOpLambda calling {function!r}; npmobile runs only elementwise add, subtract, "
            f"multiply, divide and negate of one tensor with constants, and casts to float32 ({INSTEAD_OF_CODE})"
        )
    if cls in REFUSED:
        raise UnsupportedLayerError(f"{where} has class {layer.class_name!r}: {REFUSED[cls]}")
    if ">" in cls:  # Keras's "package>Name": a class registered by user code, never imported here
        raise UnsupportedLayerError(
            f"{where} has class {layer.class_name!r}, a custom class defined by user code; npmobile never runs "
            "code from a file (rebuild the model with built-in layers)"
        )
    if cls not in file_classes():  # every layer type with a record (npmobile.ops), and nothing else
        raise UnsupportedLayerError(
            f"{where} has class {layer.class_name!r}, which npmobile does not support "
            f"(supported: {', '.join([INPUT_LAYER, *file_classes()])})"
        )
