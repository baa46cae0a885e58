"""Where the time goes: per-step FLOPs, bytes moved and arithmetic intensity, against a measured roofline.

``Model.profile`` times each step of the optimized plan (BatchNorm folded, activations and residual adds
fused into the convolutions). For each step this module counts

- FLOPs: 2 per multiply-accumulate for convolutions, dense layers and squeeze-excite (npmobile.costs),
  and about 1 per output element for elementwise steps and pooling (adds, activations, rescaling);
- bytes moved: the float32 inputs + output + weights, each read or written once. That is the least
  traffic the step can have; real kernels move more when data falls out of cache.
- arithmetic intensity = FLOPs / bytes.

A CPU core can do many FLOPs in the time it fetches one byte from memory. The ratio of its peak
GFLOP/s to its memory bandwidth in GB/s is the machine balance (FLOPs per byte): a step whose intensity
is below it waits on memory (memory-bound), one above it waits on arithmetic (compute-bound). That is
the roofline model: attainable GFLOP/s = min(peak, intensity * bandwidth).

``measure_machine`` estimates peak and bandwidth with two quick probes (a float32 matmul through
NumPy's BLAS, which the engine's 1x1 convolutions also use, and a large array copy).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from npmobile.costs import node_macs, with_input_size
from npmobile.graph import Graph, Node
from npmobile.layers import infer_shapes
from npmobile.ops import layer_type

_NO_WORK = ("InputLayer", "ZeroPadding2D", "Reshape", "Flatten", "Dropout")


@dataclass(frozen=True)
class StepCost:
    name: str
    op: str
    kind: str  # "depthwise", "pointwise" (1x1 conv), "conv" (k x k conv), "expand+dw", "dense", "se", "other"
    flops: int
    bytes: int
    macs: int = 0  # the multiply-accumulates npmobile.costs counts for this step

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes if self.bytes else 0.0


@dataclass(frozen=True)
class Machine:
    peak_gflops: float  # float32 matmul, GFLOP/s
    bandwidth_gbs: float  # large copy, GB/s (bytes read + bytes written per second)

    @property
    def balance(self) -> float:
        """FLOPs per byte at which a step stops waiting on memory."""
        return self.peak_gflops / self.bandwidth_gbs

    def attainable_gflops(self, intensity: float) -> float:
        return min(self.peak_gflops, intensity * self.bandwidth_gbs)


@dataclass(frozen=True)
class StepProfile:
    cost: StepCost
    seconds: float
    keras_names: tuple[str, ...]

    @property
    def gflops(self) -> float:
        return self.cost.flops / self.seconds / 1e9 if self.seconds > 0 else 0.0


# --------------------------------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------------------------------


def step_kind(node: Node) -> str:
    """The bucket a step's time goes in: pointwise, depthwise, conv, expand+dw, dense, se or other (its record's
    kind)."""
    return layer_type(node.op).kind(node)


def _elements(shape: tuple, batch: int) -> int:
    return batch * int(np.prod([d for d in shape[1:]], dtype=np.int64))


def step_cost(node: Node, in_shapes: list[tuple], out_shape: tuple, batch: int = 1) -> StepCost:
    """FLOPs and compulsory float32 traffic of one plan step (a node of the optimized graph)."""
    macs = node_macs(node, in_shapes[0], out_shape) if in_shapes else 0
    out_elems = _elements(out_shape, batch)
    in_elems = sum(_elements(s, batch) for s in in_shapes)
    if macs:
        flops = 2 * macs * batch
    elif node.op in _NO_WORK:
        flops = 0
    elif node.op in ("GlobalAveragePooling2D", "GlobalMaxPooling2D", "AveragePooling2D", "MaxPooling2D"):
        flops = in_elems
    else:  # elementwise: about one operation per output element
        flops = out_elems * max(len(in_shapes) - 1, 1)
    if node.op == "SqueezeExcite":  # pool, gate and rescale every element: ~3 passes over the map
        flops += 3 * out_elems
    weights = sum(int(w.size) for w in node.weights.values())
    return StepCost(node.name, node.op, step_kind(node), int(flops), 4 * (in_elems + out_elems + weights),
                    macs * batch)


def plan_costs(plan: Graph, input_shape: tuple) -> list[StepCost]:
    """StepCost of every step of an optimized graph for one input shape (N, H, W, C)."""
    graph = with_input_size(plan, tuple(input_shape[1:3]))
    shapes = infer_shapes(graph, check=False)
    batch = int(input_shape[0])
    out = []
    for node in graph.nodes:
        if node.op == "InputLayer":
            continue
        ins = [shapes[i] for i in node.inputs if isinstance(i, str)]
        out.append(step_cost(node, ins, shapes[node.name], batch))
    return out


def profile_steps(model, rows: list[dict], input_shape: tuple) -> list[StepProfile]:
    """Join ``Model.profile`` rows (seconds per step) with the steps' costs, by node name."""
    costs = {c.name: c for c in plan_costs(model.optimized_graph(), input_shape)}
    return [StepProfile(costs[r["name"]], float(r["seconds"]), tuple(r["keras_names"])) for r in rows
            if r["name"] in costs]


def bytes_per_mac(model, size: int | tuple[int, int]) -> float:
    """Compulsory bytes moved per multiply-accumulate over the whole optimized plan, batch 1."""
    h, w = (size, size) if isinstance(size, int) else size
    steps = plan_costs(model.optimized_graph(), (1, h, w, model.input_shape[-1]))
    macs = sum(s.macs for s in steps)
    return sum(s.bytes for s in steps) / macs if macs else 0.0


# --------------------------------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------------------------------


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: page in the arrays, start BLAS threads
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure_machine(matrix: int = 768, copy_mb: int = 64, repeats: int = 3) -> Machine:
    """Peak float32 GFLOP/s (an n x n matmul through NumPy's BLAS) and memory bandwidth (copying an
    array much larger than the caches). The best of ``repeats`` runs each; a few tens of ms in all."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((matrix, matrix), dtype=np.float32)
    b = rng.standard_normal((matrix, matrix), dtype=np.float32)
    c = np.empty_like(a)
    seconds = _best_seconds(lambda: np.matmul(a, b, out=c), repeats)
    peak = 2 * matrix**3 / seconds / 1e9
    n = copy_mb * 2**20 // 4
    src = np.ones(n, np.float32)
    dst = np.empty_like(src)
    seconds = _best_seconds(lambda: np.copyto(dst, src), repeats)
    bandwidth = 2 * src.nbytes / seconds / 1e9  # every byte is read once and written once
    return Machine(peak, bandwidth)


# --------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------


def bound(step: StepProfile | StepCost, machine: Machine) -> str:
    cost = step.cost if isinstance(step, StepProfile) else step
    if cost.flops == 0:
        return "-"
    return "memory" if cost.intensity < machine.balance else "compute"


WHY_V2_IS_SLOWER_PER_MAC = """\
Why MobileNetV2 can be slower than V1 per MAC on a CPU:
  MACs count arithmetic, but a CPU also has to move every tensor through memory. V1's 1x1 convolutions
  map wide tensors to wide tensors (up to 1024 channels): big matrix products that reuse each loaded
  number many times (high intensity, compute-bound) and carry 95% of its MACs. V2 saves MACs by keeping
  the tensors between blocks narrow (16-320 channels) and expanding them 6x inside each block: the
  expanded tensor is written by the expand conv, read and written by the depthwise conv (9 MACs per
  element: memory-bound) and read again by the projection. So V2 moves more bytes per MAC, runs three
  convolutions per block instead of two (plus residual adds), each with fixed per-call overhead, and its
  narrow 1x1 convolutions are small matrix products that reach a lower fraction of the peak. Half the
  MACs is therefore not half the time."""


def profile_text(model, steps: list[StepProfile], machine: Machine, image: str, input_shape: tuple,
                 repeats: int, v1_bytes_per_mac: float | None = None) -> str:
    """The ``npmobile profile`` report: one row per plan step, totals by kind, and the explanation."""
    total_s = sum(s.seconds for s in steps) or 1e-12
    total_flops = sum(s.cost.flops for s in steps)
    shape = input_shape
    lines = [
        f'Profile of "{model.name}" on {image} (median of {repeats} runs, batch 1, {len(steps)} steps of the '
        "fused plan)",
        f"Machine: peak {machine.peak_gflops:.1f} GFLOP/s (float32 matmul), bandwidth {machine.bandwidth_gbs:.1f}"
        f" GB/s (large copy) -> balance {machine.balance:.1f} FLOP/byte.",
        "  A step whose intensity (FLOPs per byte moved: float32 inputs + output + weights) is below the balance",
        "  waits on memory (memory-bound); above it, on arithmetic (compute-bound). Small inputs fit in the",
        "  caches, which are faster than the measured memory bandwidth: expect steps above the roof there.",
        "",
        f"{'Step (op)':<44}{'ms':>8}{'time%':>7}{'MFLOP':>9}{'GFLOP/s':>9}{'MB moved':>10}{'FLOP/B':>8}  bound",
        "─" * 104,
    ]
    for s in steps:
        label = f"{s.cost.name} ({s.cost.op})"
        if len(label) > 43:
            label = label[:42] + "…"
        lines.append(f"{label:<44}{s.seconds * 1e3:>8.3f}{100 * s.seconds / total_s:>6.1f}%"
                     f"{s.cost.flops / 1e6:>9.2f}{s.gflops:>9.2f}{s.cost.bytes / 1e6:>10.3f}"
                     f"{s.cost.intensity:>8.2f}  {bound(s, machine)}")
    lines += ["─" * 104,
              f"{'Total':<44}{total_s * 1e3:>8.2f}{100:>6.1f}%{total_flops / 1e6:>9.1f}"
              f"{total_flops / total_s / 1e9:>9.2f}{sum(s.cost.bytes for s in steps) / 1e6:>10.2f}",
              "", "By kind of step:"]
    for kind in ("conv", "depthwise", "pointwise", "expand+dw", "se", "dense", "other"):
        group = [s for s in steps if s.cost.kind == kind]
        if not group:
            continue
        secs = sum(s.seconds for s in group)
        flops = sum(s.cost.flops for s in group)
        nbytes = sum(s.cost.bytes for s in group)
        memory = sum(1 for s in group if bound(s, machine) == "memory")
        lines.append(f"  {kind:<10} {len(group):>3} steps  {100 * flops / max(total_flops, 1):5.1f}% of FLOPs  "
                     f"{100 * secs / total_s:5.1f}% of time  {flops / secs / 1e9 if secs else 0:6.2f} GFLOP/s  "
                     f"intensity {flops / nbytes if nbytes else 0:6.2f} FLOP/B  {memory}/{len(group)} memory-bound")
    if any(s.cost.kind == "expand+dw" for s in steps):
        lines += ["  (expand+dw: an expand 1x1 layer and the depthwise layer that reads it, run as one step: the",
                  "  wide tensor between them is made a few rows at a time and never written whole.)"]
    ours = sum(s.cost.bytes for s in steps) / max(sum(s.cost.macs for s in steps), 1)
    lines += ["", f"Bytes moved per MAC: {ours:.3f} for this model at {shape[1]}x{shape[2]}"
              + (f", {v1_bytes_per_mac:.3f} for MobileNet V1 1.0 at the same size." if v1_bytes_per_mac else "."),
              "", WHY_V2_IS_SLOWER_PER_MAC]
    return "\n".join(lines)
