"""The default thread count is the CPUs this process may use: its affinity mask, capped by its cgroup CPU quota
(kernels/cpus.py), in the JIT and on the built module, in npmobile.dask and npmobile.ray too; a count the
kernels cannot run is refused in one line, by the API and by the command line (exit 2).

The cgroup files are fakes in a temporary folder (NPMOBILE_CGROUP_ROOT), laid out as the kernel lays out
/sys/fs/cgroup."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from npmobile.errors import ThreadCountError
from npmobile.kernels import cpus
from npmobile.kernels.threads import checked_threads, max_threads

REPO = Path(__file__).resolve().parents[1]
V2_MEMBERSHIP = "0::/user.slice/session-1.scope\n"
V1_MEMBERSHIP = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n"


def cgroup_v2(root: Path, path: str, cpu_max: str) -> Path:
    folder = root.joinpath(*path.strip("/").split("/")) if path.strip("/") else root
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cpu.max").write_text(cpu_max + "\n")
    return root


def cgroup_v1(root: Path, mount: str, path: str, quota: int, period: int = 100_000) -> Path:
    folder = (root / mount).joinpath(*path.strip("/").split("/")) if path.strip("/") else root / mount
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (folder / "cpu.cfs_period_us").write_text(f"{period}\n")
    return root


@pytest.mark.parametrize("cpu_max,cpus_allowed", [
    ("100000 100000", 1.0), ("150000 100000", 1.5), ("50000 100000", 0.5), ("max 100000", None),
])
def test_a_cgroup_v2_quota_is_read_from_cpu_max(tmp_path, cpu_max, cpus_allowed):
    root = cgroup_v2(tmp_path, "/user.slice/session-1.scope", cpu_max)
    assert cpus.cgroup_cpu_limit(root, V2_MEMBERSHIP) == cpus_allowed


def test_a_parents_quota_binds_its_children_the_smallest_wins(tmp_path):
    cgroup_v2(tmp_path, "/user.slice", "100000 100000")
    cgroup_v2(tmp_path, "/user.slice/session-1.scope", "300000 100000")
    assert cpus.cgroup_cpu_limit(tmp_path, V2_MEMBERSHIP) == 1.0


@pytest.mark.parametrize("mount", ["cpu", "cpu,cpuacct"])
def test_a_cgroup_v1_quota_is_read_from_the_cfs_files(tmp_path, mount):
    cgroup_v1(tmp_path, mount, "/docker/abc", 250_000)
    assert cpus.cgroup_cpu_limit(tmp_path, V1_MEMBERSHIP) == 2.5
    cgroup_v1(tmp_path, mount, "/docker/abc", -1)  # no quota
    assert cpus.cgroup_cpu_limit(tmp_path, V1_MEMBERSHIP) is None


def test_a_container_sees_its_own_cgroup_at_the_root(tmp_path):
    """In a cgroup namespace the process's path need not exist under the mount: the root's files count."""
    cgroup_v1(tmp_path, "cpu", "/", 100_000)
    assert cpus.cgroup_cpu_limit(tmp_path, V1_MEMBERSHIP) == 1.0


def test_no_cgroup_files_mean_no_limit(tmp_path):
    assert cpus.cgroup_cpu_limit(tmp_path, V2_MEMBERSHIP) is None
    assert cpus.available_cpus(tmp_path, V2_MEMBERSHIP) == cpus.affinity_cpus()


@pytest.mark.parametrize("cpu_max,expected", [("50000 100000", 1), ("100000 100000", 1), ("150000 100000", 2),
                                              ("6400000 100000", None)])
def test_available_cpus_rounds_the_quota_up_and_never_exceeds_the_affinity_mask(tmp_path, cpu_max, expected):
    cgroup_v2(tmp_path, "/", cpu_max)
    expected = cpus.affinity_cpus() if expected is None else min(expected, cpus.affinity_cpus())
    assert cpus.available_cpus(tmp_path, "0::/\n") == expected


def test_the_api_refuses_zero_and_more_threads_than_this_process_may_use():
    from npmobile.applications import MobileNetV3Small

    model = MobileNetV3Small(weights=None, input_shape=(32, 32, 3), include_top=False)
    x = np.zeros((1, 32, 32, 3), np.float32)
    for wrong in (0, max_threads() + 1):
        with pytest.raises(ThreadCountError, match=rf"^threads={wrong}: this process may use 1 to {max_threads()} "):
            model.predict(x, threads=wrong)
    assert checked_threads(None) == max_threads()
    assert checked_threads(np.int64(1)) == 1


def test_a_batch_classifier_refuses_a_count_this_process_cannot_run():
    from npmobile.batch import worker_threads

    assert worker_threads(1) == 1
    with pytest.raises(ThreadCountError):
        worker_threads(max_threads() + 1)


def environment(**env: str) -> dict[str, str]:
    """This process's environment without NUMBA_NUM_THREADS (the kernels set it for themselves), with ``env``."""
    return {**{k: v for k, v in os.environ.items() if k != "NUMBA_NUM_THREADS"}, "NPMOBILE_AUTO_BUILD": "0", **env}


def test_the_cli_refuses_zero_and_more_threads_than_the_quota_allows_with_exit_2(tmp_path):
    one_cpu = environment(NPMOBILE_CGROUP_ROOT=str(cgroup_v2(tmp_path, "/", "100000 100000")))
    image = str(REPO / "samples" / "chelsea.jpg")
    for threads, says in (("0", "must be at least 1"), ("2", "threads=2: this process may use 1 to 1 threads")):
        done = subprocess.run([sys.executable, "-m", "npmobile", "classify", image, "--weights", "none",
                               "--threads", threads], capture_output=True, text=True, timeout=600, env=one_cpu)
        assert done.returncode == 2, done.stderr
        assert says in done.stderr and "Traceback" not in done.stderr
    usage = subprocess.run([sys.executable, "-m", "npmobile", "classify", "--help"], capture_output=True, text=True,
                           timeout=600, env=one_cpu).stdout
    assert "capped by its cgroup CPU quota" in " ".join(usage.split())


# What a process under the fake quota uses: the mode, the pool's size, the count in effect after a prediction,
# and Numba's own setting (NUMBA_NUM_THREADS as the process left it, for the JIT and any child).
THREADS_UNDER_QUOTA = textwrap.dedent("""
    import os
    import numpy as np
    from npmobile.applications import MobileNetV3Small
    from npmobile.kernels import backend
    from npmobile.kernels.threads import max_threads
    model = MobileNetV3Small(weights=None, input_shape=(32, 32, 3))
    model.predict(np.zeros((1, 32, 32, 3), np.float32))
    print("aot" if backend.AOT else "jit", max_threads(), backend.get_num_threads(), os.environ["NUMBA_NUM_THREADS"])
""")


def threads_under_quota(cgroup_root: Path, **env: str) -> str:
    done = subprocess.run([sys.executable, "-c", THREADS_UNDER_QUOTA], capture_output=True, text=True, timeout=600,
                          env=environment(NPMOBILE_CGROUP_ROOT=str(cgroup_root), **env))
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_process_under_a_one_cpu_quota_runs_one_thread_on_the_jit(tmp_path):
    root = cgroup_v2(tmp_path, "/", "100000 100000")
    assert threads_under_quota(root, NPMOBILE_KERNELS="jit") == "jit 1 1 1"


def test_a_process_under_a_one_cpu_quota_runs_one_thread_on_the_built_module(tmp_path, built_kernels):
    root = cgroup_v1(tmp_path, "cpu,cpuacct", "/", 80_000)
    aot = {"NPMOBILE_KERNELS": "", "NPMOBILE_KERNELS_DIR": str(built_kernels)}
    assert threads_under_quota(root, **aot) == "aot 1 1 1"
    if cpus.affinity_cpus() > 1:  # without a quota the same module runs on every core of the mask
        n = cpus.affinity_cpus()
        assert threads_under_quota(tmp_path / "no-cgroup", **aot) == f"aot {n} {n} {n}"


def test_dask_and_ray_size_a_local_cluster_by_the_quota(tmp_path, monkeypatch):
    monkeypatch.setenv("NPMOBILE_CGROUP_ROOT", str(cgroup_v2(tmp_path, "/", "100000 100000")))
    from npmobile import dask as npmobile_dask
    from npmobile import ray as npmobile_ray

    assert npmobile_dask.default_workers(threads=1) == 1
    started = {}
    monkeypatch.setattr(npmobile_ray.ray, "init", lambda **kwargs: started.update(kwargs))
    monkeypatch.setattr(npmobile_ray.ray, "shutdown", lambda: None)
    with npmobile_ray.local_ray(threads=1):
        pass
    assert started["num_cpus"] == 1
