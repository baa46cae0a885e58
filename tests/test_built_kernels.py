"""The kernels built ahead of time (``npmobile build-kernels``) are held to what the JIT is held to.

The module is built once per test run (tests/conftest.py ``built_kernels``). Then:

- the kernel, plan, parity and concurrency test files run again in a pytest process of their own on that
  module (the AOT pass: a process picks the JIT or the module when it first imports its kernels, so the pass
  cannot share this one). Its start checks that the module is loaded and runs every family without Numba;
  a failure, an error or a skipped test in it fails this run;
- every family at every alpha the weights registry knows, at 224 px, at a small and at a non-square size, in
  batches of one and more, and hand-built Keras models that put every activation in every kernel, answer on
  the module with the JIT's bits (each mode in a process of its own).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from conftest import AOT_PASS, KERNEL_PASSES_REPORT, REPO, run_test_pass

# What the AOT pass runs: every test of the kernels and of what calls them (the determinism worker with them).
AOT_PASS_FILES = ("test_kernels.py", "test_gemm.py", "test_expand_depthwise.py", "test_plan.py", "test_parity.py",
                  "test_concurrency.py")


def aot_environment(kernel_cache: Path) -> dict[str, str]:
    """This environment, made to load the module in ``kernel_cache``: no NPMOBILE_KERNELS=jit (the JIT pass's),
    no background build."""
    env = {k: v for k, v in os.environ.items() if k != "NPMOBILE_KERNELS"}
    return {**env, "NPMOBILE_KERNELS_DIR": str(kernel_cache), "NPMOBILE_AUTO_BUILD": "0"}


def test_the_kernel_plan_parity_and_concurrency_tests_pass_on_the_built_module(built_kernels, tmp_path):
    assert not AOT_PASS, "the AOT pass runs the files it is given, not this one"
    tests, seconds, said = run_test_pass("aot", AOT_PASS_FILES, aot_environment(built_kernels), tmp_path)
    assert tests > 300, said
    KERNEL_PASSES_REPORT.append(f"built kernels: the AOT pass ran {tests} tests of {', '.join(AOT_PASS_FILES)} in "
                                f"{seconds:.0f} s, all passed")
    pass_report = ("built", "  the", "  deselected")  # its lines of tests/conftest.py KERNEL_PASSES_REPORT
    KERNEL_PASSES_REPORT.extend("  " + line for line in said.splitlines() if line.startswith(pass_report))


def test_an_aot_pass_that_would_run_the_jit_ends_before_any_test(tmp_path):
    """An AOT pass whose kernel cache holds no module for this machine would silently prove the JIT again."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'tmp'}",
               str(REPO / "tests" / "test_plan.py")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**aot_environment(tmp_path / "no-module"), "NPMOBILE_TEST_KERNELS": "aot"})
    assert done.returncode == 3, done.stdout[-3000:]
    assert "AOT pass: no built module was loaded" in done.stdout and " passed" not in done.stdout


# Every variant the registry has weights for (weights=None: random, seeded, the same in both processes), at three
# sizes, on one thread and all; then each hand-built model given. Saves the outputs; says the mode it ran on.
# argv: out.npz model-file...
SWEEP = textwrap.dedent("""
    import sys
    import numpy as np
    from npmobile import load_model
    from npmobile.applications import FAMILIES
    from npmobile.kernels import backend
    from npmobile.kernels.threads import max_threads
    from npmobile.weights import registry

    variants = [("mobilenet", dict(alpha=a)) for a in registry.V1_ALPHAS]
    variants += [("mobilenet_v2", dict(alpha=a)) for a in registry.V2_ALPHAS]
    for name in registry.V3_HASHES:  # "large_minimalistic_224_1.0_float"
        kind, *flags = name.split("_224_")[0].split("_")
        alpha = float(name.split("_224_")[1].split("_")[0])
        variants.append(("mobilenet_v3_" + kind, dict(alpha=alpha, minimalistic=bool(flags))))
    threads = sorted({1, max_threads()})
    outs = {}
    for family, kwargs in variants:
        for h, w, batch in ((224, 224, 1), (97, 129, 3), (32, 32, 2)):
            model = FAMILIES[family](weights=None, input_shape=(h, w, 3), **kwargs)
            x = np.random.default_rng(h + batch).uniform(0, 255, (batch, h, w, 3)).astype(np.float32)
            for n in threads:
                outs[f"{family} {kwargs} {h}x{w} batch {batch} threads {n}"] = model.predict(x, threads=n)
    for path in sys.argv[2:]:
        model = load_model(path)
        h, w = model.input_shape[1:3]
        for batch in (1, 3):
            x = np.random.default_rng(batch).uniform(-1, 1, (batch, h, w, 3)).astype(np.float32)
            for n in threads:
                outs[f"{path} batch {batch} threads {n}"] = model.predict(x, threads=n)
    np.savez(sys.argv[1], **{f"{i:04d}": a for i, a in enumerate(outs.values())}, names=np.array(list(outs)))
    print("aot" if backend.AOT else "jit")
""")


def hand_built_models(folder: Path) -> list[Path]:
    """Keras models no registry knows: the V3 block a user builds (a hard-swish 3x3 depthwise on 64 channels,
    squeeze-excite, a residual), and one layer of every kernel with each activation a kernel applies, on odd
    sizes and channel counts."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(0)
    inputs = keras.Input((40, 40, 3))
    x = layers.Conv2D(16, 3, strides=2, padding="same", activation="hard_swish")(inputs)
    expanded = layers.Conv2D(64, 1, activation="hard_swish")(x)
    dw = layers.DepthwiseConv2D(3, padding="same")(expanded)
    dw = layers.BatchNormalization()(dw)
    dw = layers.Activation("hard_swish")(dw)
    se = layers.GlobalAveragePooling2D(keepdims=True)(dw)
    se = layers.Conv2D(16, 1, activation="relu")(se)
    se = layers.Conv2D(64, 1, activation="hard_sigmoid")(se)
    x = layers.Add()([x, layers.Conv2D(16, 1)(layers.Multiply()([dw, se]))])
    x = layers.GlobalAveragePooling2D()(x)
    v3_block = keras.Model(inputs, layers.Dense(10, activation="softmax")(x), name="v3_block")

    inputs = keras.Input((23, 31, 3))
    x = inputs
    for i, act in enumerate(["linear", "relu", "relu6", "sigmoid", "hard_swish", "swish", "hard_sigmoid"]):
        channels = (8, 24, 64, 72)[i % 4]
        x = layers.Conv2D(channels, 3, strides=1 + i % 2, padding="same", activation=act)(x)
        x = layers.DepthwiseConv2D(3 + 2 * (i % 2), padding="same", activation=act)(x)
        x = layers.Conv2D(channels + 8, 1, activation=act)(x)
    every_activation = keras.Model(inputs, layers.GlobalAveragePooling2D()(x), name="every_activation")

    paths = [folder / "v3_block.keras", folder / "every_activation.keras"]
    for model, path in zip((v3_block, every_activation), paths):
        model.save(path)
    return paths


def sweep(out: Path, env: dict[str, str], models: list[Path]) -> str:
    done = subprocess.run([sys.executable, "-c", SWEEP, str(out), *map(str, models)], capture_output=True, text=True,
                          timeout=1800, env=env, cwd=out.parent)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout.strip().splitlines()[-1]


def test_every_registry_model_and_hand_built_ones_answer_with_the_jit_bits(built_kernels, tmp_path):
    models = hand_built_models(tmp_path)
    assert sweep(tmp_path / "aot.npz", aot_environment(built_kernels), models) == "aot"
    assert sweep(tmp_path / "jit.npz", {**os.environ, "NPMOBILE_KERNELS": "jit", "NPMOBILE_AUTO_BUILD": "0"},
                 models) == "jit"
    aot, jit = np.load(tmp_path / "aot.npz"), np.load(tmp_path / "jit.npz")
    names = list(aot["names"])
    assert names == list(jit["names"]) and len(names) >= 16 * 3 + 4
    differ = [name for i, name in enumerate(names) if not np.array_equal(aot[f"{i:04d}"], jit[f"{i:04d}"])]
    assert not differ, f"{len(differ)} of {len(names)} outputs differ from the JIT's: {differ[:5]}"
