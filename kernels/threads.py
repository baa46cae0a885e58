"""One place to decide how many threads the kernels use.

Two thread pools live in this process: Numba's (every ``prange`` kernel) and OpenBLAS's (the
matrix products under pointwise_conv2d, dense, conv2d). They must not both be awake on the same
cores: OpenBLAS's workers busy-wait for a while after each product, and a Numba parallel loop
started in that window shares its cores with spinning threads. On this 2-core machine that turned
a 10 ms MobileNetV2 body into ~140 ms (bench/kernels.py, "pipeline" rows).

The policy measured best (and safe): Numba owns the cores -- ``threads`` Numba threads -- and
BLAS runs on one thread, in the calling thread, so it never starts a pool of its own.

    with thread_limits(2):
        model.predict(x)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import numba


def max_threads() -> int:
    """The most threads Numba can use in this process (NUMBA_NUM_THREADS, default: the core count)."""
    return int(numba.config.NUMBA_NUM_THREADS)


_controller = None


def _blas_limiter(blas_threads: int):
    """threadpoolctl's limiter for BLAS, or None when threadpoolctl is not installed.

    The controller (which finds the loaded BLAS libraries by scanning the process) is made once:
    making it per call costs milliseconds, more than a whole MobileNetV3-Small prediction.
    """
    global _controller
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # without it BLAS keeps its own setting (OPENBLAS_NUM_THREADS=1 does the same)
        return None
    if _controller is None:
        _controller = ThreadpoolController()
    return _controller.limit(limits=blas_threads, user_api="blas")


def set_threads(threads: int | None = None) -> int:
    """Numba uses ``threads`` threads (None: all), BLAS one; for the rest of the process.

    Returns the Numba thread count in effect. numba.set_num_threads applies to the calling thread.
    """
    n = max_threads() if threads is None else max(1, min(int(threads), max_threads()))
    numba.set_num_threads(n)
    _blas_limiter(1)
    return n


@contextlib.contextmanager
def thread_limits(threads: int | None = None) -> Iterator[int]:
    """Context manager form of ``set_threads``: restores both pools' previous settings on exit."""
    previous = numba.get_num_threads()
    n = max_threads() if threads is None else max(1, min(int(threads), max_threads()))
    limiter = _blas_limiter(1)
    numba.set_num_threads(n)
    try:
        yield n
    finally:
        numba.set_num_threads(previous)
        if limiter is not None:
            limiter.restore_original_limits()


def kernels_cached() -> bool:
    """True when the main kernels are in Numba's on-disk cache (so no compile pause is coming).

    Checks the cache index file of each compiled kernel the MobileNets use; a False answer only
    means "expect a compile", never an error.
    """
    from npmobile.kernels import conv, depthwise, pointwise, squeeze_excite

    kernels = (depthwise.depthwise_conv2d, pointwise._epilogue, conv.im2col, squeeze_excite.squeeze_excite)
    try:
        return all(os.path.exists(k._cache._cache_file._index_path) for k in kernels)
    except AttributeError:  # another Numba version keeps it elsewhere: say nothing rather than guess
        return True
