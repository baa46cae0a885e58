"""The built kernel module: checked before it is loaded (``verify_module``), then loaded without Numba
(``LoadedModule``).

A module is native code, so the cache folder, the key folder and the files must not be symlinks, must belong to
this user or root and be writable by nobody else (``private_enough``), and the module's size and SHA-256, which the
build writes into the manifest once the module is complete, must match. The bytes checked are the bytes loaded: a
private in-memory copy (``private_copy``), so a module cut short in place afterwards cannot fault the process.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import stat
import tempfile
from pathlib import Path

from . import cpus
from .module_key import MANIFEST, MODULE_NAME

# numba.threading_layer()'s names -> the library of each under numba/np/ufunc/.
THREADING_LIBRARIES = {"omp": "omppool", "tbb": "tbbpool", "workqueue": "workqueue"}


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
      complete, match the bytes read here -- the bytes then loaded (``private_copy``), so a file changed or cut
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


def private_copy(data: bytes) -> tuple[str, object]:
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


class LoadedModule:
    """The AOT module with its manifest and the threading layer's functions."""

    def __init__(self, directory: Path, manifest: dict, data: bytes):
        suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
        path, cleanup = private_copy(data)
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

