"""Run a graph: walk its nodes in order, hand each one its inputs, keep what is still needed.

The interpreter knows graphs, not arithmetic: what a node computes is in its layer record
(npmobile.ops, and below it the kernels). Here live the things a user touches: ``Model.predict`` and ``Model.summary``.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from npmobile.errors import InputShapeError
from npmobile.graph import Graph, last_readers
from npmobile.kernels.threads import thread_limits
from npmobile.layers import check_values_alive, checked_shapes, infer_shapes
from npmobile.ops import is_input, layer_type
from npmobile.passes import optimize
from npmobile.plan import PlanCache

_NON_TRAINABLE = {"moving_mean", "moving_variance"}

# One prediction runs at a time in a process. Each run already uses every core it is given, the
# thread-pool settings (Numba's and BLAS's) are process-wide, and Numba's fallback threading layer
# (workqueue, where OpenMP/TBB are missing) must not be entered from two threads at once.
_RUN_LOCK = threading.RLock()


def _warn_non_finite(graph: Graph) -> None:
    """NaN or Inf weights load (a file may be mid-training), but every prediction would be NaN: say so."""
    for node in graph.nodes:
        for var, array in node.weights.items():
            bad = int(array.size - np.count_nonzero(np.isfinite(array)))
            if bad:
                warnings.warn(f"{graph.source}: layer {node.name!r} weight {var!r} has {bad} NaN/Inf values; "
                              "predictions will not be finite", RuntimeWarning, stacklevel=3)


def _concat(parts: list):
    """Results of consecutive slices of a batch, joined back in order."""
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], dict):
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    if isinstance(parts[0], list):
        return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]
    return np.concatenate(parts)


def _nchw_to_nhwc(x) -> np.ndarray:
    x = np.asarray(x)
    return x.transpose(0, 2, 3, 1) if x.ndim == 4 else x


def _nhwc_to_nchw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if x.ndim == 4 else x


class Model:
    """A loaded MobileNet (or any supported Keras graph), ready to run.

    >>> model = npmobile.load_model("m.h5")                       # doctest: +SKIP
    >>> probs = model.predict(x)                                  # doctest: +SKIP
    >>> maps = model.predict(x, outputs=["block_3_depthwise"])    # doctest: +SKIP
    """

    def __init__(self, graph: Graph):
        self.graph = graph
        for node in graph.nodes:
            node.weights = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in node.weights.items()}
        # Checks every layer's weights against its config now, so a bad file fails at load time.
        self.shapes = infer_shapes(graph)
        _warn_non_finite(graph)
        self._plans: dict[frozenset[str], Graph] = {}
        self._runners: dict[tuple[str, ...] | None, PlanCache] = {}
        self._wide_graph: Graph | None = None  # the float64 reference's copy of the graph

    # ---------------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.graph.name

    @property
    def input_shape(self) -> tuple[int | None, ...]:
        return self.graph.input_shapes[self.graph.inputs[0]]

    @property
    def layer_names(self) -> list[str]:
        names = []
        for node in self.graph.nodes:
            names.extend(node.keras_names)
        return names

    def count_params(self) -> int:
        return sum(int(w.size) for node in self.graph.nodes for w in node.weights.values())

    # ---------------------------------------------------------------------------------------------
    def predict(
        self,
        x: np.ndarray | Sequence[np.ndarray],
        outputs: Sequence[str] | None = None,
        batch_size: int | None = None,
        reference: bool = False,
        threads: int | None = None,
        data_format: str = "channels_last",
        dtype: type | np.dtype = np.float32,
    ) -> np.ndarray | dict[str, np.ndarray]:
        """Run the model on a batch of NHWC images.

        Returns the model's output (a list of arrays if it has several), or with ``outputs=[names]``
        a dict from each requested Keras layer name to that layer's output (``outputs="name"``: that
        layer's output array).
        ``batch_size`` splits a large batch into chunks to bound memory; results are the same.
        ``reference=True`` runs the graph as Keras wrote it, layer by layer, with the plain NumPy
        reference kernels: slow, and the definition the fast path is checked against.
        ``dtype=np.float64`` (with ``reference=True``) runs that reference in float64 on the same float32
        weights: near-exact arithmetic, to tell whose rounding a difference between two engines is.
        ``threads``: how many cores the kernels use (default: all this process may use -- its affinity mask
        and cgroup CPU quota -- or NUMBA_NUM_THREADS when set; 0 or more: ThreadCountError). BLAS is held to
        one thread meanwhile: its pool and Numba's fight when both are awake.
        ``data_format="channels_first"``: ``x`` is NCHW (PyTorch's layout), and so are the 4-D outputs.
        """
        if data_format not in ("channels_last", "channels_first"):
            raise ValueError(f"data_format must be 'channels_last' or 'channels_first'; got {data_format!r}")
        if data_format == "channels_first":
            x = [_nchw_to_nhwc(a) for a in x] if isinstance(x, (list, tuple)) else _nchw_to_nhwc(x)
            result = self.predict(x, outputs, batch_size, reference, threads, dtype=dtype)
            if isinstance(result, dict):
                return {name: _nhwc_to_nchw(a) for name, a in result.items()}
            return [_nhwc_to_nchw(a) for a in result] if isinstance(result, list) else _nhwc_to_nchw(result)
        if isinstance(outputs, str):  # one layer by name: its array (iterating the name would ask for "o", "u", ...)
            return self.predict(x, [outputs], batch_size, reference, threads, data_format, dtype)[outputs]
        dtype = np.dtype(dtype)
        if dtype != np.float32 and not (reference and dtype == np.float64):
            raise InputShapeError(f"dtype={dtype.name}: the fast path runs float32; float64 runs only with "
                                  "reference=True")
        feeds = self._check_inputs(x, dtype)
        run = self._run_reference if reference else self._run
        n = feeds[0].shape[0]
        # BLAS is held to one thread by the plan when a step calls it; a reference run may call it anywhere.
        with _RUN_LOCK, thread_limits(threads, blas=reference):
            if batch_size is None or batch_size >= n:
                return run(feeds, outputs)
            return _concat([run([f[i : i + batch_size] for f in feeds], outputs) for i in range(0, n, batch_size)])

    def warmup(
        self,
        sizes: Sequence[tuple[int, int]] | None = None,
        batch_sizes: Sequence[int] = (1,),
        outputs: Sequence[str] | None = None,
        threads: int | None = None,
    ) -> list[tuple[int, ...]]:
        """Compile (or load) every kernel the model runs on these inputs and build their plans, so the
        first real ``predict`` does neither: a server calls it at start-up, before it says it is ready.

        ``sizes``: the (height, width) of the images to come (default: the model's own input size;
        needed when the model takes any size); ``batch_sizes``: the batch sizes ``predict`` will be
        given; ``outputs`` and ``threads`` as ``predict`` will be called with them (a kernel's
        one-thread form is another compiled function: warm with the thread count you serve with).
        Each combination runs one prediction on zeros. The plans of the last four input shapes are
        kept; the kernels stay loaded for the life of the process. Returns the batch shapes run.
        """
        runs = [(size, int(batch)) for size in (sizes or [None]) for batch in batch_sizes]
        shapes = []
        for size, batch in runs:
            feeds = [np.zeros(self._warmup_shape(name, size, batch), np.float32) for name in self.graph.inputs]
            self.predict(feeds if len(feeds) > 1 else feeds[0], outputs=outputs, threads=threads)
            shapes.append(feeds[0].shape)
        return shapes

    def _warmup_shape(self, name: str, size: Sequence[int] | None, batch: int) -> tuple[int, ...]:
        """Input ``name``'s batch shape for ``warmup``: its own dimensions, ``size`` as (height, width)."""
        want = self.graph.input_shapes[name]
        dims = list(want[1:])
        if size is not None and len(dims) == 3:
            dims[:2] = [int(v) for v in size]
        if batch < 1 or any(d is None for d in dims):
            raise InputShapeError(f"model {self.name!r} takes inputs of shape {want}: warmup needs sizes=[(height, "
                                  "width), ...] and batch sizes of at least 1")
        return (batch, *dims)

    def _check_inputs(self, x, dtype: np.dtype = np.dtype(np.float32)) -> list[np.ndarray]:
        arrays = list(x) if isinstance(x, (list, tuple)) else [x]
        if len(arrays) != len(self.graph.inputs):
            if len(self.graph.inputs) == 1 and arrays and all(np.ndim(a) == 3 for a in arrays):
                raise InputShapeError(f"model {self.name!r} takes one batch array [N, H, W, C]; got a list of "
                                      f"{len(arrays)} images: stack them first, predict(np.stack(images))")
            raise InputShapeError(f"model {self.name!r} takes {len(self.graph.inputs)} input array"
                                  f"{'s' if len(self.graph.inputs) > 1 else ''}, got a list of {len(arrays)}"
                                  + ("; for a batch, stack the images into one array [N, H, W, C]"
                                     if len(self.graph.inputs) == 1 else ""))
        feeds = []
        for name, a in zip(self.graph.inputs, arrays):
            a = np.ascontiguousarray(a, dtype=dtype)
            want = self.graph.input_shapes[name]
            ok = a.ndim == len(want) and all(w is None or w == d for w, d in zip(want[1:], a.shape[1:]))
            if not ok:
                shape = "(batch, " + ", ".join("any" if w is None else str(w) for w in want[1:]) + ")"
                raise InputShapeError(
                    f"model {self.name!r} expects input of shape {shape}, got {tuple(a.shape)}"
                )
            if a.shape[0] == 0:
                raise InputShapeError(f"model {self.name!r} got an empty batch {tuple(a.shape)}: give at least one "
                                      "image (the first axis counts images)")
            feeds.append(a)
        return feeds

    def optimized_graph(self, outputs: Sequence[str] | None = None) -> Graph:
        """The optimized graph that computes ``outputs`` (fusion stops at every requested layer).

        (Its nodes are what the plan -- npmobile.plan, the kernel calls over buffers -- is built from.)
        """
        key = frozenset(outputs or ())
        if key not in self._plans:
            for name in key:
                self.graph.resolve(name)  # unknown names fail here, with the list of known ones
            self._plans[key] = optimize(self.graph, keep=key)
        return self._plans[key]

    def plan(self, outputs: Sequence[str] | None = None) -> Graph:
        """Deprecated name of ``optimized_graph`` (a plan is npmobile.plan.Plan, a list of kernel calls)."""
        warnings.warn("Model.plan() is renamed Model.optimized_graph(); plan() will be removed",
                      DeprecationWarning, stacklevel=2)
        return self.optimized_graph(outputs)

    def _run(self, feeds: list[np.ndarray], outputs: Sequence[str] | None):
        # The runner of these outputs is looked up first: after the first call, that is all a call does
        # before the kernels (each line of Python costs microseconds once the kernels have been through
        # the caches).
        key = tuple(outputs) if outputs is not None else None
        runner = self._runners.get(key)
        if runner is None:
            graph = self.optimized_graph(outputs)
            wanted = [graph.resolve(name) for name in outputs] if outputs is not None else list(graph.outputs)
            runner = self._runners[key] = PlanCache(graph, wanted)
        values = runner.run(feeds)
        if outputs is not None:
            return {name: values[node] for name, node in zip(outputs, runner.wanted)}
        results = [values[name] for name in runner.wanted]
        return results[0] if len(results) == 1 else results

    def profile(self, x: np.ndarray, repeats: int = 5, threads: int | None = None) -> list[dict]:
        """Time each step of the optimized plan on ``x``: one dict per step with the node's name, op,
        the Keras layers it stands for, its output shape, the median seconds over ``repeats``
        runs (after one warm-up run, which also compiles the kernels) and every run's seconds ("runs")."""
        feeds = self._check_inputs(x)
        runs: list[list] = []
        with _RUN_LOCK, thread_limits(threads, blas=False):  # the plan holds BLAS when a step calls it
            self._run(feeds, None)
            runner = self._runners[None]
            for _ in range(repeats):
                timings: list = []
                runner.run(feeds, timings)
                runs.append(timings)
        rows = []
        for k, (step, _) in enumerate(runs[0]):
            seconds = sorted(run[k][1] for run in runs)[len(runs) // 2]
            rows.append({"name": step.node.name, "op": step.node.op, "keras_names": list(step.node.keras_names),
                         "node": step.node, "seconds": seconds, "runs": [run[k][1] for run in runs]})
        return rows

    def _graph_in(self, dtype: np.dtype) -> Graph:
        """The graph with its weights in ``dtype`` (float32 values, widened exactly), made once."""
        if dtype == np.float32:
            return self.graph
        if self._wide_graph is None:
            nodes = [replace(node, weights={k: v.astype(dtype) for k, v in node.weights.items()})
                     for node in self.graph.nodes]
            self._wide_graph = replace(self.graph, nodes=nodes)
        return self._wide_graph

    def _run_reference(self, feeds: list[np.ndarray], outputs: Sequence[str] | None):
        graph = self._graph_in(feeds[0].dtype)
        wanted = [graph.resolve(name) for name in outputs] if outputs is not None else list(graph.outputs)
        keep = set(wanted)
        # The size rules of load time, for this input, and the values alive at once (as a plan's buffers).
        check_values_alive(graph, checked_shapes(graph, [f.shape for f in feeds]), keep, [f.shape for f in feeds])
        nodes = [n for n in graph.nodes if not is_input(n.op)]
        last = last_readers(nodes)  # a value is dropped once its last reader has run

        values: dict[str, np.ndarray] = dict(zip(graph.inputs, feeds))
        for index, node in enumerate(nodes):
            args = [values[i] if isinstance(i, str) else i for i in node.inputs]
            values[node.name] = layer_type(node.op).reference(node, args, graph.keras_version)
            for source in {i for i in node.inputs if isinstance(i, str)}:
                if last[source] == index and source not in keep:
                    del values[source]

        if outputs is not None:
            return {name: values[node] for name, node in zip(outputs, wanted)}
        results = [values[name] for name in wanted]
        return results[0] if len(results) == 1 else results

    # ---------------------------------------------------------------------------------------------
    def summary(self, print_fn: Callable[[str], None] | None = None, line_length: int = 98) -> None:
        """Print a Keras-like table: layer (type), output shape, params; then the totals."""
        (print_fn or print)(self.summary_text(line_length))

    def summary_text(self, line_length: int = 98) -> str:
        shapes = self.shapes
        longest = max((len(f"{n.name} ({n.op})") for n in self.graph.nodes), default=0)
        cols = (max(int(line_length * 0.45), longest + 2), int(line_length * 0.33))  # long names never touch
        line_length = max(line_length, cols[0] + cols[1] + 12)                        # the shape column
        rule = "─" * line_length
        lines = [f'Model: "{self.name}"', rule,
                 f"{'Layer (type)':<{cols[0]}}{'Output Shape':<{cols[1]}}{'Param #':>{line_length - sum(cols)}}",
                 "━" * line_length]
        for node in self.graph.nodes:
            params = sum(int(w.size) for w in node.weights.values())
            label = f"{node.name} ({node.op})"
            shape = "(" + ", ".join("None" if d is None else str(d) for d in shapes[node.name]) + ")"
            lines.append(f"{label:<{cols[0]}}{shape:<{cols[1]}}{params:>{line_length - sum(cols)},}")
        total = self.count_params()
        frozen = sum(int(w.size) for n in self.graph.nodes for k, w in n.weights.items() if k in _NON_TRAINABLE)
        lines += [rule,
                  f" Total params: {total:,} ({total * 4 / 2**20:.2f} MB)",
                  f" Trainable params: {total - frozen:,}",
                  f" Non-trainable params: {frozen:,}",
                  rule]
        return "\n".join(lines)
