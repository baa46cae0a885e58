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

``measure_machine`` measures the roof with the engine's own kind of code, on as many threads as the
steps ran: the peak is the best GFLOP/s of its pointwise (1x1 convolution) kernel on products small enough
to stay in the caches; the bandwidth the best bytes per second of an elementwise add (two reads, one write
per element) compiled by Numba like the kernels, on arrays that stay in the caches; a second, lower
bandwidth on arrays far larger than the caches is drawn for reference. A roof measured with another
library (NumPy's matmul, ``np.copyto``) is not the engine's: its steps then sit above it.
bench/kernels.py prints the same measurement.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from npmobile.costs import node_macs, with_input_size
from npmobile.graph import Graph, Node
from npmobile.layers import infer_shapes
from npmobile.ops import is_input, layer_type


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
    peak_gflops: float  # the engine's pointwise kernel on a cache-resident product, GFLOP/s
    bandwidth_gbs: float  # a vectorized Numba add on cache-resident arrays, GB/s (bytes read + written)
    threads: int = 1
    memory_gbs: float = 0.0  # the same add on arrays far larger than the caches (0: not measured)

    @property
    def balance(self) -> float:
        """FLOPs per byte at which a step stops waiting on memory."""
        return self.peak_gflops / self.bandwidth_gbs

    def attainable_gflops(self, intensity: float) -> float:
        return min(self.peak_gflops, intensity * self.bandwidth_gbs)

    def best(self, other: Machine) -> Machine:
        """The higher roof of two measurements (a busy neighbour only ever lowers one)."""
        return Machine(max(self.peak_gflops, other.peak_gflops), max(self.bandwidth_gbs, other.bandwidth_gbs),
                       self.threads, max(self.memory_gbs, other.memory_gbs))

    def describe(self) -> str:
        """What the roof is, in one line (the chart and the report say it)."""
        text = (f"peak {self.peak_gflops:.1f} GFLOP/s (npmobile's pointwise kernel, cache-resident product), "
                f"bandwidth {self.bandwidth_gbs:.1f} GB/s (a Numba add, cache-resident arrays)")
        if self.memory_gbs:
            text += f", {self.memory_gbs:.1f} GB/s on {_LARGE_MB} MB arrays"
        return text + f"; {self.threads} thread{'s' if self.threads > 1 else ''}"


@dataclass(frozen=True)
class StepProfile:
    cost: StepCost
    seconds: float  # the median over the runs
    keras_names: tuple[str, ...]
    spread: float = 0.0  # the interquartile range of the runs' seconds

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
    record = layer_type(node.op)
    macs = node_macs(node, in_shapes[0], out_shape) if in_shapes else 0
    out_elems = _elements(out_shape, batch)
    in_elems = sum(_elements(s, batch) for s in in_shapes)
    if macs:
        flops = 2 * macs * batch
    elif record.moves_values_only(node):
        flops = 0
    elif record.global_pool or record.window == "pool":  # pooling: one operation per input element
        flops = in_elems
    else:  # elementwise: about one operation per output element
        flops = out_elems * max(len(in_shapes) - 1, 1)
    kind = step_kind(node)
    if kind == "se":  # pool, gate and rescale every element: ~3 passes over the map
        flops += 3 * out_elems
    weights = sum(int(w.size) for w in node.weights.values())
    return StepCost(node.name, node.op, kind, int(flops), 4 * (in_elems + out_elems + weights), macs * batch)


def plan_costs(plan: Graph, input_shape: tuple) -> list[StepCost]:
    """StepCost of every step of an optimized graph for one input shape (N, H, W, C)."""
    graph = with_input_size(plan, tuple(input_shape[1:3]))
    shapes = infer_shapes(graph, check=False)
    batch = int(input_shape[0])
    out = []
    for node in graph.nodes:
        if is_input(node.op):
            continue
        ins = [shapes[i] for i in node.inputs if isinstance(i, str)]
        out.append(step_cost(node, ins, shapes[node.name], batch))
    return out


def profile_steps(model, rows: list[dict], input_shape: tuple) -> list[StepProfile]:
    """Join ``Model.profile`` rows (seconds per step) with the steps' costs, by node name."""
    costs = {c.name: c for c in plan_costs(model.optimized_graph(), input_shape)}
    return [StepProfile(costs[r["name"]], float(r["seconds"]), tuple(r["keras_names"]),
                        interquartile_range(r.get("runs", [r["seconds"]]))) for r in rows if r["name"] in costs]


def interquartile_range(values) -> float:
    """The spread of ``values``: 75th minus 25th percentile (0 for one value). Unlike the standard deviation,
    one run slowed down by a neighbour moves it little, several do: it says whether the median can be trusted."""
    q1, q3 = np.percentile(np.asarray(values, np.float64), [25, 75])
    return float(q3 - q1)


def run_totals(rows: list[dict]) -> list[float]:
    """Each run's total seconds over all steps (``Model.profile`` rows)."""
    runs = [r.get("runs", [r["seconds"]]) for r in rows]
    return [float(sum(run[k] for run in runs)) for k in range(min(len(run) for run in runs))] if runs else []


NOISY = 0.2  # an interquartile range above this fraction of the median: the machine was busy


def noise_warning(rows: list[dict], steps: list[StepProfile]) -> str | None:
    """One line when the runs disagree (total's spread over NOISY of its median), naming how many of the steps
    that matter (1% of the time or more) disagree too; None when the numbers can be trusted."""
    totals = run_totals(rows)
    if len(totals) < 2:
        return None
    median = float(np.median(totals))
    spread = interquartile_range(totals)
    total = sum(s.seconds for s in steps) or 1e-12
    big = [s for s in steps if s.seconds >= 0.01 * total]
    noisy = [s for s in big if s.seconds > 0 and s.spread > NOISY * s.seconds]
    if spread <= NOISY * median and not noisy:
        return None
    return (f"warning: the runs disagree (whole runs: median {median * 1e3:.2f} ms, interquartile range "
            f"{spread * 1e3:.2f} ms = {100 * spread / median:.0f}% of the median; {len(noisy)} of {len(big)} main "
            "steps over "
            f"{100 * NOISY:.0f}%): the machine is busy; run again with more --repeats or fewer --threads")


def bytes_per_mac(model, size: int | tuple[int, int]) -> float:
    """Compulsory bytes moved per multiply-accumulate over the whole optimized plan, batch 1."""
    h, w = (size, size) if isinstance(size, int) else size
    steps = plan_costs(model.optimized_graph(), (1, h, w, model.input_shape[-1]))
    macs = sum(s.macs for s in steps)
    return sum(s.bytes for s in steps) / macs if macs else 0.0


# --------------------------------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------------------------------


# Products [rows, k] x [k, n] of MobileNet's 1x1 shapes small enough to stay in a core's L2 (A, W and the
# output under 1 MB together); the peak is the best of them, since the best shape is the kernel's limit.
PEAK_PRODUCTS = ((196, 256, 256), (256, 128, 128), (64, 512, 256), (784, 64, 128))
CACHED_FLOATS = (8192, 32768, 131072)  # per thread and array: 96 KB to 1.5 MB per core in all, within L2
_LARGE_MB = 192  # three 64 MB arrays: memory, not caches, on most machines


def _best_seconds(call, budget: float = 0.15, most: int = 300) -> float:
    """The shortest time of one ``call()`` over about ``budget`` seconds of calls (after a warm-up, which
    also compiles). One call per sample and the best sample, as a step is timed one call at a time: on a
    busy machine a sample of many calls always contains a stolen time slice, a single call often does not."""
    call()
    best, spent, count = float("inf"), 0.0, 0
    while count < most and (spent < budget or count < 5):
        start = time.perf_counter()
        call()
        seconds = time.perf_counter() - start
        best, spent, count = min(best, seconds), spent + seconds, count + 1
    return best


def _pointwise_gflops(rows: int, k: int, n: int) -> float:
    from npmobile.kernels.activations import ACT_NONE
    from npmobile.kernels.pointwise import pointwise_conv2d, prepare_weights

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, rows, 1, k), dtype=np.float32)
    kernel = rng.standard_normal((k, n), dtype=np.float32)
    bias = np.zeros(n, np.float32)
    out = np.empty((1, rows, 1, n), np.float32)
    call = pointwise_conv2d.bind(x, prepare_weights(kernel, bias, rows), bias, out, ACT_NONE)
    return 2 * rows * k * n / _best_seconds(call) / 1e9


def _stream_kernels():
    """Two adds out = a + b over float32 arrays, compiled by Numba like the kernels, in loops LLVM vectorizes:
    one on the calling thread, one that gives each of Numba's threads its own contiguous chunk (each core
    streams from its own cache). The engine's own ``add`` picks an activation per element, which keeps it
    from vectorizing: it would understate the roof."""
    global _STREAMS
    if _STREAMS is None:
        from numba import njit, prange

        @njit(cache=True)
        def stream_add(a, b, out):
            for i in range(a.shape[0]):
                out[i] = a[i] + b[i]

        @njit(parallel=True, cache=True)
        def stream_add_chunks(a, b, out, chunks):
            size = a.shape[0] // chunks
            for c in prange(chunks):
                for i in range(c * size, (c + 1) * size):
                    out[i] = a[i] + b[i]

        _STREAMS = stream_add, stream_add_chunks
    return _STREAMS


_STREAMS = None


def _stream_gbs(floats: int, threads: int, budget: float = 0.15) -> float:
    """Bytes read and written per second by the add over ``floats`` floats per thread."""
    a, b = np.ones(floats * threads, np.float32), np.ones(floats * threads, np.float32)
    out = np.empty_like(a)
    serial, chunked = _stream_kernels()
    call = (lambda: serial(a, b, out)) if threads == 1 else (lambda: chunked(a, b, out, threads))
    return 3 * a.nbytes / _best_seconds(call, budget) / 1e9


def measure_machine(threads: int | None = None, memory: bool = True) -> Machine:
    """The roof the engine reaches on ``threads`` threads (None: all): its pointwise kernel's best GFLOP/s
    on cache-resident products (PEAK_PRODUCTS) and a vectorized add's best GB/s on cache-resident arrays
    (on n threads, or on one when that was faster: n threads can always do what one does),
    plus that add's GB/s on large arrays when ``memory``. The best single call of each over ~0.15 s; about a
    second in all (the first call in a process also loads or compiles the kernels)."""
    from npmobile.kernels.threads import thread_limits

    with thread_limits(threads) as n:
        peak = max(_pointwise_gflops(*shape) for shape in PEAK_PRODUCTS)
        bandwidth = max(_stream_gbs(floats, t) for floats in CACHED_FLOATS for t in {1, n})
        large = _stream_gbs(_LARGE_MB * 2**20 // (12 * n), n, 0.3) if memory else 0.0
    if n > 1:  # n threads can always do what one does: the one-thread peak is a floor of the n-thread roof
        with thread_limits(1):
            peak = max(peak, *(_pointwise_gflops(*shape) for shape in PEAK_PRODUCTS))
    return Machine(peak, bandwidth, n, large)


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
                 repeats: int, v1_bytes_per_mac: float | None = None, totals: list[float] | None = None) -> str:
    """The ``npmobile profile`` report: one row per plan step with its median time and spread (interquartile
    range of the runs), totals by kind, and the explanation."""
    total_s = sum(s.seconds for s in steps) or 1e-12
    total_flops = sum(s.cost.flops for s in steps)
    shape = input_shape
    lines = [
        f'Profile of "{model.name}" on {image} (median of {repeats} runs, batch 1, {machine.threads} '
        f"thread{'s' if machine.threads > 1 else ''}, {len(steps)} steps of the fused plan; IQR: the runs' "
        "interquartile range)",
        f"Machine: {machine.describe()}",
        f"  -> balance {machine.balance:.1f} FLOP/byte.",
        "  A step whose intensity (FLOPs per byte moved: float32 inputs + output + weights) is below the balance",
        "  waits on memory (memory-bound); above it, on arithmetic (compute-bound). The roof is what npmobile's",
        "  own kernels reach with their data in the caches: no step should sit above it.",
        "",
        f"{'Step (op)':<44}{'ms':>8}{'IQR':>7}{'time%':>7}{'MFLOP':>9}{'GFLOP/s':>9}{'MB moved':>10}{'FLOP/B':>8}"
        "  bound",
        "─" * 111,
    ]
    for s in steps:
        label = f"{s.cost.name} ({s.cost.op})"
        if len(label) > 43:
            label = label[:42] + "…"
        lines.append(f"{label:<44}{s.seconds * 1e3:>8.3f}{s.spread * 1e3:>7.3f}{100 * s.seconds / total_s:>6.1f}%"
                     f"{s.cost.flops / 1e6:>9.2f}{s.gflops:>9.2f}{s.cost.bytes / 1e6:>10.3f}"
                     f"{s.cost.intensity:>8.2f}  {bound(s, machine)}")
    lines += ["─" * 111,
              f"{'Total (sum of the medians)':<44}{total_s * 1e3:>8.2f}{'':>7}{100:>6.1f}%{total_flops / 1e6:>9.1f}"
              f"{total_flops / total_s / 1e9:>9.2f}{sum(s.cost.bytes for s in steps) / 1e6:>10.2f}",
              ]
    if totals:
        median, spread = float(np.median(totals)), interquartile_range(totals)
        lines.append(f"Whole runs: median {median * 1e3:.2f} ms, interquartile range {spread * 1e3:.2f} ms "
                     f"({100 * spread / median if median else 0:.0f}% of the median)")
    lines += ["", "By kind of step:"]
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
