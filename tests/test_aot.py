"""Kernels compiled ahead of time (kernels/backend.py, kernels/build.py, ``npmobile build-kernels``).

A small module (``--quick``: MobileNetV2 and V3-Small at 96 px) is built once into a temporary kernel cache;
each check runs in a process of its own, since a process picks JIT or AOT when its kernels are first imported
(the test process itself runs the JIT: tests/conftest.py sets NPMOBILE_KERNELS=jit).

The last tests check the build the command line starts by itself in the background after a run on the JIT
(npmobile/cli/build_kernels.py: start_in_background): one for real, end to end, the others with the spawn recorded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from npmobile.cli import build_kernels
from npmobile.kernels import backend, build

pytestmark = pytest.mark.skipif(
    build.compiler_available() is None or not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists(),
    reason="no C compiler or no Python headers to build the module")

# Runs families (random weights, seeded) at a size and batches, on 1 and 2 threads, saves the outputs, and
# says which compiler the process used and whether numba or llvmlite was ever imported.
# argv: out.npz size batches(comma) families(comma)
PREDICT = textwrap.dedent("""
    import sys
    import numpy as np
    from npmobile.applications import FAMILIES
    from npmobile.kernels import backend
    path, size, batches, families = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(","), sys.argv[4].split(",")
    outs = {}
    for family in families:
        model = FAMILIES[family](weights=None, input_shape=(size, size, 3))
        for batch in map(int, batches):
            x = np.random.default_rng(batch).uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
            for threads in (1, 2):
                outs[f"{family}_b{batch}_t{threads}"] = model.predict(x, threads=threads)
    np.savez(path, **outs)
    print(backend.AOT, "numba" in sys.modules, "llvmlite" in sys.modules)
""")


def assert_aot_gives_the_jit_bits(root, tmp_path, *args: str) -> None:
    said = run_python(PREDICT, str(tmp_path / "aot.npz"), *args, **aot_env(root))
    assert said == "True False False"  # AOT, and neither numba nor llvmlite imported
    assert run_python(PREDICT, str(tmp_path / "jit.npz"), *args, NPMOBILE_KERNELS="jit") == "False True True"
    aot, jit = np.load(tmp_path / "aot.npz"), np.load(tmp_path / "jit.npz")
    assert aot.files and sorted(aot.files) == sorted(jit.files)
    for name in aot.files:
        assert np.array_equal(aot[name], jit[name]), name


def run_python(code: str, *args: str, **env: str) -> str:
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def build_into(root, *options: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "npmobile.kernels.build", *options, "--root", str(root)],
                          capture_output=True, text=True, timeout=1800, env={**os.environ, "NPMOBILE_KERNELS": "jit"})
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["exports"] > 0 and os.path.exists(summary["module"])
    return summary


@pytest.fixture(scope="module")
def kernel_cache(tmp_path_factory):
    """A kernel cache holding a quick build for this machine."""
    root = tmp_path_factory.mktemp("kernels")
    build_into(root, "--quick")
    return root


def aot_env(root) -> dict[str, str]:
    return {"NPMOBILE_KERNELS": "", "NPMOBILE_KERNELS_DIR": str(root)}


def test_aot_module_gives_the_jit_bits_without_importing_numba(kernel_cache, tmp_path):
    assert_aot_gives_the_jit_bits(kernel_cache, tmp_path, "96", "1", "mobilenet_v2,mobilenet_v3_small")


@pytest.mark.slow
def test_the_full_build_covers_every_family_at_224(tmp_path):
    build_into(tmp_path / "kernels")
    assert_aot_gives_the_jit_bits(tmp_path / "kernels", tmp_path, "224", "1,2",
                                  "mobilenet,mobilenet_v2,mobilenet_v3_small,mobilenet_v3_large")


def test_arguments_no_export_takes_run_on_the_jit(kernel_cache):
    code = textwrap.dedent("""
        import sys
        import numpy as np
        from npmobile.kernels import backend, pooling
        kernel = pooling.average_pool_rows
        x32 = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
        out = np.empty((2, 5), np.float32)
        assert isinstance(kernel, backend.AotKernel) and kernel.exports
        assert kernel.resolve(x32, out) in kernel.exports.values()
        kernel(x32, out)
        before = "numba" in sys.modules
        x64, out64 = x32.astype(np.float64), np.empty((2, 5))   # float64: no export has that signature
        assert kernel.resolve(x64, out64) is kernel.twin()
        kernel(x64, out64)
        strided = x32[:, :, ::2]                                 # a strided view: not the exported layout
        assert kernel.resolve(strided, out) is kernel.twin()
        kernel(strided, out)
        # small integers: every sum exact, so the means are NumPy's to the bit
        print(before, "numba" in sys.modules, np.array_equal(out64, x64.mean(axis=(1, 2))),
              np.array_equal(out, strided.mean(axis=(1, 2))))
    """)
    assert run_python(code, **aot_env(kernel_cache)) == "False True True True"


def test_the_thread_count_holds_when_the_jit_twin_starts(kernel_cache):
    code = textwrap.dedent("""
        import numpy as np
        from npmobile.kernels import activations, backend
        from npmobile.kernels.threads import thread_limits
        a = np.linspace(-5, 5, 100000)
        out = np.empty_like(a)
        with thread_limits(1):
            activations.activate(a, out, activations.ACT_RELU6)   # float64: the twin, Numba's pool starts
            inside = backend.get_num_threads()
        print(inside, backend.get_num_threads() == backend.max_threads(), np.array_equal(out, np.clip(a, 0, 6)))
    """)
    assert run_python(code, **aot_env(kernel_cache)) == "1 True True"


def test_a_module_of_another_key_or_damaged_is_ignored(kernel_cache, tmp_path):
    stale = tmp_path / "kernels"
    shutil.copytree(kernel_cache / backend.cache_key(), stale / "0123456789abcdef0123")
    code = "from npmobile.kernels import backend; print(backend.AOT)"
    assert run_python(code, **aot_env(stale)) == "False"
    assert run_python(code, **aot_env(kernel_cache)) == "True"
    assert run_python(code, **{**aot_env(kernel_cache), "NPMOBILE_KERNELS": "jit"}) == "False"
    assert run_python(code, **aot_env(kernel_cache), NUMBA_OPT="2") == "False"  # a NUMBA_* the build did not have
    damaged = tmp_path / "damaged"
    shutil.copytree(kernel_cache / backend.cache_key(), damaged / backend.cache_key())
    for module in (damaged / backend.cache_key()).glob(backend.MODULE_NAME + "*"):
        module.write_bytes(b"not a shared library")
    assert run_python(code, **aot_env(damaged)) == "False"


def test_build_kernels_without_a_c_compiler_says_so_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "npmobile", "build-kernels"], capture_output=True, text=True,
                          env={**os.environ, "CC": str(tmp_path / "no-such-cc"), "NPMOBILE_KERNELS_DIR": str(tmp_path)})
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "C compiler" in done.stderr


def test_build_kernels_help_says_what_it_does():
    done = subprocess.run([sys.executable, "-m", "npmobile", "build-kernels", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "ahead of time" in done.stdout.replace("\n", " ")
    assert subprocess.run([sys.executable, "-m", "npmobile", "build-kernels", "--bogus"],
                          capture_output=True).returncode == 2


# --- the build the command line starts by itself ---------------------------------------------------------

PHOTO = Path(__file__).resolve().parents[1] / "samples" / "chelsea.jpg"
# The command line as `python -m npmobile` runs it, then which kernels it ran on (stderr's last line).
CLI_THEN_BACKEND = ("import sys; from npmobile.cli import main; code = main(sys.argv[1:]); "
                    "from npmobile.kernels import backend; "
                    "print('AOT', backend.AOT, 'numba' in sys.modules, file=sys.stderr); sys.exit(code)")


def wait_for_the_build(root: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while (root / build.LOCK).exists():
        assert time.monotonic() < deadline, build.log_path(root, backend.cache_key()).read_text()
        time.sleep(1)


def test_a_cli_run_on_the_jit_builds_the_kernels_in_the_background_for_later_runs(keras_files, tmp_path):
    case = keras_files.get("MobileNetV2", "keras3_keras", input_shape=(96, 96, 3), alpha=0.35)
    root = tmp_path / "kernels"
    env = {**os.environ, "NPMOBILE_KERNELS_DIR": str(root), "NPMOBILE_AUTO_BUILD": "quick"}
    del env["NPMOBILE_KERNELS"]
    command = [sys.executable, "-c", CLI_THEN_BACKEND, "classify", str(PHOTO), "--weights", str(case.path), "--json"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stderr
    assert build_kernels.AUTO_BUILD_NOTE in first.stderr.splitlines()
    assert first.stderr.splitlines()[-1] == "AOT False True"
    module = root / backend.cache_key() / backend.MANIFEST
    assert (root / build.LOCK).exists() and not module.exists()  # returned while the build runs
    wait_for_the_build(root)
    assert module.exists() and not build.failure_marker(root, backend.cache_key()).exists()
    second = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert second.returncode == 0, second.stderr
    assert second.stderr.splitlines() == ["AOT True False"]  # the module, no Numba, no second build
    assert json.loads(second.stdout)[0]["top"] == json.loads(first.stdout)[0]["top"]


@pytest.fixture
def auto_build(monkeypatch, tmp_path):
    """start_in_background as after a CLI run on the JIT, with its kernel cache in tmp_path; the children it
    would start are recorded (``started``), each a live process (this one)."""
    monkeypatch.delenv("NPMOBILE_KERNELS", raising=False)
    monkeypatch.delenv("NPMOBILE_AUTO_BUILD", raising=False)
    monkeypatch.setenv("NPMOBILE_KERNELS_DIR", str(tmp_path))
    started = []

    def popen(command, **options):
        started.append((command, options))
        return SimpleNamespace(pid=os.getpid())

    monkeypatch.setattr(build_kernels, "subprocess", SimpleNamespace(
        Popen=popen, DEVNULL=subprocess.DEVNULL, STDOUT=subprocess.STDOUT))
    return SimpleNamespace(start=build_kernels.start_in_background, started=started, root=tmp_path,
                           key=backend.cache_key())


def test_auto_build_starts_one_detached_low_priority_build_and_says_so(auto_build, capsys):
    assert auto_build.start()
    [(command, options)] = auto_build.started
    assert command[1:] == ["-m", "npmobile.kernels.build", "--background", "--root", str(auto_build.root)]
    assert options["start_new_session"] and options["stdin"] == subprocess.DEVNULL
    assert options["env"]["NPMOBILE_KERNELS"] == "jit"
    assert capsys.readouterr().err == build_kernels.AUTO_BUILD_NOTE + "\n"
    assert (auto_build.root / build.LOCK).read_text().split()[0] == str(os.getpid())  # handed to the child
    assert not auto_build.start()  # that build is alive: no second one, no second note
    assert len(auto_build.started) == 1 and capsys.readouterr().err == ""


@pytest.mark.parametrize("reason", ["turned off", "jit asked for", "failed before", "already built"])
def test_auto_build_starts_nothing_when(auto_build, monkeypatch, capsys, reason):
    if reason == "turned off":
        monkeypatch.setenv("NPMOBILE_AUTO_BUILD", "0")
    elif reason == "jit asked for":
        monkeypatch.setenv("NPMOBILE_KERNELS", "jit")
    elif reason == "failed before":
        build.failure_marker(auto_build.root, auto_build.key).write_text("build.log\n")
    else:
        (auto_build.root / auto_build.key).mkdir()
        (auto_build.root / auto_build.key / backend.MANIFEST).write_text("{}")
    assert not auto_build.start()
    assert auto_build.started == [] and capsys.readouterr().err == ""
    assert not (auto_build.root / build.LOCK).exists()


def test_a_stale_build_lock_is_replaced(auto_build):
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    lock = auto_build.root / build.LOCK
    for holder in (f"{gone.pid} {time.time():.0f}", f"{os.getpid()} {time.time() - build.STALE_LOCK_SECONDS - 60:.0f}"):
        lock.write_text(holder)
        assert auto_build.start()
        assert lock.read_text() != holder
        lock.unlink()
    assert len(auto_build.started) == 2


def test_a_failed_background_build_leaves_a_marker_and_is_not_tried_again(auto_build, monkeypatch):
    recorded = build_kernels.subprocess
    monkeypatch.setattr(build_kernels, "subprocess", subprocess)  # a real child this time ...
    monkeypatch.setattr(build, "missing_tools", lambda: None)
    monkeypatch.setenv("CC", str(auto_build.root / "no-such-cc"))  # ... that finds no C compiler: fails at once
    assert auto_build.start()
    wait_for_the_build(auto_build.root, timeout=120)
    log = build.log_path(auto_build.root, auto_build.key)
    assert build.failure_marker(auto_build.root, auto_build.key).read_text().strip() == str(log)
    assert "C compiler" in log.read_text()
    monkeypatch.setattr(build_kernels, "subprocess", recorded)
    assert not auto_build.start() and auto_build.started == []


def test_the_library_never_starts_a_build(tmp_path):
    code = textwrap.dedent("""
        import numpy as np
        from npmobile.applications import FAMILIES
        from npmobile.kernels import backend
        model = FAMILIES["mobilenet_v3_small"](weights=None, input_shape=(96, 96, 3))
        model.predict(np.zeros((1, 96, 96, 3), np.float32))
        print(backend.AOT)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NPMOBILE_KERNELS": "", "NPMOBILE_KERNELS_DIR": str(tmp_path / "k")})
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr
    assert "background" not in done.stderr and not (tmp_path / "k").exists()
