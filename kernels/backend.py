"""Where the compiled kernels come from: Numba's JIT, or a module compiled ahead of time.

Every kernel module takes its compiler from here -- ``from .backend import AOT, intrinsic, njit, prange`` --
and this module is the one place that decides which compiler that is:

- **JIT** (the default, and the fallback): ``njit``, ``prange`` and ``intrinsic`` are Numba's own, and the
  kernels compile on first use (or load from Numba's on-disk cache, keyed on all kernel sources:
  kernels/jit_cache.py).
- **AOT**: when the kernels are built for this machine (kernels/build.py: ``npmobile build-kernels``, or the
  build the command line starts by itself in the background after a run on the JIT,
  npmobile/cli/build_kernels.py) and the module in the kernel cache is current (kernels/module_key.py) and
  checks out (kernels/aot_module.py), ``njit`` returns an ``AotKernel`` instead of a Numba dispatcher, and
  neither Numba nor llvmlite is imported: a warm start saves Numba's import and its cache loading. The kernel
  modules still define their compiled bodies; in this mode nothing compiles them.

An AOT kernel runs the exported function only when the arguments' types are exactly one of the signatures
it was built for (the JIT runs that were exported: kernels/build.py): numba.pycc's wrappers do not check
their arguments, and a float64 array given to a float32 signature would be read as garbage. Any other call
goes to the JIT twin: the same kernel files imported a second time, in JIT mode, under ``JIT_PACKAGE``
(that imports Numba, once). Both are compiled from the same source with the same flags and CPU target,
so they give the same bits (tests/test_aot.py). A C function a kernel calls by address (depthwise's row
kernels) comes from ``int64_cfunc``: numba.cfunc's, or the module's copy of it.

Also here, because they too depend on which is in use: the thread count (``get_num_threads``,
``set_num_threads``, ``max_threads``, ``jit_thread_count`` in compiled code), the CPU facts the tiles are
chosen by (``target_has_avx512``, ``target_cpu_name``), where compiled code finds NumPy's sgemm (``add_symbol``), and
whether a kernel is compiled already (``is_cached``).

Set ``NPMOBILE_KERNELS=jit`` to use the JIT regardless (then nothing is built in the background either). Any
other ``NUMBA_*`` setting than the thread count, the cache directory and the CPU target (an optimization level,
...) also means the JIT: the AOT module was built without it. A CPU target (NUMBA_CPU_NAME/FEATURES) is in the
module's key: the module built under it is the one used under it (kernels/module_key.py). A module that fails its
check costs one line on stderr (``rejected`` says why, and whether the command line's next background build
replaces it); the JIT runs.

The JIT twin's package (``_JitPackage``) can be imported by any process, not only by an AOT one: the twin and the
kernels it stands for share Numba's on-disk cache, and an entry the twin compiled names the twin's module.
Where Numba finds no folder it may write its cache to (a read-only install, home and NUMBA_CACHE_DIR), the
kernels compile in memory (``njit`` here, said in one line).
"""

from __future__ import annotations

import ctypes
import importlib
import os
import sys
import threading
from functools import partial

from . import cpus

# Other code asks the backend (what the module must match, where it is, its check): these are its answers.
from .aot_kernel import AotKernel, resolved  # noqa: F401
from .aot_module import LoadedModule, ModuleRejected, default_thread_count, private_enough, verify_module  # noqa: F401
from .module_key import KERNELS_DIR, MANIFEST, MODULE_NAME, aot_wanted, cache_key, kernel_cache_dir, module_dir  # noqa: F401

# The kernel files imported again in JIT mode, for the calls the AOT module has no signature for.
JIT_PACKAGE = "npmobile._jit_kernels"

# Why the module in the kernel cache was not used (None: it was, or there is none); the command line's
# background build (npmobile/cli/build_kernels.py) rebuilds it when ``rebuild`` says so.
rejected: ModuleRejected | None = None


def _say_rejected(why: ModuleRejected) -> None:
    """The one line a run prints about a module it may not use (the library's only output: a user whose
    fast start-up silently went away would never learn why)."""
    after = ("; the next command-line run builds a new one" if why.rebuild and os.environ.get("NPMOBILE_AUTO_BUILD")
             != "0" else "")
    if sys.stderr is not None:  # none at all under pythonw or a detached service
        sys.stderr.write(f"npmobile: kernel module not used: {why}; the kernels run on Numba's JIT{after}\n")


def _load() -> LoadedModule | None:
    """The current AOT module if one is built, checked and wanted, else None (then the JIT is used)."""
    global rejected
    if not aot_wanted():
        return None
    directory = module_dir()
    try:
        found = verify_module(directory)
        if found is None:
            return None
        try:
            return LoadedModule(directory, *found)
        except (OSError, ImportError, AttributeError, KeyError, TypeError) as error:  # a Numba moved, ...
            raise ModuleRejected(f"{directory}: cannot be loaded ({type(error).__name__}: {error})"
                                 .splitlines()[0]) from None
    except ModuleRejected as why:
        rejected = why
        _say_rejected(why)
        return None


# The files under JIT_PACKAGE are the JIT twin: never AOT, whatever is built.
_loaded = None if __name__.startswith(JIT_PACKAGE) else _load()
AOT = _loaded is not None


# --- the JIT twin ---------------------------------------------------------------------------------------

class _JitPackage:
    """Finds and makes JIT_PACKAGE, the kernel files' folder as a package of its own whose modules (and their
    ``from .backend import ...``) are always in JIT mode, in any process that imports it.

    Not only the JIT twin imports it: Numba's on-disk cache is shared by the twin and the kernels it stands
    for (one source file, one cache entry), and an entry the twin compiled names the twin's module, which
    Numba imports when it loads the entry -- in a later run on the JIT, or in a kernel build, too.
    """

    npmobile_jit_package = True

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name != JIT_PACKAGE:
            return None
        spec = importlib.machinery.ModuleSpec(JIT_PACKAGE, _JitPackage, is_package=True)
        spec.submodule_search_locations = [str(KERNELS_DIR)]
        return spec

    @staticmethod
    def create_module(spec):
        return None

    @staticmethod
    def exec_module(module) -> None:
        pass


if not __name__.startswith(JIT_PACKAGE) and not any(getattr(f, "npmobile_jit_package", False)
                                                     for f in sys.meta_path):
    sys.meta_path.append(_JitPackage)

# Held while the first JIT twin is imported: two threads reaching their first fallback at once must not
# start Numba's pool twice or see the thread count reset meanwhile.
_TWIN_LOCK = threading.RLock()
_twin_started = False


def jit_module(stem: str):
    """The kernel file ``kernels/<stem>.py`` imported again in JIT mode, under JIT_PACKAGE (the first call
    imports Numba)."""
    global _twin_started
    with _TWIN_LOCK:
        if not _twin_started and AOT:  # Numba starts its side of the threading layer now, which resets this
            threads = get_num_threads()  # thread's count: keep it
            import numba

            numba.get_num_threads()
            set_num_threads(threads)
        _twin_started = True
        return importlib.import_module(f"{JIT_PACKAGE}.{stem}")


def jit_twin(module: str, qualname: str):
    """The JIT-compiled object that stands where ``module.qualname`` stands, from the kernel files imported
    again in JIT mode under JIT_PACKAGE (``jit_module``)."""
    found = jit_module(module.rpartition(".")[2])
    for part in qualname.split("."):
        found = getattr(found, part)
    return found


# --- the compiler the kernel modules use ----------------------------------------------------------------

if AOT:
    def njit(*args, **options):
        """Like numba.njit, for a kernel file in AOT mode: the function becomes an AotKernel."""
        if args and callable(args[0]):
            return _aot_kernel(args[0], options)
        return lambda function: _aot_kernel(function, options)

    def _aot_kernel(function, options: dict) -> AotKernel:
        """``function``'s exports in the module, and where its JIT twin is when a call matches none."""
        name = f"{function.__module__}.{function.__qualname__}"
        exported = _loaded.manifest["kernels"].get(name, [])
        exports = {tuple(sig): getattr(_loaded.module, symbol) for sig, symbol in exported}
        return AotKernel(function, options, exports, partial(jit_twin, function.__module__, function.__qualname__))

    def intrinsic(function):
        """An intrinsic is only called from compiled code, which in AOT mode is all in the module."""
        return function

    prange = range

    def jit_thread_count():
        raise TypeError("jit_thread_count is called from compiled kernels only")

    def get_num_threads() -> int:
        return _loaded.get_num_threads()

    def set_num_threads(n: int) -> None:
        if not 1 <= n <= _loaded.max_threads:
            raise ValueError(f"thread count {n} not in [1, {_loaded.max_threads}]")
        _loaded.set_num_threads(n)
        if "numba" in sys.modules:  # a JIT twin runs too: keep Numba's own view of the count the same
            sys.modules["numba"].set_num_threads(n)

    def max_threads() -> int:
        return _loaded.max_threads

    def is_cached(kernel) -> bool | None:
        """Built ahead of time: nothing is compiled at a first run."""
        return True

    def target_has_avx512() -> bool:
        """The AVX-512 decision the module was built with (kernels/gemm.py's tiles depend on it)."""
        return bool(_loaded.manifest["avx512"])

    def target_cpu_name() -> str:
        """LLVM's name for the CPU the module was built for (kernels/gemm_rules.py's choices may depend on it)."""
        return str(_loaded.manifest.get("cpu_name", ""))

    def int64_cfunc(function, nargs: int) -> int:
        """The address of ``function`` as a C function of ``nargs`` int64 arguments returning nothing: the
        AOT module's copy, else the JIT twin's cfunc."""
        name = f"{function.__module__}.{function.__qualname__}"
        symbol = _loaded.manifest["cfuncs"].get(name)
        if symbol is None:  # a row kernel the build's workload never ran: the JIT twin's backend makes it
            return jit_module("backend").int64_cfunc(jit_twin(function.__module__, function.__qualname__), nargs)
        return ctypes.cast(getattr(_loaded.shim, symbol), ctypes.c_void_p).value

    def add_symbol(name: str, address: int) -> None:
        """Where compiled code finds an external C function (only ``npmobile_sgemm``, kernels/blas.py)."""
        if name != "npmobile_sgemm":
            raise ValueError(f"the AOT module links no symbol {name!r}")
        _loaded.shim.npm_set_sgemm(ctypes.c_void_p(address))
        if "numba" in sys.modules:
            import llvmlite.binding as llvm

            llvm.add_symbol(name, address)

else:
    default_thread_count()  # NUMBA_NUM_THREADS set before Numba reads it
    import numba
    from numba import prange  # noqa: F401  (the kernel modules' compiler)
    from numba.extending import intrinsic  # noqa: F401

    from . import jit_cache

    jit_cache.register()  # a kernel's cache entry goes stale when any kernel file changes

    _said_uncached = False

    def _cached_or_in_memory(compile_cached, compile_uncached):
        """``compile_cached()``, or ``compile_uncached()`` when Numba finds no folder it may write its cache to
        (a read-only site-packages, home and NUMBA_CACHE_DIR: "cannot cache function ...: no locator
        available"): the kernels then compile in memory for this process, said once on stderr."""
        global _said_uncached
        try:
            return compile_cached()
        except RuntimeError as error:
            if "no locator available" not in str(error):
                raise
            if not _said_uncached and sys.stderr is not None:
                _said_uncached = True
                sys.stderr.write("npmobile: no writable folder for Numba's kernel cache (site-packages, home and "
                                 "NUMBA_CACHE_DIR are read-only): the kernels compile in memory for this process; "
                                 "set NUMBA_CACHE_DIR to a writable folder, or build the kernels ahead of time "
                                 "(README, 'Read-only deployments')\n")
            return compile_uncached()

    def njit(*args, **options):
        """numba.njit, but ``cache=True`` falls back to compiling in memory where nothing can be cached."""
        if args and callable(args[0]):
            return njit(**options)(args[0])
        if not options.get("cache"):
            return numba.njit(*args, **options)
        uncached = {**options, "cache": False}
        return lambda function: _cached_or_in_memory(lambda: numba.njit(*args, **options)(function),
                                                     lambda: numba.njit(*args, **uncached)(function))

    # ``jit_thread_count()``, in compiled code: the caller's Numba thread count. numba.get_num_threads()
    # would embed a pointer into the threading library and keep the kernel out of Numba's on-disk cache;
    # this private intrinsic calls the same function by its symbol name. Kernels that use it give the same
    # answers whatever it returns (they only cut their work by it).
    try:
        from numba.np.ufunc.parallel import _iget_num_threads as jit_thread_count
    except ImportError:  # a Numba without it: the work is cut in two

        @numba.njit(inline="always")
        def jit_thread_count():
            return 2

    get_num_threads = numba.get_num_threads
    set_num_threads = numba.set_num_threads

    _thread_limit: list[int] = []

    def max_threads() -> int:
        """The most threads the kernels may use in this process: Numba's pool (NUMBA_NUM_THREADS), capped by
        the CPUs this process may use unless NUMBA_NUM_THREADS asks for more (a Numba imported before
        npmobile sized its pool by the core count alone)."""
        if not _thread_limit:
            _thread_limit.append(min(int(numba.config.NUMBA_NUM_THREADS), cpus.default_thread_count()))
        return _thread_limit[0]

    def is_cached(kernel) -> bool | None:
        """Whether Numba's on-disk cache holds a current entry for ``kernel`` (a dispatcher, or a plain function
        ``int64_cfunc`` compiles), so that its first call loads it instead of compiling; None when that cannot
        be told (nowhere to cache, or a Numba that keeps its cache otherwise)."""
        try:
            from numba.core.caching import FunctionCache

            cache = kernel._cache if hasattr(kernel, "_cache") else FunctionCache(kernel)
            return bool(cache._cache_file._load_index())  # empty when absent or stale (jit_cache.py)
        except (ImportError, AttributeError, RuntimeError, OSError, ValueError):
            return None

    def target_has_avx512() -> bool:
        """Whether the code Numba compiles may use AVX-512: the features it compiles for, by Numba's own rule
        (numba.core.codegen): NUMBA_CPU_FEATURES when set, else this CPU's -- whatever NUMBA_CPU_NAME says, so
        an AVX2 target on an AVX-512 machine needs both (NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES=, its own
        features). A CPU_NAME whose own features include AVX-512 with NUMBA_CPU_FEATURES not naming
        ``+avx512f`` takes the AVX2 tiles, which run on it too."""
        from numba.core import codegen, config

        features = config.CPU_FEATURES if config.CPU_FEATURES is not None else codegen.get_host_cpu_features()
        return "+avx512f" in features.split(",")

    def target_cpu_name() -> str:
        """LLVM's name for the CPU Numba compiles for (NUMBA_CPU_NAME, else the host's: "znver4", "rocketlake")."""
        from numba.core import config

        if config.CPU_NAME and config.CPU_NAME != "host":
            return config.CPU_NAME
        import llvmlite.binding as llvm

        return llvm.get_host_cpu_name()

    # function -> its numba.cfunc, made on first use (kernels/build.py exports each one made).
    CFUNCS: dict = {}
    _CFUNCS_LOCK = threading.Lock()

    def int64_cfunc(function, nargs: int) -> int:
        """The address of ``function`` compiled as a C function of ``nargs`` int64 arguments that returns
        nothing (a numba.cfunc: compiled, or loaded from Numba's cache, on first use; once, whichever threads
        ask at the same time)."""
        with _CFUNCS_LOCK:
            compiled = CFUNCS.get(function)
            if compiled is None:
                sig = numba.types.void(*([numba.types.int64] * nargs))
                compiled = _cached_or_in_memory(lambda: numba.cfunc(sig, cache=True)(function),
                                                lambda: numba.cfunc(sig)(function))
                CFUNCS[function] = compiled
        return compiled.address

    def add_symbol(name: str, address: int) -> None:
        """Make a C function known to compiled code by name (kernels/blas.py's sgemm)."""
        import llvmlite.binding as llvm

        llvm.add_symbol(name, address)


def threading_layer() -> str:
    """The threading layer the kernels run on ("omp", "tbb", "workqueue")."""
    if AOT:
        return _loaded.manifest["threading_layer"]
    import numba

    get_num_threads()  # starts the layer
    return numba.threading_layer()
