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

import os

from avx2_target import AVX2_TARGET
from conftest import AVX2_PASS, KERNEL_PASSES_REPORT, run_test_pass

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


def test_the_avx2_tiles_and_rules_pass_their_tests_in_an_avx2_build(tmp_path):
    assert not AVX2_PASS, "the AVX2 pass runs the tests it is given, not this one"
    env = {**os.environ, **AVX2_TARGET, "NPMOBILE_KERNELS": "jit", "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    tests, seconds, said = run_test_pass("avx2", AVX2_PASS_TESTS, env, tmp_path)
    assert tests > 100, said[-6000:]
    KERNEL_PASSES_REPORT.append(f"AVX2 build: the AVX2 pass ran {tests} tests in {seconds:.0f} s, all passed")
    pass_report = ("AVX2 pass", "  AVX2 pass", "  deselected")  # its lines of tests/conftest.py KERNEL_PASSES_REPORT
    read = [line for line in said.splitlines() if line.startswith(pass_report)]
    assert any("0 with AVX-512 instructions" in line for line in read), said[-6000:]
    KERNEL_PASSES_REPORT.extend("  " + line for line in read)
