"""How many CPUs this process may use: the cores its affinity mask allows (``taskset``), capped by its
cgroup's CPU quota (a container's ``--cpus``, a Kubernetes CPU limit), rounded up, at least 1.

A container limited to 2 CPUs on a 64-core host still sees 64 cores in its affinity mask; its quota is
the limit that counts. Without it, 64 threads would share 2 CPUs' worth of time, each slice of a
parallel loop waiting for the others to be scheduled.

The quota is read from cgroup v2's ``cpu.max`` ("max 100000", or "200000 100000" for 2 CPUs) and cgroup
v1's ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (-1: none), in the process's own cgroup and in every
cgroup above it (a parent's limit binds its children too): the smallest wins. Nothing here imports Numba,
so the count can be set before Numba starts its thread pool (kernels/backend.py).

``NPMOBILE_CGROUP_ROOT`` names another cgroup file system root than /sys/fs/cgroup (tests point it at a
folder of fake files).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

CGROUP_ROOT = "/sys/fs/cgroup"
# The folders cgroup v1's cpu controller is mounted as (systemd mounts it joined with cpuacct).
V1_CPU_MOUNTS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")


def cgroup_root() -> Path:
    return Path(os.environ.get("NPMOBILE_CGROUP_ROOT") or CGROUP_ROOT)


def own_cgroups(text: str) -> tuple[str, str]:
    """(the cgroup v2 path, the v1 cpu controller's path) of a /proc/self/cgroup text; "/" for one not
    named (a container's cgroup namespace shows its own cgroup as "/")."""
    v2 = v1 = "/"
    for line in text.splitlines():
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":
            v2 = path or "/"
        elif "cpu" in controllers.split(","):
            v1 = path or "/"
    return v2, v1


def _folders_up(base: Path, path: str) -> list[Path]:
    """``base``/``path`` and each folder above it up to ``base`` itself."""
    parts = [p for p in path.split("/") if p]
    return [base.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def quota_v2(folder: Path) -> float | None:
    """CPUs allowed by ``folder``/cpu.max ("max PERIOD": none)."""
    text = _read(folder / "cpu.max")
    if not text:
        return None
    fields = text.split()
    try:
        quota, period = fields[0], int(fields[1]) if len(fields) > 1 else 100_000
        return None if quota == "max" or period <= 0 else int(quota) / period
    except ValueError:
        return None


def quota_v1(folder: Path) -> float | None:
    """CPUs allowed by ``folder``/cpu.cfs_quota_us over cpu.cfs_period_us (-1: none)."""
    quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
    try:
        quota_us, period_us = int(quota or "-1"), int(period or "0")
    except ValueError:
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def cgroup_cpu_limit(root: Path | None = None, membership: str | None = None) -> float | None:
    """The CPUs the cgroup quotas allow this process (the smallest along its cgroup and those above it, v2
    and v1), or None when no quota is set or none can be read. ``membership``: /proc/self/cgroup's text."""
    root = cgroup_root() if root is None else Path(root)
    if membership is None:
        membership = _read(Path("/proc/self/cgroup")) or ""
    v2, v1 = own_cgroups(membership)
    limits = [quota_v2(folder) for folder in _folders_up(root, v2)]
    for mount in V1_CPU_MOUNTS:
        limits += [quota_v1(folder) for folder in _folders_up(root / mount, v1)]
    found = [limit for limit in limits if limit is not None]
    return min(found) if found else None


def affinity_cpus() -> int:
    """The cores this process may run on (its affinity mask; where there is none, the core count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity masks (macOS, Windows)
        return os.cpu_count() or 1


def available_cpus(root: Path | None = None, membership: str | None = None) -> int:
    """The CPUs this process may use: its affinity mask, capped by its cgroup CPU quota rounded up; at least 1."""
    cpus = affinity_cpus()
    limit = cgroup_cpu_limit(root, membership)
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)


def thread_count_setting() -> int | None:
    """NUMBA_NUM_THREADS as set in the environment (a positive integer), else None."""
    try:
        value = int(os.environ.get("NUMBA_NUM_THREADS", ""))
    except ValueError:
        return None
    return value if value > 0 else None


def default_thread_count() -> int:
    """The kernels' thread pool size: NUMBA_NUM_THREADS when set, else the CPUs this process may use."""
    return thread_count_setting() or available_cpus()


def set_numba_default() -> None:
    """Size Numba's pool to ``default_thread_count()`` (NUMBA_NUM_THREADS), before Numba is first imported:
    Numba reads it once, and re-reads it at each compile, refusing a change once its threads run. Set in
    the environment, so processes started from here inherit the same count."""
    if thread_count_setting() is None and "numba" not in sys.modules:
        os.environ["NUMBA_NUM_THREADS"] = str(available_cpus())


def checked_thread_count(threads: int, limit: int) -> int:
    """``threads`` as an int if it is a whole number from 1 to ``limit``, else ThreadCountError (one line)."""
    if isinstance(threads, bool) or not hasattr(threads, "__index__") or not 1 <= threads <= limit:
        from npmobile.errors import ThreadCountError

        raise ThreadCountError(
            f"threads={threads!r}: this process may use 1 to {limit} threads (the CPUs its affinity mask and "
            "cgroup CPU quota allow, or NUMBA_NUM_THREADS when set); leave it unset to use them all")
    return int(threads)
