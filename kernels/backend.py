"""Where the compiled kernels come from: Numba's JIT, or a module compiled ahead of time.

Every kernel module takes its compiler from here -- ``from .backend import AOT, intrinsic, njit, prange`` --
and this module is the one place that decides which compiler that is:

- **JIT** (the default, and the fallback): ``njit``, ``prange`` and ``intrinsic`` are Numba's own, and the
  kernels compile on first use (or load from Numba's on-disk cache) exactly as before.
- **AOT**: when the kernels are built for this machine (kernels/build.py: ``npmobile build-kernels``, or the
  build the command line starts by itself in the background after a run on the JIT,
  npmobile/cli/build_kernels.py) and the module in the kernel cache is current, ``njit`` returns an
  ``AotKernel`` instead of a Numba dispatcher, and neither Numba nor llvmlite is imported: a warm start saves
  Numba's import (~0.3 s, ~90 MB) and its cache loading. The kernel modules still define their compiled
  bodies; in this mode nothing compiles them.

An AOT kernel runs the exported function only when the arguments' types are exactly one of the signatures
it was built for (the JIT runs that were exported: kernels/build.py): numba.pycc's wrappers do not check
their arguments, and a float64 array given to a float32 signature would be read as garbage. Any other call
goes to the JIT twin: the same kernel files imported a second time, in JIT mode, under ``JIT_PACKAGE``
(that imports Numba, once). Both are compiled from the same source with the same flags and CPU target,
so they give the same bits (tests/test_aot.py). A C function a kernel calls by address (depthwise's row
kernels) comes from ``int64_cfunc``: numba.cfunc's, or the module's copy of it.

Also here, because they too depend on which is in use: the thread count (``get_num_threads``,
``set_num_threads``, ``max_threads``, ``jit_thread_count`` in compiled code), the AVX-512 decision the
tiles are chosen by (``target_has_avx512``), and where compiled code finds NumPy's sgemm (``add_symbol``).

The module is keyed (``cache_key``) on the Numba and llvmlite versions, the Python ABI, the CPU (model
and feature flags), the kernel sources and the threading layer, and looked for in ``kernel_cache_dir()``
/ key (beside it, while or after a background build: ``build.lock``, ``<key>.log``, ``<key>.failed``). Set
``NPMOBILE_KERNELS=jit`` to use the JIT regardless (then nothing is built in the background either). Any
other ``NUMBA_*`` setting than the thread count and the cache directory (a CPU target, an optimization level,
...) also means the JIT: the AOT module was built without it.

A module is native code, so it is checked before it is loaded (``verify_module``): the cache folder, the key
folder and the files are not symlinks, belong to this user or root and are writable by nobody else
(``private_enough``), and the module's size and SHA-256, which the build writes into the manifest once the
module is complete, match. The bytes checked are the bytes loaded: a private in-memory copy (``_private_copy``),
so a module cut short in place afterwards cannot fault the process. A module that fails costs one line on
stderr (``rejected`` says why, and whether the command line's next background build replaces it); the JIT runs.

The JIT twin's package (``_JitPackage``) can be imported by any process, not only by an AOT one: the twin and the
kernels it stands for share Numba's on-disk cache, and an entry the twin compiled names the twin's module.
Where Numba finds no folder it may write its cache to (a read-only install, home and NUMBA_CACHE_DIR), the
kernels compile in memory (``njit`` here, said in one line).
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import platform
import stat
import sys
import tempfile
import threading
from functools import partial
from pathlib import Path

from . import cpus

KERNELS_DIR = Path(__file__).resolve().parent
# The kernel files imported again in JIT mode, for the calls the AOT module has no signature for.
JIT_PACKAGE = "npmobile._jit_kernels"
MODULE_NAME = "npmobile_kernels_aot"
MANIFEST = "exports.json"
# NUMBA_* settings that leave the compiled code and the threads as the AOT module has them.
_HARMLESS_NUMBA_SETTINGS = {"NUMBA_NUM_THREADS", "NUMBA_CACHE_DIR"}
# numba.threading_layer()'s names -> the library of each under numba/np/ufunc/.
THREADING_LIBRARIES = {"omp": "omppool", "tbb": "tbbpool", "workqueue": "workqueue"}


# --- where the module lives and what it must match -----------------------------------------------------

def kernel_cache_dir() -> Path:
    """$NPMOBILE_KERNELS_DIR, else $NPMOBILE_CACHE_DIR/kernels, else $XDG_CACHE_HOME/npmobile/kernels, else
    ~/.cache/npmobile/kernels."""
    if os.environ.get("NPMOBILE_KERNELS_DIR"):
        return Path(os.environ["NPMOBILE_KERNELS_DIR"]).expanduser()
    if os.environ.get("NPMOBILE_CACHE_DIR"):
        return Path(os.environ["NPMOBILE_CACHE_DIR"]).expanduser() / "kernels"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "npmobile" / "kernels"


def _installed_version(package: str) -> str:
    """A package's version from its dist-info directory name, without importing it (or importlib.metadata)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return "none"
    site = os.path.dirname(list(spec.submodule_search_locations)[0])
    for name in sorted(os.listdir(site)):
        if name.startswith(package + "-") and name.endswith(".dist-info"):
            return name[len(package) + 1:-len(".dist-info")]
    return "unknown"


def _cpu_identity() -> str:
    """The CPU's model and feature flags (Linux: /proc/cpuinfo's first processor), else what platform says."""
    try:
        with open("/proc/cpuinfo") as f:
            fields = {}
            for line in f:
                if not line.strip():
                    break
                name, _, value = line.partition(":")
                fields[name.strip()] = value.strip()
        return " ".join(fields.get(k, "") for k in ("vendor_id", "model name", "flags", "Features", "CPU part"))
    except OSError:
        return platform.processor() + " " + platform.machine()


def cache_key() -> str:
    """What an AOT module must have been built for to be used here, as a short hash."""
    sources = hashlib.sha256()
    for path in sorted([*KERNELS_DIR.glob("*.py"), *KERNELS_DIR.glob("*.c")]):
        sources.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    parts = {
        "numba": _installed_version("numba"),
        "llvmlite": _installed_version("llvmlite"),
        "python": sys.implementation.cache_tag + importlib.machinery.EXTENSION_SUFFIXES[0],
        "cpu": _cpu_identity(),
        "sources": sources.hexdigest(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def module_dir() -> Path:
    """Where the AOT module for this machine and these sources is (or would be)."""
    return kernel_cache_dir() / cache_key()


def aot_wanted() -> bool:
    """False when the environment asks for the JIT (NPMOBILE_KERNELS=jit, or a NUMBA_* setting the AOT module
    was not built with)."""
    if os.environ.get("NPMOBILE_KERNELS", "").lower() == "jit":
        return False
    return not any(k.startswith("NUMBA_") and k not in _HARMLESS_NUMBA_SETTINGS for k in os.environ)


# --- the AOT module, loaded without Numba ---------------------------------------------------------------

def default_thread_count() -> int:
    """The thread pool's size: NUMBA_NUM_THREADS when set, else the CPUs this process may use (its affinity
    mask and cgroup CPU quota, kernels/cpus.py). Made Numba's setting too, so that a Numba imported later
    (the JIT twin, or the JIT itself) starts a pool of the same size."""
    cpus.set_numba_default()
    return cpus.default_thread_count()


class ModuleRejected(Exception):
    """A built module that is there but may not be used: why (naming the file), and whether a new build
    replaces it (a damaged module or key folder: yes; a cache folder others may write to: no, a build would
    land in the same folder)."""

    def __init__(self, reason: str, rebuild: bool = True):
        super().__init__(reason)
        self.rebuild = rebuild


# Why the module in the kernel cache was not used (None: it was, or there is none); the command line's
# background build (npmobile/cli/build_kernels.py) rebuilds it when ``rebuild`` says so.
rejected: ModuleRejected | None = None
# A manifest is a few hundred kilobytes at most; anything far larger is not one.
_MAX_MANIFEST_BYTES = 16 * 2**20


def private_enough(st: os.stat_result) -> str | None:
    """Why a file or folder with this stat may not hold code npmobile loads, or None: it must belong to this
    user or to root (a module built into a container image at build time) and be writable by nobody else."""
    if st.st_uid not in (os.geteuid(), 0):
        return f"it belongs to another user (uid {st.st_uid})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"others may write to it (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _read_nofollow(name: str, dir_fd: int, limit: int | None = None) -> tuple[bytes, os.stat_result]:
    """The bytes of ``name`` in the folder ``dir_fd`` (never through a symlink) and its stat, taken from the
    open file: what is checked is what is read."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{name} is not a regular file")
        size = st.st_size if limit is None else min(st.st_size, limit)
        chunks, read = [], 0
        while read < size:
            chunk = os.read(fd, min(size - read, 1 << 22))
            if not chunk:
                break
            chunks.append(chunk)
            read += len(chunk)
        return b"".join(chunks), st
    finally:
        os.close(fd)


def verify_module(directory: Path) -> tuple[dict, bytes] | None:
    """The manifest and the bytes of the module in ``directory`` (kernel_cache_dir() / key) once checked, or
    None when no module is built there. Raises ModuleRejected when one is there but may not be used:

    - the cache folder and the key folder are real folders, not symlinks, and they, the manifest and the module
      belong to this user or root and are writable by nobody else (``private_enough``);
    - the manifest names this key, and the module's size and SHA-256, written by the build once the module was
      complete, match the bytes read here -- the bytes then loaded (``_private_copy``), so a file changed or cut
      short after this check cannot reach the loader.
    """
    root = directory.parent
    try:
        root_stat = os.lstat(root)
    except OSError:
        return None
    if stat.S_ISLNK(root_stat.st_mode):
        raise ModuleRejected(f"the kernel cache {root} is a symlink (give its real path)", rebuild=False)
    if not stat.S_ISDIR(root_stat.st_mode):
        return None
    why = private_enough(root_stat)
    if why is not None:
        raise ModuleRejected(f"the kernel cache {root}: {why}", rebuild=False)
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    except OSError as error:
        raise ModuleRejected(f"{directory}: not a folder npmobile may load from ({error.strerror})") from None
    try:
        why = private_enough(os.fstat(dir_fd))
        if why is not None:
            raise ModuleRejected(f"{directory}: {why}")
        try:
            text, st = _read_nofollow(MANIFEST, dir_fd, _MAX_MANIFEST_BYTES)
        except FileNotFoundError:
            return None
        except OSError as error:
            raise ModuleRejected(f"{directory / MANIFEST}: cannot be read ({error})") from None
        why = private_enough(st)
        if why is not None:
            raise ModuleRejected(f"{directory / MANIFEST}: {why}")
        try:
            manifest = json.loads(text)
            expected = manifest["module"]
            name, size, digest = expected["file"], int(expected["bytes"]), str(expected["sha256"])
        except (ValueError, KeyError, TypeError):
            raise ModuleRejected(f"{directory / MANIFEST}: not a manifest this npmobile wrote (no checksum)") from None
        if manifest.get("key") != directory.name:
            return None
        if name != MODULE_NAME + importlib.machinery.EXTENSION_SUFFIXES[0]:
            raise ModuleRejected(f"{directory / MANIFEST}: names a module file {name!r}")
        path = directory / name
        try:
            data, st = _read_nofollow(name, dir_fd, size + 1)
        except OSError as error:
            raise ModuleRejected(f"{path}: cannot be read ({error.strerror or error})") from None
        why = private_enough(st)
        if why is not None:
            raise ModuleRejected(f"{path}: {why}")
        if len(data) != size:
            raise ModuleRejected(f"{path}: {len(data)} bytes where its build wrote {size} (cut short or changed)")
        if hashlib.sha256(data).hexdigest() != digest:
            raise ModuleRejected(f"{path}: its bytes do not match the checksum its build wrote (damaged or changed)")
        return manifest, data
    finally:
        os.close(dir_fd)


def _private_copy(data: bytes) -> tuple[str, object]:
    """A path to a copy of ``data`` that only this process can reach (an anonymous memory file on Linux, else a
    file in a private temporary folder, removed by the returned cleanup once loaded): the loader maps what was
    checked, and a module file cut short meanwhile cannot make it fault (SIGBUS)."""
    if hasattr(os, "memfd_create"):
        try:
            fd = os.memfd_create(MODULE_NAME, getattr(os, "MFD_CLOEXEC", 0))
        except OSError:
            fd = None
        if fd is not None:
            with open(fd, "wb", closefd=False) as f:
                f.write(data)
            return f"/proc/self/fd/{fd}", lambda: os.close(fd)
    folder = tempfile.mkdtemp(prefix="npmobile-kernels-")
    path = os.path.join(folder, MODULE_NAME + importlib.machinery.EXTENSION_SUFFIXES[0])
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o700)
    with open(fd, "wb") as f:
        f.write(data)

    def remove() -> None:
        os.unlink(path)
        os.rmdir(folder)

    return path, remove


class _Loaded:
    """The AOT module with its manifest and the threading layer's functions."""

    def __init__(self, directory: Path, manifest: dict, data: bytes):
        suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
        path, cleanup = _private_copy(data)
        try:
            self._load(path, manifest, suffix)
        finally:
            cleanup()  # what is loaded stays mapped
        self.manifest = manifest
        self.directory = directory

    def _load(self, path: str, manifest: dict, suffix: str) -> None:
        # 1. The threading layer Numba's JIT uses, as a library whose symbols the kernels' parallel loops link
        #    to (the scheduler: do_scheduling_signed, ...), and as a Python extension (its init gives the
        #    addresses of parallel_for, get/set_num_threads, launch_threads). numba itself is not imported.
        numba_dir = list(importlib.util.find_spec("numba").submodule_search_locations)[0]
        name = THREADING_LIBRARIES[manifest["threading_layer"]]
        library = os.path.join(numba_dir, "np", "ufunc", name + suffix)
        ctypes.CDLL(library, mode=ctypes.RTLD_GLOBAL)
        spec = importlib.util.spec_from_file_location(name, library)  # not put in sys.modules
        layer = importlib.util.module_from_spec(spec)
        # 2. The module's own C shim (kernels/aot_shim.c) forwards numba_parallel_for, get_num_threads and
        #    npmobile_sgemm, which no library exports, to those addresses.
        self.shim = ctypes.CDLL(path)
        self.shim.npm_set_threading(ctypes.c_void_p(layer.parallel_for), ctypes.c_void_p(layer.get_num_threads))
        # 3. Start the pool as Numba does (NUMBA_NUM_THREADS threads), then load the kernels.
        self.max_threads = default_thread_count()
        ctypes.CFUNCTYPE(None, ctypes.c_int)(layer.launch_threads)(self.max_threads)
        self.set_num_threads = ctypes.CFUNCTYPE(None, ctypes.c_int)(layer.set_num_threads)
        self.get_num_threads = ctypes.CFUNCTYPE(ctypes.c_int)(layer.get_num_threads)
        self.set_num_threads(self.max_threads)
        loader = importlib.machinery.ExtensionFileLoader(MODULE_NAME, path)
        spec = importlib.util.spec_from_file_location(MODULE_NAME, path, loader=loader)
        self.module = importlib.util.module_from_spec(spec)


def _say_rejected(why: ModuleRejected) -> None:
    """The one line a run prints about a module it may not use (the library's only output: a user whose
    fast start-up silently went away would never learn why)."""
    after = ("; the next command-line run builds a new one" if why.rebuild and os.environ.get("NPMOBILE_AUTO_BUILD")
             != "0" else "")
    if sys.stderr is not None:  # none at all under pythonw or a detached service
        sys.stderr.write(f"npmobile: kernel module not used: {why}; the kernels run on Numba's JIT{after}\n")


def _load() -> _Loaded | None:
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
            return _Loaded(directory, *found)
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

def _type_key(value) -> str | None:
    """The exported-signature spelling of an argument's Numba type, or None for a type no export takes."""
    kind = type(value)
    if kind is _ndarray:
        flags = value.flags
        if not flags.aligned:
            return None
        layout = "C" if flags.c_contiguous else "F" if flags.f_contiguous else "A"
        return f"{value.dtype.name}:{value.ndim}:{layout}:{'w' if flags.writeable else 'r'}"
    if kind is int:
        return "int64" if -(2**63) <= value < 2**63 else None
    return _SCALAR_KEYS.get(kind)


class AotKernel:
    """A kernel from the AOT module: the export whose signature the arguments match, else the JIT twin."""

    def __init__(self, function, options: dict):
        self.py_func = function
        self.options = options
        self.name = f"{function.__module__}.{function.__qualname__}"
        self.__name__, self.__qualname__, self.__doc__ = function.__name__, function.__qualname__, function.__doc__
        exported = _loaded.manifest["kernels"].get(self.name, [])
        self.exports = {tuple(sig): getattr(_loaded.module, symbol) for sig, symbol in exported}
        self._twin = None

    def twin(self):
        """The JIT-compiled form of this kernel (imports Numba)."""
        if self._twin is None:
            self._twin = jit_twin(self.py_func.__module__, self.py_func.__qualname__)
        return self._twin

    def resolve(self, *args):
        """The function to run on arguments of these types: the matching export, else the JIT twin."""
        export = self.exports.get(tuple(_type_key(a) for a in args))
        return export if export is not None else self.twin()

    def __call__(self, *args, **kwargs):
        if kwargs:
            return self.twin()(*args, **kwargs)
        return self.resolve(*args)(*args)

    def __getattr__(self, name):  # a dispatcher's attributes (signatures, stats, ...): the twin's
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.twin(), name)

    def __repr__(self) -> str:
        return f"<AotKernel {self.name}: {len(self.exports)} exported signatures>"


def resolved(call):
    """A bound call (``partial(kernel, *args)``) with its AOT kernel chosen for these arguments, once."""
    if isinstance(call, partial) and isinstance(call.func, AotKernel) and not call.keywords:
        chosen = partial(call.func.resolve(*call.args), *call.args)
        if getattr(call, "calls_blas", False):  # kernels/entry.py's mark goes with it
            chosen.calls_blas = True
        return chosen
    return call


if AOT:
    import numpy as _np

    _ndarray = _np.ndarray
    _SCALAR_KEYS = {float: "float64", bool: "bool", _np.float32: "float32", _np.float64: "float64",
                    _np.int64: "int64", _np.int32: "int32", _np.bool_: "bool"}

    def njit(*args, **options):
        """Like numba.njit, for a kernel file in AOT mode: the function becomes an AotKernel."""
        if args and callable(args[0]):
            return AotKernel(args[0], options)
        return lambda function: AotKernel(function, options)

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

    def target_has_avx512() -> bool:
        """The AVX-512 decision the module was built with (kernels/gemm.py's tiles depend on it)."""
        return bool(_loaded.manifest["avx512"])

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

    def target_has_avx512() -> bool:
        """Whether the code Numba compiles may use AVX-512 (NUMBA_CPU_NAME/FEATURES, else the host)."""
        from numba.core import config

        if config.CPU_NAME and config.CPU_NAME != "host":
            return "+avx512f" in (config.CPU_FEATURES or "")
        import llvmlite.binding as llvm

        return bool(llvm.get_host_cpu_features().get("avx512f", False))

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
