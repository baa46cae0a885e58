"""What a model costs: parameters and multiply-accumulates (MACs) per layer, from configs and shapes alone.

Nothing here runs the model. ``layer_costs(model)`` walks ``model.graph`` (the graph as Keras wrote it)
with the shapes from each layer record's ``output_shape`` (npmobile.ops) and counts, per layer:

- params: every weight the layer holds (BatchNorm's moving mean and variance included, as Keras counts);
- MACs, per image: the multiply-accumulates of convolutions (standard, depthwise, pointwise) and dense
  layers. A k x k convolution from C to C' channels producing an H x W map costs H * W * k * k * C * C'.
  BatchNorm, activations, adds, multiplies, pooling and padding are not counted: they cost O(outputs), not
  O(outputs * inputs), and BatchNorm folds into the convolution before it. This is the convention of the
  MobileNet papers and of the keras.applications tables (MobileNetV2 1.0 at 224: 300.8 M MACs), where the
  squeeze-excite 1x1 convolutions count as convolutions and biases are free.

For each depthwise layer it also works out what a standard convolution would cost instead: one with the
same input and output shape, and (the comparison the MobileNet paper makes) one standard k x k convolution
from the depthwise layer's C input channels straight to the C' output channels of the pointwise layer
that follows it: k*k*C*C' weights against k*k*C + C*C' for the depthwise + pointwise pair.

``step_costs`` counts FLOPs and bytes moved for the steps of an optimized plan (fused nodes), which
the profiler divides by measured times.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from npmobile.graph import Graph, Node
from npmobile.layers import infer_shapes
from npmobile.ops import is_input, layer_type
from npmobile.ops.common import pair, pixels

CONVENTION = (
    "MACs = multiply-accumulates per image of convolutions (standard, depthwise, pointwise, squeeze-excite) "
    "and dense layers; BatchNorm, activations, adds, pooling and padding are not counted. 1 MAC = 2 FLOPs."
)

# Block parts, in the order a MobileNet meets them ("conv": a k x k convolution past the stem).
PARTS = ("stem", "expand", "depthwise", "se", "project", "pointwise", "conv", "head", "classifier")


@dataclass(frozen=True)
class LayerCost:
    """One Keras layer's cost. MACs are per image; the ``*_standard_*`` fields are set on depthwise layers."""

    name: str
    op: str
    part: str
    output_shape: tuple
    params: int
    macs: int
    # A standard convolution with this depthwise layer's input and output shape (kernel weights only).
    standard_params: int | None = None
    standard_macs: int | None = None
    # The pointwise layer after this depthwise layer, and the pair against one standard conv C -> C'.
    pointwise: str | None = None
    pair_params: int | None = None
    pair_macs: int | None = None
    pair_standard_params: int | None = None
    pair_standard_macs: int | None = None
    kernel_size: tuple[int, int] | None = None  # depthwise layers: (kh, kw), C in and C' after the pointwise
    in_channels: int | None = None
    pair_channels: int | None = None

    @property
    def pair_saving(self) -> float | None:
        """How many times fewer MACs the depthwise + pointwise pair needs than one standard convolution."""
        if not self.pair_macs or self.pair_standard_macs is None:
            return None
        return self.pair_standard_macs / self.pair_macs


@dataclass(frozen=True)
class PartTotal:
    part: str
    layers: int
    params: int
    macs: int


# --------------------------------------------------------------------------------------------------
# One layer
# --------------------------------------------------------------------------------------------------


def node_params(node: Node) -> int:
    return sum(int(w.size) for w in node.weights.values())


def node_macs(node: Node, in_shape: tuple, out_shape: tuple) -> int:
    """Multiply-accumulates per image of one node (0 for layers the convention does not count).

    Works on Keras layers and on the fused nodes of an optimized plan (``SqueezeExcite``): each
    layer type's record (npmobile.ops) counts its own.
    """
    return layer_type(node.op).macs(node, in_shape, out_shape)


# --------------------------------------------------------------------------------------------------
# The whole model
# --------------------------------------------------------------------------------------------------


def with_input_size(graph: Graph, size: int | tuple[int, int] | None) -> Graph:
    """The same graph with unknown input height/width set (costs need concrete spatial sizes)."""
    if size is None:
        return graph
    h, w = (size, size) if isinstance(size, int) else size
    shapes = {}
    for name, shape in graph.input_shapes.items():
        shape = tuple(shape)
        if len(shape) == 4:
            shape = (shape[0], shape[1] or h, shape[2] or w, shape[3])
        shapes[name] = shape
    return Graph(graph.name, graph.nodes, graph.inputs, graph.outputs, shapes, graph.aliases,
                 graph.keras_version, graph.source)


def _is_convolution(node: Node) -> bool:
    """A standard convolution (Conv2D): the stem, an expand, project or pointwise layer, the head."""
    return layer_type(node.op).window == "convolution"


def _is_depthwise(node: Node) -> bool:
    return layer_type(node.op).window == "depthwise"


def _is_dense(node: Node) -> bool:
    return layer_type(node.op).kind(node) == "dense"


def _is_1x1(node: Node) -> bool:
    return _is_convolution(node) and pair(node.config.get("kernel_size", 1)) == (1, 1)


def _ends_feature_maps(node: Node) -> bool:
    """A global pooling or a Flatten: past the last one, the classifier."""
    record = layer_type(node.op)
    return bool(record.global_pool) or record.flattens


def _walk_forward(graph: Graph, start: Node, go_on: Callable[[Node, set[str]], bool],
                  most: int | None = None) -> tuple[list[Node], list[Node], bool]:
    """The layers after ``start``, breadth first through the layers that read each, every one once, in the order
    met; ``go_on(layer, met)`` says whether to walk on past a layer (``met``: the names met so far, ``start`` and
    ``layer`` included). Stops after a step that brings the names met to ``most``. Returns the layers met, those
    the walk stopped at, and whether it ran out of layers (rather than out of ``most``)."""
    readers = graph.consumers()
    met, frontier = {start.name}, [start.name]
    reached: list[Node] = []
    stopped: list[Node] = []
    while frontier and (most is None or len(met) < most):
        following = []
        for name in frontier:
            for reader in readers.get(name, []):
                if reader.name in met:
                    continue
                met.add(reader.name)
                reached.append(reader)
                if go_on(reader, met):
                    following.append(reader.name)
                else:
                    stopped.append(reader)
        frontier = following
    return reached, stopped, not frontier


def _scales_a_map(node: Node, met: set[str]) -> bool:
    """A multiply with an input from outside the layers met: where a squeeze-excite gate scales the feature map."""
    outside = [i for i in node.inputs if isinstance(i, str) and i not in met]
    return layer_type(node.op).multiplies and bool(outside)


def _squeeze_excite_nodes(graph: Graph) -> set[str]:
    """The layers of every squeeze-excite gate: from a global pooling forward (its 1x1 convolutions and
    activations) to the multiply that scales a feature map not computed in the gate."""
    gates: set[str] = set()
    for pool in (n for n in graph.nodes if layer_type(n.op).global_pool):
        branch, scaling, ended = _walk_forward(graph, pool, lambda node, met: not _scales_a_map(node, met), most=32)
        if scaling and ended:
            gates |= {pool.name, *(node.name for node in branch)}
    return gates


def _parts(graph: Graph) -> dict[str, str]:
    """Every node's part, from the graph's structure and what each layer is, never from its name (a model
    built by hand has Keras's automatic names, conv2d_3 and re_lu_7; torchvision's are module paths).

    Depthwise layers cut the network into segments. Before the first: the stem (a 1x1 convolution after the
    stem's first convolution expands for the first depthwise layer). Between two depthwise layers, one 1x1
    convolution is the pointwise half of a separable pair (MobileNet V1); two or more are a projection, then
    expansions (an inverted residual block, V2/V3). After the last: its pointwise or projection layer, then
    the head; past the last global pooling, the last layer with weights is the classifier (and any Dense).
    Squeeze-excite gates are found by shape (_squeeze_excite_nodes). Layers without weights take their
    input's part (the input computed last); padding takes the part of the convolution it pads for."""
    nodes = graph.nodes
    gates = _squeeze_excite_nodes(graph)
    depthwise = [k for k, n in enumerate(nodes) if _is_depthwise(n)]
    pools = [k for k, n in enumerate(nodes) if _ends_feature_maps(n) and n.name not in gates]
    last_pool = pools[-1] if pools and (not depthwise or pools[-1] > depthwise[-1]) else len(nodes)
    # The layers whose MACs are counted (convolutions, dense layers).
    weighted = [k for k, n in enumerate(nodes) if layer_type(n.op).counts_macs and n.name not in gates]
    parts: dict[str, str] = {name: "se" for name in gates}

    bounds = [-1, *depthwise, last_pool]
    segments = [[k for k in weighted if lo < k < hi and _is_convolution(nodes[k])]
                for lo, hi in zip(bounds, bounds[1:])]
    first = segments[0]
    inverted = any(sum(map(_is_1x1, (nodes[k] for k in seg))) >= 2 for seg in segments[1:-1]) or any(
        _is_1x1(nodes[k]) for k in first[1:])
    for k in first:
        parts[nodes[k].name] = "expand" if _is_1x1(nodes[k]) and k != first[0] else "stem"
    for index, seg in enumerate(segments[1:], start=1):
        last = index == len(segments) - 1
        ones = [k for k in seg if _is_1x1(nodes[k])]
        for k in seg:
            if not _is_1x1(nodes[k]):
                parts[nodes[k].name] = "head" if last else "conv"
            elif k == ones[0]:
                parts[nodes[k].name] = "project" if inverted and (len(ones) > 1 or last) else "pointwise"
            else:
                parts[nodes[k].name] = "head" if last else "expand"
    for k in depthwise:
        parts[nodes[k].name] = "depthwise"
    after = [k for k in weighted if k > last_pool]
    for k in after:
        parts[nodes[k].name] = "classifier" if k == after[-1] or _is_dense(nodes[k]) else "head"
    for k in weighted:  # layers with weights the rules above did not place (Dense in the middle, ...)
        parts.setdefault(nodes[k].name, "head" if k > last_pool else "conv")
    if last_pool < len(nodes):
        parts.setdefault(nodes[last_pool].name, "head")

    consumers = graph.consumers()
    order = {n.name: k for k, n in enumerate(nodes)}
    for node in nodes:
        if node.name in parts:
            continue
        if is_input(node.op):
            parts[node.name] = "input"
            continue
        # The input computed last: a residual add closes the block of its branch, not of its shortcut.
        sources = sorted((order[i], parts[i]) for i in node.inputs if isinstance(i, str) and i in parts)
        parts[node.name] = "stem" if not sources or sources[-1][1] == "input" else sources[-1][1]
    for node in reversed(nodes):  # padding belongs to the convolution it pads for
        users = consumers.get(node.name, [])
        if layer_type(node.op).pads and len(users) == 1:
            parts[node.name] = parts[users[0].name]
    return parts


def _next_pointwise(graph: Graph, start: Node) -> Node | None:
    """The first 1x1 convolution after ``start``, walking forward through layers that keep channels
    (BatchNorm, activations, padding, the squeeze-excite multiply). The squeeze-excite branch stops at
    its pooling, so its 1x1 convolutions are never taken for the block's pointwise layer."""

    def keeps_channels(node: Node, met: set[str]) -> bool:
        record = layer_type(node.op)  # not a convolution, a dense layer, a pooling or a reshape
        return not (record.counts_macs or record.global_pool or record.view)

    _, stopped, _ = _walk_forward(graph, start, keeps_channels)
    return next((node for node in stopped if _is_1x1(node)), None)


def layer_costs(model, input_size: int | tuple[int, int] | None = None) -> list[LayerCost]:
    """Params and MACs of every layer of ``model`` (a npmobile Model), in graph order.

    ``input_size`` fills in an unknown input height/width (a model built with input_shape=(None, None, 3));
    MACs need concrete sizes, so without it such a model raises ValueError.
    """
    graph = with_input_size(model.graph, input_size)
    shapes = infer_shapes(graph, check=False) if input_size is not None else model.shapes
    for node in graph.nodes:
        if not is_input(node.op) and any(d is None for d in shapes[node.name][1:]):
            raise ValueError(f"model {graph.name!r} has an unknown input size {graph.input_shapes[graph.inputs[0]]};"
                             " give an input size to count MACs")
    parts = _parts(graph)
    costs = []
    for node in graph.nodes:
        if is_input(node.op):
            continue
        ins = [shapes[i] for i in node.inputs if isinstance(i, str)]
        out = shapes[node.name]
        extra = {}
        if _is_depthwise(node):
            extra = _depthwise_comparison(graph, shapes, node, ins[0], out)
        costs.append(LayerCost(node.name, node.op, parts[node.name], out, node_params(node),
                               node_macs(node, ins[0], out), **extra))
    return costs


def _depthwise_comparison(graph: Graph, shapes: dict, node: Node, in_shape: tuple, out_shape: tuple) -> dict:
    kh, kw = pair(node.config["kernel_size"])
    c, c_out, positions = in_shape[-1], out_shape[-1], pixels(out_shape)
    extra = {"standard_params": kh * kw * c * c_out, "standard_macs": positions * kh * kw * c * c_out,
             "kernel_size": (kh, kw), "in_channels": c}
    pointwise = _next_pointwise(graph, node)
    if pointwise is not None and pixels(shapes[pointwise.name]) == positions:
        c_next = shapes[pointwise.name][-1]
        extra.update(
            pointwise=pointwise.name,
            pair_channels=c_next,
            pair_params=kh * kw * c_out + c_out * c_next,
            pair_macs=positions * (kh * kw * c_out + c_out * c_next),
            pair_standard_params=kh * kw * c * c_next,
            pair_standard_macs=positions * kh * kw * c * c_next,
        )
    return extra


def part_totals(costs: list[LayerCost]) -> list[PartTotal]:
    """Params and MACs summed per block part, in PARTS order (parts a model lacks are left out)."""
    totals: dict[str, list[int]] = {}
    for cost in costs:
        t = totals.setdefault(cost.part, [0, 0, 0])
        t[0] += 1
        t[1] += cost.params
        t[2] += cost.macs
    order = [p for p in PARTS if p in totals] + [p for p in totals if p not in PARTS]
    return [PartTotal(p, *totals[p]) for p in order]


def total_macs(costs: list[LayerCost]) -> int:
    return sum(c.macs for c in costs)


def total_params(costs: list[LayerCost]) -> int:
    return sum(c.params for c in costs)


# --------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------


def millions(n: int | float, digits: int = 1) -> str:
    """300_774_272 -> '300.8 M' (the way the papers quote MACs and params)."""
    return f"{n / 1e6:.{digits}f} M"


def _shape_text(shape: tuple) -> str:
    return "(" + ", ".join("None" if d is None else str(d) for d in shape) + ")"


def costs_text(model, costs: list[LayerCost], line_length: int = 110) -> str:
    """The ``npmobile summary --costs`` table: one row per layer, a comparison under every depthwise
    layer, subtotals per block part, totals, and the counting convention."""
    name_w, part_w, shape_w, num_w = 40, 11, 22, 12
    rule = "─" * line_length
    head = f"{'Layer (type)':<{name_w}}{'Part':<{part_w}}{'Output Shape':<{shape_w}}{'Params':>{num_w}}{'MACs':>{16}}"
    lines = [f'Costs of "{model.name}" (per image)', CONVENTION, rule, head, "━" * line_length]
    for c in costs:
        label = f"{c.name} ({c.op})"
        if len(label) > name_w - 1:
            label = label[: name_w - 2] + "…"
        lines.append(f"{label:<{name_w}}{c.part:<{part_w}}{_shape_text(c.output_shape):<{shape_w}}"
                     f"{c.params:>{num_w},}{c.macs:>{16},}")
        if c.standard_macs is not None:
            lines.extend(_depthwise_notes(c))
    lines.append(rule)
    lines.append(f"{'Part':<{name_w}}{'Layers':<{part_w}}{'':<{shape_w}}{'Params':>{num_w}}{'MACs':>{16}}"
                 f"{'share':>8}")
    total_m, total_p = total_macs(costs), total_params(costs)
    for t in part_totals(costs):
        share = f"{100 * t.macs / total_m:.1f}%" if total_m else "-"
        lines.append(f"{t.part:<{name_w}}{t.layers:<{part_w}}{'':<{shape_w}}{t.params:>{num_w},}{t.macs:>{16},}"
                     f"{share:>8}")
    lines += [rule,
              f" Total params: {total_p:,} ({millions(total_p, 2)})",
              f" Total MACs:   {total_m:,} ({millions(total_m)}, {2 * total_m / 1e9:.2f} GFLOPs)"]
    dw = [c for c in costs if c.pair_macs is not None]
    if dw:
        pair = sum(c.pair_macs for c in dw)
        standard = sum(c.pair_standard_macs for c in dw)
        lines.append(f" Depthwise + pointwise pairs: {millions(pair)} MACs; as standard convolutions they would "
                     f"need {millions(standard)} ({standard / pair:.1f}x more)")
    lines.append(rule)
    return "\n".join(lines)


def _depthwise_notes(c: LayerCost) -> list[str]:
    kh, kw = c.kernel_size
    c_mid = c.output_shape[-1]
    notes = [f"    = standard {kh}x{kw} conv {c.in_channels}→{c_mid}: {c.standard_params:,} weights, "
             f"{millions(c.standard_macs)} MACs ({c.standard_macs / max(c.macs, 1):.1f}x this layer)"]
    if c.pair_macs is not None:
        notes.append(f"    + {c.pointwise} 1x1 {c_mid}→{c.pair_channels}: {c.pair_params:,} weights, "
                     f"{millions(c.pair_macs)} MACs; one {kh}x{kw} conv {c.in_channels}→{c.pair_channels}: "
                     f"{c.pair_standard_params:,} weights, {millions(c.pair_standard_macs)} MACs "
                     f"({c.pair_saving:.1f}x more)")
    return notes
