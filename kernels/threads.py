"""One place to decide how many threads the kernels use.

Two thread pools live in this process: Numba's (every ``prange`` kernel) and OpenBLAS's (the
matrix products under pointwise_conv2d, dense, conv2d). They must not both be awake on the same
cores: OpenBLAS's workers busy-wait for a while after each product, and a Numba parallel loop
started in that window shares its cores with spinning threads, which made a MobileNetV2 body many
times slower (bench/kernels.py measures it: the "pipeline" rows).

The policy measured best (and safe): Numba owns the cores -- ``threads`` Numba threads -- and
BLAS runs on one thread, in whichever thread calls it, so it never starts a pool of its own. The
products still use every core: the pointwise kernel cuts each product into tiles and its Numba
workers call BLAS on one tile each (kernels/blas.py, kernels/pointwise.py).

    with thread_limits(2):
        model.predict(x)

A prediction holds BLAS only when a step of its plan calls it (``hold_blas``, kernels/entry.py
``calls_blas``): on AVX-512 no MobileNet step does, and the get and two sets cost ~30 us per
prediction after the kernels have pushed the interpreter's data out of the caches.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from . import backend, cpus

# ``jit_thread_count()``, in compiled code: the caller's thread count (kernels/backend.py says how).
from .backend import jit_thread_count  # noqa: F401


def max_threads() -> int:
    """The most threads the kernels can use in this process, and the default: the CPUs it may use (its
    affinity mask and cgroup CPU quota, kernels/cpus.py), or NUMBA_NUM_THREADS when that is set."""
    return backend.max_threads()


def checked_threads(threads: int | None) -> int:
    """``threads`` if the kernels can run that many threads here (None: ``max_threads()``), else
    ThreadCountError: 0 threads runs nothing, and more than the CPUs this process may use only makes the
    threads wait for each other."""
    limit = max_threads()
    return limit if threads is None else cpus.checked_thread_count(threads, limit)


_controller = None


def _threadpool_controller():
    """threadpoolctl's view of the loaded thread pools, or None when threadpoolctl is not installed.

    Made once: making it scans the process's libraries and costs milliseconds, more than a whole
    MobileNetV3-Small prediction.
    """
    global _controller
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    if _controller is None:
        _controller = ThreadpoolController()
    return _controller


def blas_libraries(internal_api: str) -> list[str]:
    """File paths of the loaded BLAS libraries of one kind ("openblas", "mkl", ...)."""
    controller = _threadpool_controller()
    if controller is None:
        return []
    return [lib.filepath for lib in controller.lib_controllers
            if lib.user_api == "blas" and lib.internal_api == internal_api]


def _blas_pools() -> list:
    """threadpoolctl's controllers of the loaded BLAS libraries (empty without threadpoolctl)."""
    controller = _threadpool_controller()
    return [] if controller is None else [lib for lib in controller.lib_controllers if lib.user_api == "blas"]


def set_threads(threads: int | None = None) -> int:
    """Numba uses ``threads`` threads (None: all), BLAS one; for the rest of the process.

    Returns the Numba thread count in effect. numba.set_num_threads applies to the calling thread.
    Without threadpoolctl BLAS keeps its own setting (OPENBLAS_NUM_THREADS=1 does the same).
    A count below 1 or above ``max_threads()``: ThreadCountError.
    """
    n = checked_threads(threads)
    backend.set_num_threads(n)
    for pool in _blas_pools():
        pool.set_num_threads(1)
    return n


@contextlib.contextmanager
def thread_limits(threads: int | None = None, blas: bool = True) -> Iterator[int]:
    """Context manager form of ``set_threads`` (the same check): restores the previous settings on exit.

    ``blas=False``: Numba's thread count only (a plan holds BLAS itself, ``hold_blas``, when one of its
    steps calls it). Entered once per prediction, so it does the least it can: Numba's count is set
    only when it differs, and BLAS is reached through threadpoolctl's controllers directly (a get and
    a set each), not through ``ThreadpoolController.limit``, which re-reads every library's state and
    costs as much as a small layer.
    """
    n = checked_threads(threads)
    previous = backend.get_num_threads()
    if n != previous:
        backend.set_num_threads(n)
    try:
        if blas:
            with hold_blas():
                yield n
        else:
            yield n
    finally:
        if n != previous:
            backend.set_num_threads(previous)


@contextlib.contextmanager
def hold_blas() -> Iterator[None]:
    """BLAS on one thread meanwhile (the module docstring says why), then as it was."""
    pools = _blas_pools()
    blas_previous = [pool.get_num_threads() for pool in pools]
    for pool, count in zip(pools, blas_previous):
        if count != 1:
            pool.set_num_threads(1)
    try:
        yield
    finally:
        for pool, count in zip(pools, blas_previous):
            if count is not None and count != 1:
                pool.set_num_threads(count)


def kernels_cached(depthwise_sizes: tuple[int, ...] = (3, 5), squeeze_excite: bool = True,
                   rescaled_input: bool = True, expand_depthwise_sizes: tuple[int, ...] = ()) -> bool:
    """True when the kernels a MobileNet runs are in Numba's on-disk cache (so no compile pause is coming).

    ``depthwise_sizes``, ``squeeze_excite``, ``rescaled_input``, ``expand_depthwise_sizes``: what the
    model has (V1 and V2: 3x3, no squeeze-excite, no Rescaling layer; V2 at 224: 3x3 expand + depthwise
    pairs fused), since a kernel a model never runs is never compiled. Checks the cache index file of
    each; a False answer only means "expect a compile", never an error.
    """
    if backend.AOT:  # built ahead of time (npmobile build-kernels): nothing to compile
        return True
    from npmobile.kernels import conv, depthwise, gemm
    from npmobile.kernels import expand_depthwise as ed
    from npmobile.kernels import squeeze_excite as se

    # The stem runs the indirect GEMM (after a rescaled copy of the input for V3). Depthwise: the vector
    # kernel's parallel driver and a row kernel of each window size (a run on one thread compiles the
    # plain-loop driver too) -- any of its orders and activations (depthwise.ROW_KERNELS), so a model that
    # needs another one compiles it without notice (under a second each). Not checked:
    # the OpenBLAS tiles some AVX2 products take (only models with 1x1 layers of 256+ channels each way
    # compile them, in the same first run as the microkernel's drivers).
    try:
        from numba.core.caching import FunctionCache  # the row kernels are cfuncs, made on first use
    except ImportError:  # another Numba version: say nothing rather than guess
        return True
    kernels = [[gemm.gemm_panels], [gemm.igemm_panels]] + ([[conv.rescale_into]] if rescaled_input else [])
    row_kernels = {size: [row for (k, _, _), row in depthwise.ROW_KERNELS.items() if k == size] for size in (3, 5)}
    sizes = [k for k in (*depthwise_sizes, *expand_depthwise_sizes) if k in row_kernels]
    if sizes:
        kernels.append([depthwise._depthwise_vector])
        try:
            kernels += [[FunctionCache(row) for row in row_kernels[k]] for k in sorted(set(sizes))]
        except RuntimeError:  # "no locator available": nowhere to cache; kernels/backend.py said in its one line
            return True       # that they compile in memory (a "first run only" note would be wrong)
    if squeeze_excite:
        kernels.append([se._squeeze_excite])
    if expand_depthwise_sizes:
        kernels.append([ed._expand_depthwise])
    try:  # each group: one of them compiled
        return all(any(os.path.exists(getattr(k, "_cache", k)._cache_file._index_path) for k in group)
                   for group in kernels)
    except AttributeError:  # another Numba version keeps it elsewhere: say nothing rather than guess
        return True
