"""BLAS's sgemm, callable from inside a Numba kernel.

Why: a pointwise convolution is a matrix product, and OpenBLAS's AVX-512 microkernels compute it
2-3x faster than any loop Numba can compile (bench/kernels.py). But OpenBLAS parallelizes with a
thread pool of its own, and two pools on two cores fight: Numba's workers (depthwise, im2col)
and OpenBLAS's spin-waiting workers take turns on the same cores. So OpenBLAS runs on one thread,
and the *Numba* kernel splits the product into tiles and calls sgemm once per tile from each of
its own workers (kernels/pointwise.py). One pool owns the cores, and the products use them all.

The sgemm is the one NumPy already loaded (its bundled OpenBLAS, found with threadpoolctl), so
nothing new is installed or loaded. It is made known to the compiled code under a fixed name
(``npmobile_sgemm``) before any kernel that calls it is compiled or loaded from Numba's cache:
the compiled code refers to the name, not to an address, so it stays valid from one process to
the next. ``AVAILABLE`` is False when no 64-bit-integer OpenBLAS sgemm is found (another NumPy
build); callers then use ``np.matmul``, which gives the same products more slowly.
"""

from __future__ import annotations

import ctypes

from .backend import AOT, add_symbol

# cblas_sgemm's enum values.
ROW_MAJOR = 101
NO_TRANS = 111

# NumPy >= 2.0 wheels ship scipy-openblas (symbols "scipy_" + name + "64_"); 1.2x wheels shipped
# openblas64_ (name + "64_"). Both use 64-bit integers for sizes, as the signature below says.
_CANDIDATES = ("scipy_cblas_sgemm64_", "cblas_sgemm64_")

# void sgemm(order, trans_a, trans_b, m, n, k, alpha, *a, lda, *b, ldb, beta, *c, ldc);
# pointers are passed as 64-bit integers (addresses), which is how the x86-64 and AArch64 C ABIs
# pass them anyway. (The AOT module declares the same function in C: kernels/aot_shim.c.)
if not AOT:
    from numba import types

    sgemm = types.ExternalFunction("npmobile_sgemm", types.void(
        types.int32, types.int32, types.int32, types.int64, types.int64, types.int64,
        types.float32, types.int64, types.int64, types.int64, types.int64,
        types.float32, types.int64, types.int64))


def _find_sgemm() -> int | None:
    """The address of the 64-bit-integer sgemm in the OpenBLAS that NumPy loaded, or None."""
    import numpy  # noqa: F401  (loads its BLAS, so that threadpoolctl can see it)

    from .threads import blas_libraries

    for filepath in blas_libraries("openblas"):
        try:
            library = ctypes.CDLL(filepath)
        except OSError:
            continue
        for name in _CANDIDATES:
            function = getattr(library, name, None)
            if function is not None:
                return ctypes.cast(function, ctypes.c_void_p).value
    return None


_address = _find_sgemm()
AVAILABLE = _address is not None
if AVAILABLE:
    add_symbol("npmobile_sgemm", _address)
