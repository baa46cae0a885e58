"""Shared fixtures. Keras is the reference: it is imported here only for the tests that ask for it.

A test run proves the kernels three times. The first pass (plain ``pytest``) runs Numba's JIT, whatever
``npmobile build-kernels`` left in the user's cache. tests/test_built_kernels.py builds the ahead-of-time module
once (``built_kernels``) and runs the kernel, plan, parity and concurrency tests again in a second pytest process
on it: the AOT pass (NPMOBILE_TEST_KERNELS=aot), whose start checks that the module really runs
(``check_the_built_module_runs``) -- a process picks the JIT or the module when it first imports its kernels.
tests/test_avx2.py runs the tests of AVX2's tiles and rules in a third, compiled for Haswell whatever this CPU is:
the AVX2 pass (NPMOBILE_TEST_KERNELS=avx2), whose start checks that AVX2's tiles and rules are the ones in use
(``check_the_avx2_build``) and whose end that no compiled kernel holds an AVX-512 instruction.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
AOT_PASS = os.environ.get("NPMOBILE_TEST_KERNELS") == "aot"
AVX2_PASS = os.environ.get("NPMOBILE_TEST_KERNELS") == "avx2"
if not AOT_PASS:
    os.environ.setdefault("NPMOBILE_KERNELS", "jit")
# Every test reads its files (a file read once is otherwise not read again: npmobile/read_cache.py, whose own
# tests turn it on in a folder of theirs).
os.environ["NPMOBILE_READ_CACHE"] = "0"
if "NUMBA_NUM_THREADS" not in os.environ:  # the tests of 1 against 2 threads run them even on one CPU
    from npmobile.kernels.cpus import available_cpus

    os.environ["NUMBA_NUM_THREADS"] = str(max(2, available_cpus()))
sys.path.insert(0, str(Path(__file__).parent))  # tests/keras_files.py is importable from the tests
REPO = Path(__file__).resolve().parents[1]
# Lines for the end of the run: what the AOT pass ran on, what the JIT twin stood in for, what the AVX2 pass read.
KERNEL_PASSES_REPORT: list[str] = []


def build_kernels_into(root: Path, env: dict[str, str] | None = None) -> None:
    """``npmobile build-kernels`` (the full build, as a user runs it) into the kernel cache ``root``, in this
    process's environment or ``env``."""
    from npmobile.kernels import build

    missing = build.missing_tools()
    if missing is not None:  # failed, not skipped: a run that cannot prove the built kernels proves less
        pytest.fail(f"the tests of the built kernels cannot run: {missing}")
    env = {**(os.environ if env is None else env), "NPMOBILE_KERNELS_DIR": str(root), "NPMOBILE_AUTO_BUILD": "0"}
    done = subprocess.run([sys.executable, "-m", "npmobile", "build-kernels"], capture_output=True, text=True,
                          timeout=1800, env=env, cwd=REPO)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


@pytest.fixture(scope="session")
def built_kernels(tmp_path_factory) -> Path:
    """A kernel cache holding this machine's module (``npmobile build-kernels``), built once per test run; in
    the AOT pass, the one that pass runs on."""
    if AOT_PASS:
        return Path(os.environ["NPMOBILE_KERNELS_DIR"])
    root = tmp_path_factory.mktemp("built_kernels")
    started = time.perf_counter()
    build_kernels_into(root)
    KERNEL_PASSES_REPORT.append(f"built kernels: module built in {time.perf_counter() - started:.0f} s")
    return root


def run_test_pass(kind: str, tests: tuple[str, ...], env: dict[str, str], tmp_path: Path,
                  keyword: str | None = None) -> tuple[int, float, str]:
    """``tests`` (test files, or node ids, under tests/; those of them ``keyword`` selects, as pytest's -k) in a
    pytest process of their own with ``env`` and NPMOBILE_TEST_KERNELS=``kind``: how many ran, in how many seconds,
    and its output. A failure, an error or a skip in it fails the caller."""
    import xml.etree.ElementTree as ET

    report = tmp_path / f"{kind}-pass.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'tmp'}",
               f"--junitxml={report}", *(str(REPO / "tests" / name) for name in tests),
               *(["-k", keyword] if keyword else [])]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600, cwd=REPO,
                          env={**env, "NPMOBILE_TEST_KERNELS": kind})
    seconds = time.perf_counter() - started
    said = done.stdout[-6000:] + done.stderr[-3000:]
    assert done.returncode == 0, f"the {kind} pass failed (exit {done.returncode}):\n{said}"
    suite = ET.parse(report).getroot().find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    assert counts["failures"] == counts["errors"] == counts["skipped"] == 0, (counts, said)
    return counts["tests"], seconds, done.stdout


# --- the AOT pass ---------------------------------------------------------------------------------------------

def check_the_built_module_runs() -> str:
    """In the AOT pass, before any test (and any test file's own ``import numba``): the kernels are the built
    module's, and each family runs on it without importing Numba or llvmlite. A pass that ran the JIT would
    prove nothing about the module, so anything else ends the run."""
    from npmobile.kernels import backend

    if not backend.AOT:
        pytest.exit(f"AOT pass: no built module was loaded from {backend.module_dir()}: it would run the JIT",
                    returncode=3)
    import numpy as np

    from npmobile.applications import FAMILIES
    from npmobile.kernels.threads import max_threads

    for family in FAMILIES.values():  # what the build's workload ran: every call has its export
        model = family(weights=None, input_shape=(96, 96, 3))
        for threads in sorted({1, max_threads()}):
            model.predict(np.zeros((1, 96, 96, 3), np.float32), threads=threads)
    imported = [name for name in ("numba", "llvmlite") if name in sys.modules]
    if imported:
        pytest.exit(f"AOT pass: {' and '.join(imported)} imported to run the families the module was built "
                    "for: the module does not hold their kernels", returncode=3)
    fell_back: dict[str, str] = {}  # kernel -> the test that first called the JIT twin for it
    jit_twin = backend.jit_twin

    def recorded_twin(module: str, qualname: str):
        fell_back.setdefault(f"{module.rpartition('.')[2]}.{qualname}", RUNNING_TEST[0])
        return jit_twin(module, qualname)

    backend.jit_twin = recorded_twin  # what the JIT twin stands in for, reported at the end
    KERNEL_PASSES_REPORT.append(f"built kernels (AOT pass): {backend.module_dir()}")
    KERNEL_PASSES_REPORT.append(lambda: "  the JIT twin stood in for (first in): " + (
        ", ".join(f"{kernel} ({test})" for kernel, test in sorted(fell_back.items())) or "none"))
    return str(backend.module_dir())


RUNNING_TEST = ["before the first test"]


# --- the AVX2 pass --------------------------------------------------------------------------------------------

def check_the_avx2_build() -> None:
    """In the AVX2 pass, before any test: the kernels are Numba's, compiled for a CPU without AVX-512, with AVX2's
    tile and row width, the big square products on NumPy's OpenBLAS, which runs its Haswell kernels. A pass on
    anything else would prove the AVX-512 paths again, so anything else ends the run."""
    from threadpoolctl import threadpool_info

    from npmobile.kernels import backend, blas, depthwise_rules, gemm_rules, pointwise

    wrong = []
    if backend.AOT or backend.target_has_avx512():
        wrong.append("the kernels are a built module" if backend.AOT else "Numba's target CPU has AVX-512")
    if gemm_rules.COMPILED_TILES != (gemm_rules.AVX2_6X16,) or gemm_rules.INDIRECT_TILES != (gemm_rules.AVX2_6X16,):
        wrong.append(f"the compiled tiles are {gemm_rules.COMPILED_TILES}")
    if depthwise_rules.VECTOR_WIDTH != 8:
        wrong.append(f"the depthwise rows are {depthwise_rules.VECTOR_WIDTH} floats wide")
    if not blas.AVAILABLE or pointwise.use_microkernel(512, 512):
        wrong.append("a 512x512 pointwise product takes the microkernel, not OpenBLAS")
    cores = {info.get("architecture") for info in threadpool_info() if info.get("internal_api") == "openblas"}
    if cores != {"Haswell"}:
        wrong.append(f"NumPy's OpenBLAS runs its kernels for {cores or 'nothing'}")
    if wrong:
        pytest.exit("AVX2 pass: not an AVX2 build: " + "; ".join(wrong), returncode=3)
    KERNEL_PASSES_REPORT.append(f"AVX2 pass: Numba's target {os.environ.get('NUMBA_CPU_NAME')}, tile "
                                f"{gemm_rules.AVX2_6X16.name}, depthwise rows of {depthwise_rules.VECTOR_WIDTH}, "
                                f"OpenBLAS {', '.join(sorted(cores))}")


def pytest_sessionfinish(session, exitstatus):
    """In the AVX2 pass, after its tests: no kernel they compiled holds an AVX-512 instruction."""
    if not AVX2_PASS:
        return
    from avx2_target import kernels_using_avx512

    found, read = kernels_using_avx512()
    KERNEL_PASSES_REPORT.append(f"  AVX2 pass: {read} compiled kernels read, {len(found)} with AVX-512 instructions"
                                + "".join(f"\n    {name}" for name in found))
    if found or not read:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_configure(config):
    config.addinivalue_line("markers", "jit_only: a test of Numba's JIT itself, in a process of its own (its "
                            "cache, another CPU target): the AOT and AVX2 passes would run it the same way, so "
                            "deselect it")


def pytest_sessionstart(session):
    if AOT_PASS:
        check_the_built_module_runs()
    if AVX2_PASS:
        check_the_avx2_build()


def pytest_runtest_setup(item):
    RUNNING_TEST[0] = item.nodeid.rpartition("/")[2]


def pytest_collection_modifyitems(config, items):
    if not (AOT_PASS or AVX2_PASS):
        return
    jit_only = [item for item in items if item.get_closest_marker("jit_only")]
    if jit_only:
        config.hook.pytest_deselected(items=jit_only)
        items[:] = [item for item in items if not item.get_closest_marker("jit_only")]
        KERNEL_PASSES_REPORT.append(f"  deselected, the JIT's own: {', '.join(item.name for item in jit_only)}")


@pytest.fixture(scope="session")
def keras_files(tmp_path_factory):
    """Keras-written model files with Keras's own outputs (see tests/keras_files.py)."""
    from keras_files import KerasFiles

    return KerasFiles(tmp_path_factory.mktemp("keras_files"))


@pytest.fixture(scope="session")
def tutorials(tmp_path_factory):
    """Hand-built tutorial MobileNets with function activations (see tests/tutorial_models.py):
    ``tutorials("MobileNetV3Small", "tfkeras_h5")``."""
    from tutorial_models import TutorialFiles

    return TutorialFiles(tmp_path_factory.mktemp("tutorials"))


# Fuzzed inputs per target, reported at the end of the run (tests/test_fuzz.py).
FUZZ_COUNTS: dict[str, dict[str, int]] = {}


def record_fuzz(target: str, ran: int, outcomes: dict[str, int]) -> None:
    counts = FUZZ_COUNTS.setdefault(target, {"ran": 0})
    counts["ran"] += ran
    for outcome, n in outcomes.items():
        counts[outcome] = counts.get(outcome, 0) + n


def pytest_terminal_summary(terminalreporter):
    for line in KERNEL_PASSES_REPORT:
        terminalreporter.write_line(line() if callable(line) else line)
    if not FUZZ_COUNTS:
        return
    total = sum(c["ran"] for c in FUZZ_COUNTS.values())
    terminalreporter.write_line(f"fuzzing: {total} mutated inputs ran; outcomes per target (any foreign one fails)")
    for target, counts in sorted(FUZZ_COUNTS.items()):
        detail = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if k != "ran")
        terminalreporter.write_line(f"  {target}: {counts['ran']} ({detail})")


@pytest.fixture(scope="session")
def transfer_models(tmp_path_factory):
    """Transfer-learning models as TensorFlow's tutorial builds them (see tests/tutorial_models.py):
    ``transfer_models("tutorial", "keras3_keras")``."""
    from tutorial_models import TransferFiles

    return TransferFiles(tmp_path_factory.mktemp("transfer"))
