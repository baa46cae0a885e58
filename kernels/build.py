"""Compile the kernels ahead of time into one native module: which signatures, and how each is compiled.

1. **Which signatures.** Nobody writes the export table: the caller runs its workload through the JIT
   (``exercise``; npmobile/kernel_build.py runs the MobileNets), and every signature each kernel dispatcher then
   holds (``dispatcher.signatures``) is exported. A call with other argument types later takes the JIT twin
   (kernels/backend.py), never an export.
2. **How each is compiled.** numba.pycc compiles an export with plain flags; here each gets its dispatcher's
   own (parallel, fastmath, error model: ``targetdescr.options.parse_as_flags``), and the host CPU's name
   and features, as the JIT has them: the same machine code, the same bits.
3. **What is written.** ``exports.json`` beside the module lists, per kernel, each signature (as
   ``aot_kernel.type_key`` spells an argument's type) and its symbol, with the CPU decision (AVX-512) and threading
   layer the module was built with, the workload the caller ran and the module's size and SHA-256
   (kernels/aot_module.py ``verify_module`` checks them at every load). Where and how it is put in place, and
   the build lock: kernels/cache_files.py.

Needs a C compiler (pycc links the module with it). Knows nothing of models: what to run is the caller's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sysconfig
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from npmobile.errors import NpmobileError

from .cache_files import (
    create_new,
    current_umask,
    failure_marker,
    fsync_path,
    install,
    make_cache_folder,
    staging_prefix,
)


def compiler_available() -> str | None:
    """The C compiler pycc will call, if it is installed."""
    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    return shutil.which(cc)


def missing_tools() -> str | None:
    """Why no module can be built here (no C compiler, no Python headers), or None."""
    if compiler_available() is None:
        return ("build-kernels needs a C compiler to link the module (cc or gcc; e.g. apt install gcc);"
                " without it the kernels keep compiling with Numba's JIT")
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not headers.exists():
        return (f"build-kernels needs Python's C headers ({headers} is missing; e.g. apt install "
                "python3-dev); without them the kernels keep compiling with Numba's JIT")
    return None



def kernel_dispatchers() -> dict:
    """Every kernel Python calls (a Numba dispatcher not inlined into others) of the kernel modules, by name."""
    import importlib

    from numba.core.registry import CPUDispatcher

    found = {}
    for path in sorted(Path(__file__).parent.glob("*.py")):
        module = importlib.import_module(f"npmobile.kernels.{path.stem}")
        for value in vars(module).values():
            if (isinstance(value, CPUDispatcher) and value.py_func.__module__ == module.__name__
                    and value.targetoptions.get("inline") != "always"):
                found[f"{module.__name__}.{value.py_func.__qualname__}"] = value
    return found


def type_key(t) -> str | None:
    """How kernels/backend.py spells an argument of Numba type ``t`` (None: not exportable)."""
    from numba.core import types

    if isinstance(t, types.Array):
        if not t.aligned or t.layout not in "CFA":
            return None
        return f"{t.dtype}:{t.ndim}:{t.layout}:{'w' if t.mutable else 'r'}"
    if isinstance(t, types.Boolean):
        return "bool"
    if isinstance(t, (types.Integer, types.Float)) and str(t) in ("int64", "int32", "float32", "float64"):
        return str(t)
    return None


def export_table(dispatchers: dict) -> list[tuple[str, str, tuple, tuple]]:
    """(kernel, symbol, numba signature, keys) for every exportable signature the dispatchers compiled."""
    table = []
    for name, dispatcher in sorted(dispatchers.items()):
        for i, sig in enumerate(dispatcher.signatures):
            keys = tuple(type_key(t) for t in sig)
            if None in keys:
                continue
            symbol = name.removeprefix("npmobile.kernels.").replace(".", "__") + f"__{i}"
            table.append((name, symbol, sig, keys))
    return table


def cfunc_table() -> list[tuple[str, str, object]]:
    """(name, symbol, cfunc) for every C function the kernels made (backend.int64_cfunc: depthwise's row kernels)."""
    from . import backend

    table = []
    for function, compiled in backend.CFUNCS.items():
        name = f"{function.__module__}.{function.__qualname__}"
        table.append((name, "npmobile_cfunc_" + name.removeprefix("npmobile.kernels.").replace(".", "__"), compiled))
    return sorted(table, key=lambda row: row[0])


def compile_module(table, dispatchers: dict, cfuncs, directory: Path) -> Path:
    """Compile the exports into ``directory`` with numba.pycc, each with its dispatcher's flags; each cfunc
    too, its C wrapper (what numba.cfunc's address points to) made a public symbol of the module."""
    from numba.core import codegen, compiler, types

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numba.pycc's pending deprecation
        import numba.pycc.compiler as pycc_compiler
        from numba.pycc import CC

    from . import backend

    # function -> (target, its options, the C symbol of its cfunc wrapper or None)
    by_function = {d.py_func: (d.targetdescr, d.targetoptions, None) for d in dispatchers.values()}
    for _name, symbol, compiled in cfuncs:
        by_function[compiled.__wrapped__] = (compiled._compiler.targetdescr, compiled._compiler.targetoptions, symbol)
    plain_compile = pycc_compiler.compile_extra

    def compile_with_own_flags(typingctx, targetctx, func, args, return_type, flags, locals, **kw):
        if func not in by_function:
            return plain_compile(typingctx, targetctx, func, args, return_type, flags, locals, **kw)
        target, options, c_symbol = by_function[func]
        own = compiler.Flags()
        target.options.parse_as_flags(own, options)
        for name in ("no_compile", "nrt", "no_cpython_wrapper", "no_cfunc_wrapper"):
            setattr(own, name, getattr(flags, name))
        if c_symbol is not None:  # as numba.cfunc compiles it
            own.no_cfunc_wrapper, own.enable_pyobject = False, False
        result = plain_compile(typingctx, targetctx, func, args, return_type, own, locals, **kw)
        if c_symbol is not None:
            wrapper = result.library.get_function(result.fndesc.llvm_cfunc_wrapper_name)
            wrapper.name, wrapper.linkage = c_symbol, "external"
        return result

    cc = CC(backend.MODULE_NAME)
    cc.output_dir = str(directory)
    cc.target_cpu = "host"
    cc.verbose = False
    cc._mixin_sources = cc._mixin_sources + [str(Path(__file__).with_name("aot_shim.c"))]  # no public hook
    for name, symbol, sig, _keys in table:
        cc.export(symbol, types.void(*sig))(dispatchers[name].py_func)
    for _name, symbol, compiled in cfuncs:
        cc.export(symbol.removeprefix("npmobile_cfunc_") + "__cfunc", compiled._sig)(compiled.__wrapped__)
    plain_init = pycc_compiler.ModuleCompiler.__init__

    def init_exporting_cfuncs(self, *args, **kwargs):  # pycc hides every symbol but its dll_exports
        plain_init(self, *args, **kwargs)
        self.dll_exports.extend(symbol for _name, symbol, _compiled in cfuncs)

    pycc_compiler.compile_extra = compile_with_own_flags
    pycc_compiler.ModuleCompiler.__init__ = init_exporting_cfuncs
    host_features = codegen.AOTCPUCodegen._customize_tm_features
    codegen.AOTCPUCodegen._customize_tm_features = lambda self: self._get_host_cpu_features()
    try:
        cc.compile()
    finally:
        pycc_compiler.compile_extra = plain_compile
        pycc_compiler.ModuleCompiler.__init__ = plain_init
        codegen.AOTCPUCodegen._customize_tm_features = host_features
    return directory / cc.output_file


def module_entry(path: Path) -> dict:
    """The manifest's record of a complete module file: its name, size and SHA-256 (backend.verify_module
    checks them before every load), after flushing it to disk."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
        os.fsync(f.fileno())
        size = f.tell()
    return {"file": path.name, "bytes": size, "sha256": digest.hexdigest()}



def build(exercise: Callable[[], None], workload: list[dict], root: Path | None = None,
          force: bool = False) -> tuple[Path, dict]:
    """Build the module for this machine into ``root`` / cache_key() (root: backend.kernel_cache_dir()).

    ``exercise()`` runs the kernels through the JIT (what the caller knows to run: npmobile/kernel_build.py runs
    the MobileNets); every signature the kernel dispatchers then hold is exported. ``workload`` says in the
    manifest what that run was (which models' kernels the module covers). Returns the module's path and a
    summary (exports, seconds, bytes). Runs in JIT mode only.
    """
    from . import backend, gemm

    if backend.AOT:
        raise NpmobileError("building kernels needs the JIT: run with NPMOBILE_KERNELS=jit")
    missing = missing_tools()
    if missing is not None:
        raise NpmobileError(missing)
    import numba

    start = time.perf_counter()
    exercise()
    dispatchers = kernel_dispatchers()
    table = export_table(dispatchers)
    cfuncs = cfunc_table()
    ran = time.perf_counter()
    root = Path(root) if root is not None else backend.kernel_cache_dir()
    key = backend.cache_key()
    make_cache_folder(root)
    staging = Path(tempfile.mkdtemp(prefix=staging_prefix("build"), dir=root))
    try:
        path = compile_module(table, dispatchers, cfuncs, staging)
        kernels: dict[str, list] = {}
        for name, symbol, _sig, keys in table:
            kernels.setdefault(name, []).append([list(keys), symbol])
        manifest = {"key": key, "numba": numba.__version__, "threading_layer": backend.threading_layer(),
                    "avx512": bool(gemm.AVX512),
                    "cpu_name": backend.target_cpu_name(), "kernels": kernels,
                    "cfuncs": {name: symbol for name, symbol, _compiled in cfuncs},
                    "workload": workload, "module": module_entry(path)}
        fd = create_new(staging / backend.MANIFEST)
        with open(fd, "w") as f:
            f.write(json.dumps(manifest, indent=1))
            f.flush()
            os.fsync(f.fileno())
        # Readable by other users unless the umask says otherwise (a module built into a container image by
        # root is loaded by the unprivileged user the container runs as); writable by this user only.
        os.chmod(staging, 0o755 & ~current_umask())
        os.chmod(path, 0o755 & ~current_umask())
        os.chmod(staging / backend.MANIFEST, 0o644 & ~current_umask())
        fsync_path(staging, directory=True)
        final = install(staging, root / key, force=force)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    failure_marker(root, key).unlink(missing_ok=True)  # a build that works clears an earlier failure
    module = final / path.name
    return module, {"exports": len(table), "kernels": len(kernels), "cfuncs": len(cfuncs), "workload_s": ran - start,
                    "compile_s": time.perf_counter() - ran, "bytes": module.stat().st_size}

