"""Build the ahead-of-time kernel module (what ``npmobile build-kernels`` runs, in a process of its own).

    python -m npmobile.kernels.build [--quick] [--root DIR]

1. **Which signatures.** Nobody writes the export table: the MobileNets run through the JIT (every family of
   npmobile.applications with random weights, at a few sizes and batches, on one thread and on all), and
   every signature each kernel dispatcher then holds (``dispatcher.signatures``) is exported. A call with
   other argument types later takes the JIT twin (kernels/backend.py), never an export.
2. **How each is compiled.** numba.pycc compiles an export with plain flags; here each gets its dispatcher's
   own (parallel, fastmath, error model: ``targetdescr.options.parse_as_flags``), and the host CPU's name
   and features, as the JIT has them: the same machine code, the same bits.
3. **Where it goes.** Into a staging folder beside ``backend.kernel_cache_dir() / cache_key()``
   (``.build-<host>-<pid>-...``), flushed to disk, then renamed into place (``install``): a reader sees a
   complete module or none, and a module is never rewritten in place. ``exports.json`` beside the module lists,
   per kernel, each signature (as ``backend._type_key`` spells an argument's type) and its symbol, with the
   CPU decision (AVX-512) and threading layer the module was built with, the workload it ran (which models'
   kernels it covers) and the module's size and SHA-256 (``backend.verify_module`` checks them at every load).
   Folders are made readable by others (umask permitting) and writable only by their owner: a module built by
   root into a container image is loaded by the unprivileged user the container runs as.
4. **Who builds.** One build at a time per kernel cache: foreground or background, a build holds the cache's
   lock (``build.lock``: pid, start time, host). A foreground build waits for a build of this host, stops in one
   line for another host's, says when a current module is there already (``--force`` builds anyway), and
   removes the staging folders of builds that were killed halfway (``clean_abandoned``).

Needs a C compiler (pycc links the module with it).

``--background`` is how the command line starts it by itself after a run on the JIT (npmobile/cli/build_kernels.py:
``start_in_background``): at low priority, holding the cache's build lock (``take_lock``: taken by the starter,
handed to this process, released here when done), its output in ``<key>.log``, and on failure a ``<key>.failed``
marker (holding the log's path) so that no later run starts it again for this key; a build that succeeds, manual
or not, removes the marker. Files in the cache are made by exclusive creation or a temporary name and a rename,
never written through a link. The build runs as an isolated child (npmobile/children.py: ``python -I``, no
PYTHON* variables, started in ``/``): nothing in the user's working folder is imported.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
import traceback
import warnings
from pathlib import Path

from npmobile.errors import NpmobileError

# (family, alpha, sizes, batches): what the export table is derived from. 224 runs V2's fused expand+depthwise
# blocks; 128 and 96 the smaller maps (other tiles, the serial forms); batch 2 the batched forms. V3-Large at
# alpha 0.75 has 3x3 hard-swish depthwise layers whose channels take the by-pixel row order, which no
# alpha-1 family has: without it that row kernel would come from the JIT twin (Numba's import, at start-up).
WORKLOAD = tuple((family, 1.0, (224, 128, 96), (1, 2)) for family in
                 ("mobilenet", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large")) + (
    ("mobilenet_v3_large", 0.75, (224,), (1,)),)
# A small module (tests, a quick try): the two models tests/test_aot.py checks, at one size.
QUICK_WORKLOAD = (("mobilenet_v2", 1.0, (96,), (1,)), ("mobilenet_v3_small", 1.0, (96,), (1,)))
# The kernel cache's build lock: "pid start-time"; older than this, or its process gone, it is stale.
LOCK = "build.lock"
STALE_LOCK_SECONDS = 30 * 60


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


# --- the build's files in the kernel cache ---------------------------------------------------------------
# Every file here is made by exclusive creation (O_EXCL: never through a planted link) or under a temporary
# name and renamed into place; a module folder is only ever replaced by rename, never rewritten in place.

def log_path(root: Path, key: str) -> Path:
    return Path(root) / f"{key}.log"


def failure_marker(root: Path, key: str) -> Path:
    """Present after a background build for ``key`` failed: it holds the log's path."""
    return Path(root) / f"{key}.failed"


def create_new(path: Path, mode: int = 0o644) -> int:
    """A descriptor of a new, empty file at ``path``: whatever was there (a file, a planted symlink) is
    removed first, and the file is created exclusively, so nothing is ever written through a link."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), mode)


def write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    """``path`` holds ``data``: written to a new temporary file beside it, flushed to disk, renamed over it."""
    fd, temporary = tempfile.mkstemp(prefix=f".{Path(path).name}-", dir=Path(path).parent)
    try:
        with open(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, mode & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def make_cache_folder(root: Path) -> None:
    """Make the kernel cache folder, writable by its owner only whatever the umask (a group-writable folder,
    which a umask of 002 gives, is one backend.verify_module refuses to load from)."""
    Path(root).parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(root, 0o755 & ~_umask())
    except FileExistsError:
        pass


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read_small(path: Path, limit: int = 4096) -> str:
    """The start of a small text file, never through a symlink (a lock, a marker)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    try:
        return os.read(fd, limit).decode(errors="replace")
    finally:
        os.close(fd)


def this_host() -> str:
    return os.uname().nodename if hasattr(os, "uname") else "localhost"


def _lock_holder(text: str, modified: float) -> tuple[int, float, str]:
    """(pid, start time, host) of a lock's text; a lock still being written: no pid, its file's time."""
    fields = text.split()
    try:
        return int(fields[0]), float(fields[1]), fields[2] if len(fields) > 2 else this_host()
    except (ValueError, IndexError):
        return 0, modified, this_host()


def lock_is_stale(text: str, modified: float) -> bool:
    """Whether a lock's holder is gone: older than STALE_LOCK_SECONDS, or a process of this host that has
    ended. A lock of another host (a kernel cache on a shared file system) is alive until it is that old."""
    pid, started, host = _lock_holder(text, modified)
    if time.time() - started > STALE_LOCK_SECONDS:
        return True
    if pid <= 0 or host != this_host():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # someone else's process: alive
        return False
    return False


def lock_text(root: Path) -> str | None:
    """Who holds the build lock of ``root`` ("pid start-time host"), or None."""
    try:
        return read_small(Path(root) / LOCK)
    except FileNotFoundError:
        return None


def take_lock(root: Path) -> int | None:
    """The build lock of ``root`` as an open descriptor holding this process's pid, or None if a live build
    holds it. A stale lock is moved aside and checked, so that two processes cannot both replace it."""
    path = Path(root) / LOCK
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        except FileExistsError:
            try:
                text, modified = read_small(path), os.lstat(path).st_mtime
            except FileNotFoundError:  # released meanwhile
                continue
            except OSError:  # not a file we would have made (a symlink, a folder): remove it as stale
                text, modified = "", 0.0
            if not lock_is_stale(text, modified):
                return None
            aside = path.with_name(f"{LOCK}.{os.getpid()}.stale")
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                continue
            try:
                replaced = read_small(aside) != text
            except OSError:
                replaced = False
            if replaced:  # another process replaced it first: put its lock back
                try:
                    os.link(aside, path)
                except FileExistsError:
                    pass
                aside.unlink()
                return None
            shutil.rmtree(aside) if aside.is_dir() and not aside.is_symlink() else aside.unlink()
            continue
        hand_lock(fd, os.getpid())
        return fd
    return None


def wait_for_lock(root: Path, say=None, poll: float = 1.0) -> int | None:
    """The build lock of ``root``, waiting while a build of this host holds it (``say(text)`` once, when it
    starts waiting); None when another host's build holds it (that one cannot be checked from here)."""
    said = False
    while True:
        fd = take_lock(root)
        if fd is not None:
            return fd
        text = lock_text(root)
        if text is None:
            continue
        if _lock_holder(text, 0)[2] != this_host():
            return None
        if say is not None and not said:
            say(text)
            said = True
        time.sleep(poll)


def hand_lock(fd: int, pid: int) -> None:
    """Make the lock open as ``fd`` say that process ``pid`` of this host holds it (the starter hands it to
    the build)."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{pid} {time.time():.0f} {this_host()}\n".encode(), 0)


def release_lock(root: Path, pid: int | None = None) -> None:
    """Remove the build lock if process ``pid`` (default: this one) of this host holds it."""
    path = Path(root) / LOCK
    try:
        pid_held, _, host = _lock_holder(read_small(path), 0)
        if pid_held == (pid or os.getpid()) and host == this_host():
            path.unlink()
    except OSError:
        pass


# Staging folders: ".build-<host>-<pid>-<random>" while a build writes a module, ".old-..." while one is
# replaced. One whose process is gone (a build killed halfway) is removed by the next build.
def _staging_prefix(kind: str) -> str:
    return f".{kind}-{this_host()}-{os.getpid()}-"


def clean_abandoned(root: Path) -> list[Path]:
    """Remove the staging folders of builds of this host that ended without finishing (killed, power cut);
    returns them. Called with the lock held: no build of this cache is running but this one."""
    removed = []
    for path in Path(root).iterdir():
        parts = path.name.split("-")
        if not path.name.startswith((".build-", ".old-")) or len(parts) < 4:
            continue
        host, pid = "-".join(parts[1:-2]), parts[-2]
        try:
            alive = host != this_host() or int(pid) == os.getpid() or _alive(int(pid))
        except ValueError:
            continue
        if not alive and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def install(staging: Path, final: Path, force: bool = False) -> Path:
    """Rename the complete module folder ``staging`` to ``final`` (root / key). A damaged module there (or any,
    with ``force``) is moved aside first and dropped; a complete one, which another builder of the same key put
    there meanwhile, is as good as this one (the same sources, CPU and versions) and is kept, this one dropped:
    the loser of that race neither fails nor leaves a failure marker."""
    root = final.parent
    for _ in range(5):
        try:
            os.rename(staging, final)
            break
        except OSError as error:
            if error.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
                raise
        if not force and _is_complete(final):
            break  # the same build, by another process: use theirs
        old = Path(tempfile.mkdtemp(prefix=_staging_prefix("old"), dir=root))
        try:
            os.rename(final, old / final.name)
        except FileNotFoundError:  # the other builder moved it meanwhile: try again
            pass
        finally:
            shutil.rmtree(old, ignore_errors=True)
    else:
        raise NpmobileError(f"{final}: could not replace the kernel module there (another process keeps writing it)")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        fsync_path(root, directory=True)
    except OSError:
        pass
    return final


def _is_complete(directory: Path) -> bool:
    """Whether ``directory`` holds a module that its manifest's checksum vouches for."""
    from npmobile.kernels import backend

    try:
        return backend.verify_module(directory) is not None
    except backend.ModuleRejected:
        return False


def run_workload(workload) -> None:
    """Run every model of ``workload`` through the JIT, on one thread and on all of them."""
    import numpy as np

    from npmobile.applications import FAMILIES
    from npmobile.kernels.threads import max_threads

    rng = np.random.default_rng(0)
    threads = sorted({1, max_threads()})
    for family, alpha, sizes, batches in workload:
        for size in sizes:
            model = FAMILIES[family](weights=None, input_shape=(size, size, 3), alpha=alpha)
            for batch in batches:
                x = rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
                for n in threads:
                    model.predict(x, threads=n)


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
    from npmobile.kernels import backend

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

    from npmobile.kernels import backend

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


def describe_workload(workload) -> list[dict]:
    """The workload as the manifest records it: which models' kernels the module covers."""
    return [{"family": family, "alpha": alpha, "sizes": list(sizes), "batches": list(batches)}
            for family, alpha, sizes, batches in workload]


def build(root: Path | None = None, workload=WORKLOAD, force: bool = False) -> tuple[Path, dict]:
    """Build the module for this machine into ``root`` / cache_key() (root: backend.kernel_cache_dir()).

    Returns the module's path and a summary (exports, seconds, bytes). Runs in JIT mode only.
    """
    from npmobile.kernels import backend

    if backend.AOT:
        raise NpmobileError("building kernels needs the JIT: run with NPMOBILE_KERNELS=jit")
    missing = missing_tools()
    if missing is not None:
        raise NpmobileError(missing)
    import numba

    from npmobile.kernels import gemm

    start = time.perf_counter()
    run_workload(workload)
    dispatchers = kernel_dispatchers()
    table = export_table(dispatchers)
    cfuncs = cfunc_table()
    ran = time.perf_counter()
    root = Path(root) if root is not None else backend.kernel_cache_dir()
    key = backend.cache_key()
    make_cache_folder(root)
    staging = Path(tempfile.mkdtemp(prefix=_staging_prefix("build"), dir=root))
    try:
        path = compile_module(table, dispatchers, cfuncs, staging)
        kernels: dict[str, list] = {}
        for name, symbol, _sig, keys in table:
            kernels.setdefault(name, []).append([list(keys), symbol])
        manifest = {"key": key, "numba": numba.__version__, "threading_layer": backend.threading_layer(),
                    "avx512": bool(gemm.AVX512), "kernels": kernels,
                    "cfuncs": {name: symbol for name, symbol, _compiled in cfuncs},
                    "workload": describe_workload(workload), "module": module_entry(path)}
        fd = create_new(staging / backend.MANIFEST)
        with open(fd, "w") as f:
            f.write(json.dumps(manifest, indent=1))
            f.flush()
            os.fsync(f.fileno())
        # Readable by other users unless the umask says otherwise (a module built into a container image by
        # root is loaded by the unprivileged user the container runs as); writable by this user only.
        os.chmod(staging, 0o755 & ~_umask())
        os.chmod(path, 0o755 & ~_umask())
        os.chmod(staging / backend.MANIFEST, 0o644 & ~_umask())
        fsync_path(staging, directory=True)
        final = install(staging, root / key, force=force)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    failure_marker(root, key).unlink(missing_ok=True)  # a build that works clears an earlier failure
    module = final / path.name
    return module, {"exports": len(table), "kernels": len(kernels), "cfuncs": len(cfuncs), "workload_s": ran - start,
                    "compile_s": time.perf_counter() - ran, "bytes": module.stat().st_size,
                    "covers": covers(manifest)}


def covers(manifest: dict) -> str:
    """Which models' kernels a module holds, in words (from its manifest's workload)."""
    workload = manifest.get("workload")
    if not workload:
        return "unknown models"
    return "; ".join(f"{w['family']}{alpha_words(w.get('alpha', 1.0))} at {'/'.join(map(str, w['sizes']))} px, "
                     f"batch {'/'.join(map(str, w['batches']))}" for w in workload)


def alpha_words(alpha: float) -> str:
    return "" if alpha == 1.0 else f" alpha {alpha:g}"


def current_module(root: Path) -> tuple[Path, dict] | None:
    """The module in ``root`` for this machine if it is complete and checks out, with its manifest."""
    from npmobile.kernels import backend

    directory = Path(root) / backend.cache_key()
    try:
        found = backend.verify_module(directory)
    except backend.ModuleRejected:
        return None
    if found is None:
        return None
    manifest = found[0]
    return directory / manifest["module"]["file"], manifest


def holds_workload(manifest: dict, workload) -> bool:
    """Whether a module's manifest says its build ran at least ``workload`` (every family, size and batch)."""
    ran = {(w["family"], size, batch) for w in manifest.get("workload") or ()
           for size in w["sizes"] for batch in w["batches"]}
    return all((family, size, batch) in ran for family, sizes, batches in workload for size in sizes
               for batch in batches)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m npmobile.kernels.build", description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, help="the kernel cache directory (default: backend.kernel_cache_dir())")
    parser.add_argument("--quick", action="store_true", help="a small module: V2 and V3-Small at 96 px, batch 1")
    parser.add_argument("--force", action="store_true", help="build even if a current module is there")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    parser.add_argument("--background", action="store_true",
                        help="started by the command line: low priority; release the build lock when done, and "
                             "on failure leave <key>.failed in the cache")
    args = parser.parse_args(argv)
    os.environ["NPMOBILE_KERNELS"] = "jit"  # the build runs the JIT (before the kernels are first imported)
    from npmobile.kernels import backend

    root = args.root if args.root is not None else backend.kernel_cache_dir()
    args.root = root
    if args.background:
        return build_in_background(args)
    try:
        make_cache_folder(root)
        lock = wait_for_lock(root, say=lambda text: print(
            f"npmobile: another build of the kernels (pid {text.split()[0]}) is running; waiting for it",
            file=sys.stderr))
    except OSError as error:
        print(f"npmobile: cannot build the kernels into {root}: {error.strerror or error}", file=sys.stderr)
        return 1
    if lock is None:
        print(f"npmobile: the kernel cache {root} is locked by a build on another host ({lock_text(root)!r}); if "
              f"none runs there, remove {root / LOCK}", file=sys.stderr)
        return 1
    try:
        os.close(lock)
        clean_abandoned(root)
        workload = QUICK_WORKLOAD if args.quick else WORKLOAD
        current = None if args.force else current_module(root)
        if current is not None and holds_workload(current[1], workload):
            print(json.dumps({"module": str(current[0]), "current": True, "covers": covers(current[1])}))
            return 0
        return build_and_report(args)
    finally:
        release_lock(root)


def build_in_background(args) -> int:
    """The build the command line started (its lock handed to this process): at low priority, a failure's
    traceback into the log and a failure marker beside it, the lock released at the end."""
    from npmobile.kernels import backend

    os.nice(10)  # the user's own work first
    root = args.root
    args.debug, code = True, 1  # the log gets a failure's traceback
    try:
        clean_abandoned(root)
        code = build_and_report(args)
    except Exception:
        traceback.print_exc()
    finally:
        if code != 0:
            key = backend.cache_key()
            try:
                write_atomically(failure_marker(root, key), f"{log_path(root, key)}\n".encode())
            except OSError:  # a full or read-only cache: nothing more to leave
                traceback.print_exc()
        release_lock(root)
    return code


def build_and_report(args) -> int:
    """Build as ``args`` say; print the summary as one JSON line, or a failure as one line on stderr."""
    try:
        module, summary = build(args.root, QUICK_WORKLOAD if args.quick else WORKLOAD, force=args.force)
    except NpmobileError as error:
        if args.debug:
            raise
        print(f"npmobile: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # a read-only or full cache folder
        if args.debug:
            raise
        print(f"npmobile: building the kernels failed: {error}".splitlines()[0], file=sys.stderr)
        return 1
    except Exception as error:  # pycc, the compiler or the linker: one line (--debug for the traceback)
        if args.debug:
            raise
        print(f"npmobile: building the kernels failed: {type(error).__name__}: {error}".splitlines()[0],
              file=sys.stderr)
        return 1
    print(json.dumps({"module": str(module), **summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
