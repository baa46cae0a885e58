"""What a built kernel module must match to be used here, and where it is looked for.

The module is keyed (``cache_key``) on the Numba and llvmlite versions, the Python ABI, the CPU (model and feature
flags), the CPU Numba is told to compile for (NUMBA_CPU_NAME/FEATURES, when set) and the kernel sources
(``kernel_sources_hash``, which also keys Numba's on-disk cache: kernels/jit_cache.py), and looked for in
``kernel_cache_dir()`` / key. Nothing here imports Numba.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import platform
import sys
from pathlib import Path

KERNELS_DIR = Path(__file__).resolve().parent
MODULE_NAME = "npmobile_kernels_aot"
MANIFEST = "exports.json"
# NUMBA_* settings that leave the compiled code and the threads as the AOT module has them.
_HARMLESS_NUMBA_SETTINGS = {"NUMBA_NUM_THREADS", "NUMBA_CACHE_DIR"}
# The CPU Numba compiles for, when not this one (Haswell's AVX2 on an AVX-512 machine): the build compiles for it as
# the JIT does, and the module's key holds it, so a module is used only where the same target is asked for.
_TARGET_NUMBA_SETTINGS = ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES")


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



def kernel_sources_hash(directory: Path = KERNELS_DIR) -> str:
    """SHA-256 of every kernel source file (the ``.py`` and ``.c`` files of ``directory``), names included: a
    change to any of them (an emitter a driver inlines, too) changes it."""
    sources = hashlib.sha256()
    for path in sorted([*Path(directory).glob("*.py"), *Path(directory).glob("*.c")]):
        sources.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return sources.hexdigest()


def cache_key() -> str:
    """What an AOT module must have been built for to be used here, as a short hash."""
    parts = {
        "numba": _installed_version("numba"),
        "llvmlite": _installed_version("llvmlite"),
        "python": sys.implementation.cache_tag + importlib.machinery.EXTENSION_SUFFIXES[0],
        "cpu": _cpu_identity(),
        "target": {name: os.environ[name] for name in _TARGET_NUMBA_SETTINGS if name in os.environ},
        "sources": kernel_sources_hash(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def module_dir() -> Path:
    """Where the AOT module for this machine and these sources is (or would be)."""
    return kernel_cache_dir() / cache_key()


def aot_wanted() -> bool:
    """False when the environment asks for the JIT (NPMOBILE_KERNELS=jit, or a NUMBA_* setting the AOT module
    was not built with; the target CPU's settings are in its key instead)."""
    if os.environ.get("NPMOBILE_KERNELS", "").lower() == "jit":
        return False
    return not any(k.startswith("NUMBA_") and k not in _HARMLESS_NUMBA_SETTINGS and k not in _TARGET_NUMBA_SETTINGS
                   for k in os.environ)

