"""AVX2's tiles and rules, proved as AVX-512's are, on any x86-64 machine that runs AVX2.

The kernels compile one CPU's tiles and rules only (kernels/gemm_rules.py, kernels/depthwise_rules.py,
kernels/pointwise.py ``use_microkernel``): on an AVX-512 machine the first pass never runs AVX2's. Here the tests
that hold them run again in a pytest process of its own whose kernels Numba compiles for Haswell, with a Numba cache
of its own (tests/avx2_target.py): the AVX2 pass. tests/conftest.py checks at its start that AVX2's tiles and rules
are the ones in use, and at its end that no kernel it compiled holds an AVX-512 instruction.

What it runs, chosen to hold every path AVX2 has of its own (the other kernels compile the same source for either
CPU, and the first pass proves them) at a small share of the first pass's time:
- the 6x16 tile of <8 x float>: every GEMM test (test_gemm.py), plain and through an indirection table (the conv
  tests), the fused expand and depthwise built on it (test_expand_depthwise.py), the stem rule (test_plan.py);
- NumPy's OpenBLAS, on its Haswell kernels, for the pointwise products of 256 channels and more each way: the
  pointwise, dense and BLAS tile tests;
- the depthwise rows of 8 floats: every row kernel, both row orders and the order rule at that width;
- the determinism contract: an image's bits whatever the thread count (1-4), the batch and its place in it, on a
  model of each family, and concurrent predicts (test_concurrency.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from avx2_target import AVX2_TARGET
from conftest import AVX2_PASS, KERNEL_PASSES_REPORT, build_kernels_into, run_test_pass
from test_built_kernels import aot_environment

from npmobile.kernels.module_key import MANIFEST

# Whole files, and the tests of test_kernels.py that run a GEMM, a convolution or a depthwise layer (its others:
# activations, pooling, squeeze-excite, thread pools, and pointwise_conv2d_numba, bench/kernels.py's comparison,
# compile the same source for either CPU and run no rule of it).
KERNEL_TESTS = ("depthwise_matches_reference", "depthwise_vector_paths_match_reference",
                "depthwise_row_orders_give_the_same_bits", "depthwise_row_order_rule",
                "depthwise_border_pixels_sum_like_interior_ones", "depthwise_plain_loops_sum_like_the_vector_kernel",
                "bound_depthwise_matches_the_plain_call_on_one_and_two_threads", "blas_sgemm_is_found",
                "gemm_tiles_any_tiling_matches_reference", "gemm_answers_an_image_the_same_wherever_it_sits_in_a_batch",
                "dense_matches_reference", "conv2d_matches_reference",
                "indirect_gemm_gives_the_bits_of_im2col_and_the_microkernel",
                "indirect_gemm_answer_depends_on_the_image_alone", "indirection_table_reference_twin_matches_conv2d")
AVX2_PASS_TESTS = ("test_gemm.py", "test_expand_depthwise.py", "test_concurrency.py",
                   "test_plan.py::test_a_stem_whose_pixels_suit_7_row_tiles_runs_on_a_tile_the_indirect_product_has",
                   *(f"test_kernels.py::test_{name}" for name in KERNEL_TESTS),
                   # a 1x1 product, two on the 6x16 tile, one of 320x1280 on OpenBLAS's Haswell kernels
                   *(f"test_kernels.py::test_pointwise_matches_reference[{case}-blas]" for case in (
                       "n1_1x1_1to1", "n1_56x56_24to144", "n1_14x14_576to88", "n1_7x7_320to1280")))


@pytest.fixture(scope="module")
def avx2_environment(tmp_path_factory) -> dict[str, str]:
    """This environment, on the JIT compiled for Haswell, with a Numba cache of its own (shared by this file's
    tests: the module is built from the kernels the pass compiled)."""
    numba_cache = tmp_path_factory.mktemp("avx2_numba_cache")
    return {**os.environ, **AVX2_TARGET, "NPMOBILE_KERNELS": "jit", "NUMBA_CACHE_DIR": str(numba_cache)}


def test_the_avx2_tiles_and_rules_pass_their_tests_in_an_avx2_build(avx2_environment, tmp_path):
    assert not AVX2_PASS, "the AVX2 pass runs the tests it is given, not this one"
    tests, seconds, said = run_test_pass("avx2", AVX2_PASS_TESTS, avx2_environment, tmp_path)
    assert tests > 100, said[-6000:]
    KERNEL_PASSES_REPORT.append(f"AVX2 build: the AVX2 pass ran {tests} tests in {seconds:.0f} s, all passed")
    pass_report = ("AVX2 pass", "  AVX2 pass", "  deselected")  # its lines of tests/conftest.py KERNEL_PASSES_REPORT
    read = [line for line in said.splitlines() if line.startswith(pass_report)]
    assert any("0 with AVX-512 instructions" in line for line in read), said[-6000:]
    KERNEL_PASSES_REPORT.extend("  " + line for line in read)


# Every family on the kernels of an AVX2 process, at 224 px and at a non-square size in a batch of 3, on one thread
# and on all; saves the outputs and says whether the module ran them, whether the target has AVX-512 and whether
# Numba was imported (the JIT twin ran what the module lacks). argv: out.npz
FAMILIES_RUN = textwrap.dedent("""
    import sys
    import numpy as np
    from npmobile.applications import FAMILIES
    from npmobile.kernels import backend
    from npmobile.kernels.threads import max_threads

    outs = {}
    for name, family in FAMILIES.items():
        for h, w, batch in ((224, 224, 1), (97, 129, 3)):
            model = family(weights=None, input_shape=(h, w, 3))
            x = np.random.default_rng(h + batch).uniform(0, 255, (batch, h, w, 3)).astype(np.float32)
            for n in sorted({1, max_threads()}):
                outs[f"{name} {h}x{w} batch {batch} threads {n}"] = model.predict(x, threads=n)
    np.savez(sys.argv[1], **outs)
    print(backend.AOT, backend.target_has_avx512(), "numba" in sys.modules)
""")


def run_families(out: Path, env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-c", FAMILIES_RUN, str(out)], capture_output=True, text=True,
                          timeout=1200, env=env, cwd=out.parent)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout.strip().splitlines()[-1]


def test_a_module_built_for_avx2_holds_every_family_and_answers_with_the_avx2_jit_bits(avx2_environment, tmp_path):
    """``npmobile build-kernels`` under the AVX2 target builds a module for it (the target is in its key), which an
    AVX2 process loads and runs every family on without Numba, with the bits of the AVX2 JIT."""
    kernels = tmp_path / "kernels"
    build_kernels_into(kernels, avx2_environment)
    (manifest,) = kernels.glob(f"*/{MANIFEST}")
    assert json.loads(manifest.read_text())["avx512"] is False
    on_module = {**aot_environment(kernels), **AVX2_TARGET, "NUMBA_CACHE_DIR": avx2_environment["NUMBA_CACHE_DIR"]}
    assert run_families(tmp_path / "aot.npz", on_module) == "True False False"
    assert run_families(tmp_path / "jit.npz", {**avx2_environment, "NPMOBILE_AUTO_BUILD": "0"}) == "False False True"
    aot, jit = np.load(tmp_path / "aot.npz"), np.load(tmp_path / "jit.npz")
    assert aot.files == jit.files and len(aot.files) >= 4 * 2  # families x sizes (x thread counts)
    differ = [name for name in aot.files if not np.array_equal(aot[name], jit[name])]
    assert not differ, f"{len(differ)} of {len(aot.files)} outputs differ from the AVX2 JIT's: {differ[:5]}"
    KERNEL_PASSES_REPORT.append(f"AVX2 build: a module built for Haswell ran every family without Numba, "
                                f"{len(aot.files)} outputs with the AVX2 JIT's bits")
