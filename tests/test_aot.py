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
import stat
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from kernel_cache_helpers import PHOTO, plant_imports, record_background_builds

from npmobile.cli import build_kernels
from npmobile.kernels import backend, build, cache_files

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
    done = subprocess.run([sys.executable, "-m", "npmobile.kernel_build", *options, "--root", str(root)],
                          capture_output=True, text=True, timeout=1800, env={**os.environ, "NPMOBILE_KERNELS": "jit"})
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["exports"] > 0 and os.path.exists(summary["module"])
    return summary


NPMOBILE = Path(sys.executable).with_name("npmobile")  # the console script: its sys.path has no working folder


@pytest.fixture(scope="module")
def kernel_cache(tmp_path_factory):
    """A kernel cache holding a quick build for this machine, made as a user makes it: ``npmobile build-kernels
    --quick`` (once for this file: a build costs 20-45 s)."""
    root = tmp_path_factory.mktemp("kernels")
    done = subprocess.run([str(NPMOBILE), "build-kernels", "--quick"], capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "NPMOBILE_KERNELS_DIR": str(root)})
    assert done.returncode == 0, done.stderr
    assert "covers the kernels of: mobilenet_v2 at 96 px" in done.stdout
    return root


def aot_env(root) -> dict[str, str]:
    return {"NPMOBILE_KERNELS": "", "NPMOBILE_KERNELS_DIR": str(root)}


def test_aot_module_gives_the_jit_bits_without_importing_numba(kernel_cache, tmp_path):
    assert_aot_gives_the_jit_bits(kernel_cache, tmp_path, "96", "1", "mobilenet_v2,mobilenet_v3_small")


def test_the_module_chooses_tiles_for_the_cpu_the_jit_would(kernel_cache):
    """The tile rules (kernels/gemm_rules.py) follow the target CPU's AVX-512 and LLVM name: a module answers them
    from its manifest without Numba, as the JIT does from Numba's target."""
    code = ("import sys; from npmobile.kernels import backend, gemm_rules as R; "
            "print(backend.AOT, R.AVX512, R.CPU_NAME or '-', 'numba' in sys.modules)")
    aot = run_python(code, **aot_env(kernel_cache)).split()
    jit = run_python(code, NPMOBILE_KERNELS="jit").split()
    assert aot[0] == "True" and aot[3] == "False" and jit[0] == "False"
    assert aot[1:3] == jit[1:3]


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

# The command line as `python -m npmobile` runs it, then which kernels it ran on (stderr's last line).
CLI_THEN_BACKEND = ("import sys; from npmobile.cli import main; code = main(sys.argv[1:]); "
                    "from npmobile.kernels import backend; "
                    "print('AOT', backend.AOT, 'numba' in sys.modules, file=sys.stderr); sys.exit(code)")


def wait_for_the_build(root: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while (root / cache_files.LOCK).exists():
        assert time.monotonic() < deadline, cache_files.log_path(root, backend.cache_key()).read_text()
        time.sleep(1)


def test_a_cli_run_on_the_jit_builds_the_kernels_in_the_background_for_later_runs(keras_files, tmp_path):
    """End to end, as a user: ``npmobile classify`` in a folder of photos that also holds a numpy.py, json.py and
    sitecustomize.py (none ever imported: not by the command, its isolated reader or its background build);
    the build, the second run on the module, then the module damaged, refused, rebuilt and used again."""
    case = keras_files.get("MobileNetV2", "keras3_keras", input_shape=(96, 96, 3), alpha=0.35)
    root = tmp_path / "kernels"
    photos = plant_imports(tmp_path / "photos")
    env = {**os.environ, "NPMOBILE_KERNELS_DIR": str(root), "NPMOBILE_AUTO_BUILD": "quick"}
    del env["NPMOBILE_KERNELS"]
    # -I: like the console script, the command's own sys.path holds no working folder
    command = [sys.executable, "-I", "-c", CLI_THEN_BACKEND, "classify", "photo.jpg", "--weights", str(case.path),
               "--json"]

    def classify(aot: bool) -> subprocess.CompletedProcess:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=photos)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.splitlines()[-1] == f"AOT {aot} {not aot}"  # and whether Numba was imported
        done.stderr = "".join(done.stderr.splitlines(keepends=True)[:-1])
        return done

    first = classify(False)
    assert first.stderr.splitlines() == [build_kernels.AUTO_BUILD_NOTE]
    module = root / backend.cache_key() / backend.MANIFEST
    assert (root / cache_files.LOCK).exists() and not module.exists()  # returned while the build runs
    wait_for_the_build(root)
    assert module.exists() and not cache_files.failure_marker(root, backend.cache_key()).exists()
    second = classify(True)
    assert second.stderr == ""  # the module, no second build
    assert json.loads(second.stdout)[0]["top"] == json.loads(first.stdout)[0]["top"]
    [library] = (root / backend.cache_key()).glob(backend.MODULE_NAME + "*")
    with open(library, "r+b") as f:  # a copy cut short (a full disk)
        f.truncate(200_000)
    third = classify(False)
    lines = third.stderr.splitlines()
    assert len(lines) == 2 and str(library.parent) in lines[0] and lines[1] == build_kernels.AUTO_BUILD_NOTE
    assert json.loads(third.stdout)[0]["top"] == json.loads(first.stdout)[0]["top"]
    wait_for_the_build(root)
    fourth = classify(True)
    assert fourth.stderr == "" and json.loads(fourth.stdout)[0]["top"] == json.loads(first.stdout)[0]["top"]
    assert not (photos / "imported").exists()
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []  # no staging folder left


@pytest.fixture
def auto_build(monkeypatch, tmp_path):
    return record_background_builds(monkeypatch, tmp_path)


def test_auto_build_starts_one_detached_low_priority_build_and_says_so(auto_build, capsys):
    assert auto_build.start()
    [(command, options)] = auto_build.started
    assert command[:2] == [sys.executable, "-I"]  # isolated: no working folder, PYTHON* variable or user site
    assert "npmobile.kernel_build" in command and command[command.index("--root") + 1] == str(auto_build.root)
    assert "--background" in command
    assert options["start_new_session"] and options["stdin"] == subprocess.DEVNULL
    assert options["env"]["NPMOBILE_KERNELS"] == "jit" and not any(k.startswith("PYTHON") for k in options["env"])
    assert options["cwd"] == os.path.abspath(os.sep)
    assert capsys.readouterr().err == build_kernels.AUTO_BUILD_NOTE + "\n"
    assert (auto_build.root / cache_files.LOCK).read_text().split()[0] == str(os.getpid())  # handed to the child
    assert not auto_build.start()  # that build is alive: no second one, no second note
    assert len(auto_build.started) == 1 and capsys.readouterr().err == ""


@pytest.mark.parametrize("reason", ["turned off", "jit asked for", "failed before", "already built"])
def test_auto_build_starts_nothing_when(auto_build, monkeypatch, capsys, reason):
    if reason == "turned off":
        monkeypatch.setenv("NPMOBILE_AUTO_BUILD", "0")
    elif reason == "jit asked for":
        monkeypatch.setenv("NPMOBILE_KERNELS", "jit")
    elif reason == "failed before":
        cache_files.failure_marker(auto_build.root, auto_build.key).write_text("build.log\n")
    else:
        (auto_build.root / auto_build.key).mkdir()
        (auto_build.root / auto_build.key / backend.MANIFEST).write_text("{}")
    assert not auto_build.start()
    assert auto_build.started == [] and capsys.readouterr().err == ""
    assert not (auto_build.root / cache_files.LOCK).exists()


def test_a_stale_build_lock_is_replaced(auto_build):
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    lock = auto_build.root / cache_files.LOCK
    stale = time.time() - cache_files.STALE_LOCK_SECONDS - 60
    for holder in (f"{gone.pid} {time.time():.0f}", f"{os.getpid()} {stale:.0f}"):
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
    log = cache_files.log_path(auto_build.root, auto_build.key)
    assert cache_files.failure_marker(auto_build.root, auto_build.key).read_text().strip() == str(log)
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


# --- every fallback path answers with the JIT's bits (issue: the second run crashed) ----------------------

# Builds a model (a family with alpha at a size, or a Keras file), runs it on random inputs on 1 and 2 threads,
# saves the outputs; says AOT or not. argv: out.npz spec size batch, spec "family:alpha" or a file path.
PREDICT_ONE = textwrap.dedent("""
    import sys
    import numpy as np
    import npmobile
    from npmobile.applications import FAMILIES
    from npmobile.kernels import backend
    path, spec, size, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    if ":" in spec:
        family, alpha = spec.split(":")
        model = FAMILIES[family](weights=None, input_shape=(size, size, 3), alpha=float(alpha))
    else:
        model = npmobile.load_model(spec)
    x = np.random.default_rng(7).uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
    np.savez(path, **{f"t{n}": model.predict(x, threads=n) for n in (1, 2)})
    print(backend.AOT)
""")


def assert_second_runs_give_the_jit_bits(root, tmp_path, spec: str, size: int, batch: int = 1, **env) -> None:
    """Two runs on the built module (the second and later runs of a user), then one on the JIT: the same bits."""
    for run in ("aot1", "aot2"):
        assert run_python(PREDICT_ONE, str(tmp_path / f"{run}.npz"), spec, str(size), str(batch),
                          **aot_env(root), **env) == "True"
    assert run_python(PREDICT_ONE, str(tmp_path / "jit.npz"), spec, str(size), str(batch),
                      NPMOBILE_KERNELS="jit") == "False"
    jit = np.load(tmp_path / "jit.npz")
    for run in ("aot1", "aot2"):
        aot = np.load(tmp_path / f"{run}.npz")
        for name in jit.files:
            assert np.array_equal(aot[name], jit[name]), (run, name)


@pytest.mark.parametrize("spec, size", [
    ("mobilenet_v2:1.0", 224),          # after build-kernels --quick: the by-pixel 3x3 row kernel, fused blocks
    ("mobilenet_v3_large:0.75", 224),   # the issue's reproducer: a hard-swish by-pixel row kernel no build made
    ("mobilenet_v3_small:0.75", 224),
    ("mobilenet:0.5", 160),
])
def test_models_the_quick_build_never_ran_give_the_jit_bits(kernel_cache, tmp_path, spec, size):
    assert_second_runs_give_the_jit_bits(kernel_cache, tmp_path, spec, size)


def test_the_issues_reproducer_classifies_on_its_second_run(kernel_cache, tmp_path):
    command = [str(NPMOBILE), "classify", str(PHOTO), "--model", "mobilenet_v3_large", "--alpha", "0.75",
               "--weights", "none", "--json"]
    answers = []
    for kernels in ("", "", "jit"):
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                              env={**os.environ, **aot_env(kernel_cache), "NPMOBILE_KERNELS": kernels})
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
        answers.append(json.loads(done.stdout)[0]["top"])
    assert answers[0] == answers[1] == answers[2]


def test_a_hand_built_v3_block_with_a_hard_swish_depthwise_on_64_channels(kernel_cache, tmp_path):
    keras = pytest.importorskip("keras")
    x = inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(64, 1, use_bias=False, name="expand")(x)
    x = keras.layers.BatchNormalization(name="expand_bn")(x)
    x = keras.layers.Activation("hard_swish", name="expand_hs")(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="depthwise")(x)
    x = keras.layers.BatchNormalization(name="depthwise_bn")(x)
    x = keras.layers.Activation("hard_swish", name="depthwise_hs")(x)
    x = keras.layers.Conv2D(16, 1, name="project")(x)
    model = keras.Model(inputs, x)
    rng = np.random.default_rng(3)
    model.set_weights([(rng.uniform(0.5, 1.5, w.shape) if "variance" in v.path else rng.normal(0, 0.5, w.shape))
                       .astype(np.float32) for w, v in zip(model.get_weights(), model.weights)])
    path = tmp_path / "v3_block.keras"
    model.save(path)
    assert_second_runs_give_the_jit_bits(kernel_cache, tmp_path, str(path), 32, batch=2)


def edited_copy(root: Path, tmp_path: Path, edit) -> Path:
    """A copy of the kernel cache whose module's manifest ``edit`` changed (the module's bytes untouched)."""
    copy = tmp_path / "edited"
    shutil.copytree(root, copy)
    manifest_path = copy / backend.cache_key() / backend.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    edit(manifest)
    manifest_path.write_text(json.dumps(manifest))
    return copy


def test_a_module_built_on_one_thread_serves_two(kernel_cache, tmp_path):
    # A build on one thread runs only the kernels' one-thread forms: the parallel ones are not in its module.
    def one_thread_build(manifest):
        for name in [name for name in manifest["kernels"] if not name.endswith("_serial")]:
            if name + "_serial" in manifest["kernels"]:
                del manifest["kernels"][name]

    copy = edited_copy(kernel_cache, tmp_path, one_thread_build)
    assert_second_runs_give_the_jit_bits(copy, tmp_path, "mobilenet_v2:1.0", 96)


def test_a_kernel_the_module_lacks_and_a_c_function_it_lacks_run_on_the_jit_twin(kernel_cache, tmp_path):
    def lacking(manifest):
        manifest["kernels"].pop("npmobile.kernels.gemm_drivers.gemm_panels")
        manifest["cfuncs"].clear()

    copy = edited_copy(kernel_cache, tmp_path, lacking)
    assert_second_runs_give_the_jit_bits(copy, tmp_path, "mobilenet_v3_small:1.0", 96, batch=2)


def test_two_threads_reaching_the_first_fallback_at_once(kernel_cache):
    code = textwrap.dedent("""
        import sys, threading
        import numpy as np
        from npmobile.kernels import activations, backend, depthwise
        barrier, results, errors = threading.Barrier(8), [], []
        a = np.linspace(-5, 5, 4096)
        def fallback(k):
            try:
                barrier.wait()
                out = np.empty_like(a)
                activations.activate(a, out, activations.ACT_RELU6)   # float64: no export, the twin
                address = depthwise.row_kernel(3, activations.ACT_HARD_SWISH, by_pixel=k % 2 == 0)
                results.append((k % 2, address, np.array_equal(out, np.clip(a, 0, 6))))
            except BaseException as error:
                errors.append(repr(error))
        threads = [threading.Thread(target=fallback, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        addresses = {parity: {address for p, address, _ in results if p == parity} for parity in (0, 1)}
        print(backend.AOT, len(results), all(ok for _, _, ok in results), [len(v) for v in addresses.values()])
    """)
    assert run_python(code, **aot_env(kernel_cache)) == "True 8 True [1, 1]"


def test_a_jit_run_loads_what_the_twin_left_in_numbas_cache(kernel_cache, tmp_path):
    # The twin and the kernels share Numba's on-disk cache (one source file): an entry the twin compiled names
    # the twin's package, which a later run on the JIT (or a kernel build) must be able to import.
    numba_cache = {"NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    code = ("from npmobile.kernels import activations, backend, depthwise; "
            "print(backend.AOT, depthwise.row_kernel(3, activations.ACT_HARD_SWISH, by_pixel=True) > 0)")
    assert run_python(code, **aot_env(kernel_cache), **numba_cache) == "True True"
    assert run_python(code, NPMOBILE_KERNELS="jit", **numba_cache) == "False True"


# --- a module is checked before it is used ---------------------------------------------------------------

CHECK = textwrap.dedent("""
    import sys
    import numpy as np
    from npmobile.applications import FAMILIES
    from npmobile.kernels import backend
    model = FAMILIES["mobilenet_v2"](weights=None, input_shape=(96, 96, 3))
    np.save(sys.argv[1], model.predict(np.full((1, 96, 96, 3), 100, np.float32)))
    print(backend.AOT, backend.rejected is not None and backend.rejected.rebuild)
""")


def run_check(root, out: Path) -> tuple[str, str]:
    done = subprocess.run([sys.executable, "-c", CHECK, str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **aot_env(root)})
    assert done.returncode == 0, done.stderr  # no SIGBUS (-7), no traceback
    return done.stdout.strip(), done.stderr


@pytest.fixture(scope="module")
def jit_answer(kernel_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("jit") / "jit.npy"
    run_check(kernel_cache, out)  # the intact module
    aot = np.load(out)
    done = subprocess.run([sys.executable, "-c", CHECK, str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "NPMOBILE_KERNELS": "jit"})
    assert done.returncode == 0, done.stderr
    assert np.array_equal(aot, np.load(out))
    return aot


def damaged_copy(root: Path, tmp_path: Path, damage) -> Path:
    copy = tmp_path / "damaged"
    shutil.copytree(root, copy)
    directory = copy / backend.cache_key()
    [module] = directory.glob(backend.MODULE_NAME + "*")
    damage(module, directory / backend.MANIFEST)
    return copy


def truncate(at: int):
    def damage(module: Path, manifest: Path) -> None:
        with open(module, "r+b") as f:
            f.truncate(at if at >= 0 else module.stat().st_size + at)
    return damage


def flip(offsets):
    def damage(module: Path, manifest: Path) -> None:
        data = bytearray(module.read_bytes())
        for offset in offsets:
            data[offset % len(data)] ^= 0xFF
        module.write_bytes(bytes(data))
    return damage


def wrong_hash(module: Path, manifest: Path) -> None:
    entry = json.loads(manifest.read_text())
    entry["module"]["sha256"] = "0" * 64
    manifest.write_text(json.dumps(entry))


def no_checksum(module: Path, manifest: Path) -> None:  # a manifest an older npmobile wrote
    entry = json.loads(manifest.read_text())
    del entry["module"]
    manifest.write_text(json.dumps(entry))


@pytest.mark.parametrize("damage", [truncate(0), truncate(4096), truncate(200_000), truncate(-1),
                                    flip([100]), flip([300_000, 300_001]), flip([-2]), wrong_hash, no_checksum],
                         ids=["empty", "4k", "200k", "one-byte-short", "flip-header", "flip-code", "flip-end",
                              "manifest-hash", "no-checksum"])
def test_a_damaged_module_is_refused_in_one_line_and_the_jit_answers(kernel_cache, jit_answer, tmp_path, damage):
    copy = damaged_copy(kernel_cache, tmp_path, damage)
    said, stderr = run_check(copy, tmp_path / "out.npy")
    assert said == "False True"  # the JIT, and marked for the next background build
    assert np.array_equal(np.load(tmp_path / "out.npy"), jit_answer)
    [line] = stderr.splitlines()
    assert line.startswith("npmobile: kernel module not used: ") and str(copy / backend.cache_key()) in line


def test_a_module_cut_short_after_it_was_loaded_does_not_crash_the_run(kernel_cache, jit_answer, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(kernel_cache, copy)
    [module] = (copy / backend.cache_key()).glob(backend.MODULE_NAME + "*")
    code = textwrap.dedent(f"""
        import numpy as np
        from npmobile.applications import FAMILIES
        from npmobile.kernels import backend
        assert backend.AOT
        with open({str(module)!r}, "r+b") as f:   # a copy cut short in place, under the running process
            f.truncate(200_000)
        model = FAMILIES["mobilenet_v2"](weights=None, input_shape=(96, 96, 3))
        y = model.predict(np.full((1, 96, 96, 3), 100, np.float32))
        print(np.array_equal(y, np.load({str(tmp_path / "jit.npy")!r})))
    """)
    np.save(tmp_path / "jit.npy", jit_answer)
    assert run_python(code, **aot_env(copy)) == "True"


def test_a_module_others_may_write_or_reached_through_a_link_is_not_loaded(kernel_cache, tmp_path):
    key = backend.cache_key()
    code = "from npmobile.kernels import backend; print(backend.AOT)"

    def refused(root: Path, why: str) -> None:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              env={**os.environ, **aot_env(root)})
        assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr
        [line] = done.stderr.splitlines()
        assert "kernel module not used" in line and why in line, line

    def copy(name: str) -> Path:
        shutil.copytree(kernel_cache, tmp_path / name)
        return tmp_path / name

    group_writable = copy("group")
    (group_writable / key).chmod(0o775)
    refused(group_writable, "others may write to it")
    module_writable = copy("module")
    [module] = (module_writable / key).glob(backend.MODULE_NAME + "*")
    module.chmod(0o757)
    refused(module_writable, "others may write to it")
    cache_writable = copy("cache")
    cache_writable.chmod(0o777)
    refused(cache_writable, "others may write to it")
    linked_folder = tmp_path / "linked-folder"
    linked_folder.mkdir()
    (linked_folder / key).symlink_to(kernel_cache / key)
    refused(linked_folder, "not a folder npmobile may load from")
    linked_cache = tmp_path / "linked-cache"
    linked_cache.symlink_to(kernel_cache)
    refused(linked_cache, "is a symlink")
    if os.geteuid() == 0:  # a module of another user (root may hand it over)
        other = copy("other")
        for path in (other / key, *(other / key).iterdir()):
            os.chown(path, 65534, 65534)
        refused(other, "belongs to another user")


def test_build_kernels_on_a_current_module_says_so_and_force_rebuilds(kernel_cache, tmp_path):
    planted = plant_imports(tmp_path / "photos")
    env = {**os.environ, "NPMOBILE_KERNELS_DIR": str(kernel_cache)}
    done = subprocess.run([str(NPMOBILE), "build-kernels", "--quick"], capture_output=True, text=True, timeout=300,
                          env=env, cwd=planted)
    assert done.returncode == 0, done.stderr
    assert "is current: nothing to build (--force rebuilds it)" in done.stdout
    assert "covers the kernels of: mobilenet_v2 at 96 px, batch 1; mobilenet_v3_small at 96 px" in done.stdout
    assert not (planted / "imported").exists()  # the build's child never imported the folder's numpy.py
    module = next((kernel_cache / backend.cache_key()).glob(backend.MODULE_NAME + "*"))
    before = module.stat().st_ino
    done = subprocess.run([str(NPMOBILE), "build-kernels", "--quick", "--force"], capture_output=True, text=True,
                          timeout=1800, env=env, cwd=planted)
    assert done.returncode == 0, done.stderr
    assert "is current" not in done.stdout and "exported signatures" in done.stdout
    assert next((kernel_cache / backend.cache_key()).glob(backend.MODULE_NAME + "*")).stat().st_ino != before
    assert not (planted / "imported").exists()


def test_the_foreground_build_waits_for_a_build_that_holds_the_lock(kernel_cache):
    lock = cache_files.take_lock(kernel_cache)  # as a background build of this host would hold it
    assert lock is not None
    try:
        child = subprocess.Popen([str(NPMOBILE), "build-kernels", "--quick"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, "NPMOBILE_KERNELS_DIR": str(kernel_cache)})
        waiting = child.stderr.readline()
        assert "another build of the kernels" in waiting and "waiting for it" in waiting
        assert child.poll() is None
    finally:
        os.close(lock)
        cache_files.release_lock(kernel_cache)
    out, err = child.communicate(timeout=300)
    assert child.returncode == 0 and "is current" in out, err


def test_a_lock_of_another_host_stops_the_foreground_build_in_one_line(kernel_cache):
    (kernel_cache / cache_files.LOCK).write_text(f"{os.getpid()} {time.time():.0f} some-other-host\n")
    try:
        done = subprocess.run([str(NPMOBILE), "build-kernels", "--quick"], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "NPMOBILE_KERNELS_DIR": str(kernel_cache)})
    finally:
        (kernel_cache / cache_files.LOCK).unlink()
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert "some-other-host" in done.stderr and str(kernel_cache / cache_files.LOCK) in done.stderr


# --- a read-only deployment (a container run as an unprivileged user) ------------------------------------

def read_only_install(base: Path) -> Path:
    """npmobile as a read-only site-packages would hold it (the package with its kernels and weights inside),
    under ``base``; returns the folder to put on sys.path."""
    repo = Path(__file__).resolve().parents[1]
    site = base / "site"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(repo / "npmobile", site / "npmobile", ignore=ignore)
    shutil.copytree(repo / "kernels", site / "npmobile" / "kernels", ignore=ignore)
    shutil.copytree(repo / "weights", site / "npmobile" / "weights", ignore=ignore)
    return site


# Runs the command line from the read-only copy (never the working tree's editable npmobile).
RUN_FROM = ("import sys; sys.path.insert(0, sys.argv.pop(1)); import npmobile; "
            "assert npmobile.__file__.startswith(sys.path[0]), npmobile.__file__; "
            "from npmobile.cli import main; sys.exit(main(sys.argv[1:]))")


def without_privileges() -> list[str]:
    """The prefix that runs a command subject to file modes: as root (CI), root without its capabilities (it
    may no longer write where the mode says no; another user could not even reach this interpreter when it
    lives under /root); as anyone else, nothing."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv (util-linux): no way to make a folder read-only for a child")
    return [setpriv, "--bounding-set=-all", "--inh-caps=-all", "--ambient-caps=-all"]


@pytest.mark.parametrize("with_module", [False, True], ids=["jit-in-memory", "module-built-at-image-build"])
def test_a_read_only_deployment_classifies_with_the_normal_answer(kernel_cache, keras_files, tmp_path, with_module):
    """Home, site-packages (npmobile's copy), NUMBA_CACHE_DIR and the kernel cache all read-only for the process
    (``without_privileges``): the normal run's answer, no traceback, one line on stderr at most."""
    case = keras_files.get("MobileNetV2", "keras3_keras", input_shape=(96, 96, 3), alpha=0.35)
    base = Path(tempfile.mkdtemp(prefix="npmobile-read-only-"))  # reachable by another user, unlike tmp_path
    try:
        site = read_only_install(base)
        for name in ("home", "numba-cache", "kernels"):
            (base / name).mkdir()
        shutil.copy(case.path, base / "model.keras")
        shutil.copy(PHOTO, base / "photo.jpg")
        if with_module:  # built by this user (root at an image's build time), used read-only by the other
            shutil.copytree(kernel_cache / backend.cache_key(), base / "kernels" / backend.cache_key())
        for path in [base, *base.rglob("*")]:
            path.chmod((0o555 if path.is_dir() else 0o444) | (path.stat().st_mode & 0o111))
        command = [sys.executable, "-I", "-c", RUN_FROM, str(site), "classify", str(base / "photo.jpg"),
                   "--weights", str(base / "model.keras"), "--json"]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NPMOBILE_", "NUMBA_", "XDG_"))}
        env.update(HOME=str(base / "home"), NUMBA_CACHE_DIR=str(base / "numba-cache"))
        if with_module:
            env["NPMOBILE_KERNELS_DIR"] = str(base / "kernels")
        done = subprocess.run(without_privileges() + command, capture_output=True, text=True, timeout=900, env=env,
                              cwd=base)
        normal = subprocess.run([sys.executable, "-m", "npmobile", "classify", str(PHOTO), "--weights", str(case.path),
                                 "--json"], capture_output=True, text=True, timeout=900,
                                env={**os.environ, "NPMOBILE_AUTO_BUILD": "0"})
    finally:
        for path in [base, *base.rglob("*")]:
            if path.is_dir() and not path.is_symlink():
                path.chmod(0o755)
        shutil.rmtree(base)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert normal.returncode == 0, normal.stderr
    assert json.loads(done.stdout)[0]["top"] == json.loads(normal.stdout)[0]["top"]
    assert len(done.stderr.splitlines()) <= 1, done.stderr


def test_a_module_root_built_is_usable_by_another_user_when_no_one_else_may_write_it(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    made = os.stat_result((stat.S_IFDIR | 0o755, 0, 0, 1, 0, 0, 0, 0, 0, 0))  # owned by root, 755
    assert backend.private_enough(made) is None
    assert backend.private_enough(os.stat_result((stat.S_IFDIR | 0o775,) + made[1:])) is not None
    mine = os.stat_result((stat.S_IFDIR | 0o700, 0, 0, 1, 1000, 1000, 0, 0, 0, 0))
    assert backend.private_enough(mine) is None
    theirs = os.stat_result((stat.S_IFDIR | 0o755, 0, 0, 1, 1001, 1001, 0, 0, 0, 0))
    assert "another user" in backend.private_enough(theirs)
