"""Numba's on-disk cache, keyed on every kernel source file, not only the compiled function's own.

Numba checks a cached function against its own file only, but a kernel's machine code also comes from other
files: a driver of kernels/gemm_drivers.py inlines the intrinsics kernels/gemm_microkernel.py emits, and a
kernel calls helpers of other kernel files. Edit the emitter in a source checkout and Numba would load the
driver compiled from the old one. So, for the functions of the kernel files, the cache's source stamp is the
function file's own stamp plus the hash of all kernel sources (``module_key.kernel_sources_hash``, which
also keys the built module): a change to any kernel file makes every kernel's cache entry stale, and it
is compiled again (once) and the entry rewritten.

Where the entry lives is unchanged (the locator Numba would have picked, wrapped), so where nothing is
writable no locator is found and backend.njit compiles in memory, as before.
"""

from __future__ import annotations

import functools
from pathlib import Path

from numba.core import caching
from numba.core.caching import _CacheLocator

from .module_key import KERNELS_DIR, kernel_sources_hash

# Numba names the class that lists the locators CacheImpl (older versions: _CacheImpl).
_CACHE_IMPL = getattr(caching, "CacheImpl", None) or caching._CacheImpl


@functools.cache
def sources_stamp() -> str:
    """The kernel sources' hash, read once per process (what this process's kernels were compiled from)."""
    return kernel_sources_hash()


def is_kernel_file(py_file: str) -> bool:
    """Whether ``py_file`` is one of the kernel files (imported as npmobile.kernels or as the JIT twin)."""
    try:
        return Path(py_file).resolve().parent == KERNELS_DIR
    except OSError:
        return False


class KernelSourcesLocator(_CacheLocator):
    """The locator Numba would use for a kernel file's function, with the kernel sources' hash in its stamp."""

    npmobile_kernel_sources = True  # one registration, whichever copy of this file (the JIT twin's) comes first

    def __init__(self, inner: _CacheLocator, sources: str):
        self._inner = inner
        self._sources = sources

    def ensure_cache_path(self) -> None:
        self._inner.ensure_cache_path()

    def get_cache_path(self) -> str:
        return self._inner.get_cache_path()

    def get_source_stamp(self):
        return self._inner.get_source_stamp(), self._sources

    def get_disambiguator(self) -> str:
        return self._inner.get_disambiguator()

    @classmethod
    def from_function(cls, py_func, py_file):
        if not is_kernel_file(py_file):
            return None
        for other in _CACHE_IMPL._locator_classes:
            if getattr(other, "npmobile_kernel_sources", False):
                continue
            inner = other.from_function(py_func, py_file)
            if inner is not None:
                return cls(inner, sources_stamp())
        return None


def register() -> None:
    """Put KernelSourcesLocator first among Numba's cache locators (once per process)."""
    classes = _CACHE_IMPL._locator_classes
    if not any(getattr(c, "npmobile_kernel_sources", False) for c in classes):
        classes.insert(0, KernelSourcesLocator)
