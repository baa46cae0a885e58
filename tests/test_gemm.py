"""The LLVM-vector GEMM microkernel (kernels/gemm.py) against its NumPy twins (kernels/reference.py).

Tolerance as in tests/test_kernels.py: max |fast - ref| <= 1e-5 * max(1, max |ref|). Beyond that,
bit for bit: every tile compiled for this CPU (the AVX2 build also in a Haswell-targeted process),
every cut of the work, every thread count and every batch position gives the same float32 answers,
because each output is one FMA chain over K in order.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_kernels import ALL_ACTS, REFERENCE_ACTIVATIONS, assert_close, rand

from npmobile.kernels import gemm as G
from npmobile.kernels import gemm_rules
from npmobile.kernels import reference as ref
from npmobile.kernels.activations import ACT_HARD_SWISH, ACT_NONE, ACT_RELU6, ACT_SWISH
from npmobile.kernels.threads import max_threads, thread_limits

TILES = G.COMPILED_TILES  # this CPU's tiles; AVX2's on an AVX-512 CPU: tests/test_avx2.py


@pytest.fixture
def rng():
    return np.random.default_rng(4321)

# (M, K, N): 1x1 images, one row, one column, one input channel, sizes on either side of every tile
# edge (MR 1, 6, 7, 8, 28; NR 16, 32, 128), and MobileNet shapes.
SHAPES = [
    (1, 1, 1), (1, 7, 1), (3, 1, 5), (1, 1280, 1000), (5, 17, 33), (6, 16, 16), (7, 16, 17), (8, 32, 32),
    (9, 31, 31), (13, 9, 40), (14, 2, 31), (27, 5, 15), (28, 8, 48), (29, 3, 129), (57, 40, 127), (196, 24, 144),
    (49, 160, 960), (64, 1, 1), (100, 64, 1), (29, 600, 47),
]


def _packed_run(a, kernel, bias, act, residual, tile, rows=None, per_task=None):
    packed = G.pack(kernel, bias, a.shape[0], tile)
    out = np.full((a.shape[0], kernel.shape[1]), np.nan, np.float32)
    if rows is None:
        G.gemm_packed(a, packed, out, act, residual)
    else:
        G.gemm_panels(a, packed.panels, packed.bias, out, act, G.NO_RESIDUAL if residual is None else residual,
                      TILES.index(tile), rows, per_task)
    return out


@pytest.mark.parametrize("tile", TILES, ids=lambda tile: tile.name)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_microkernel_matches_reference_every_activation_with_and_without_residual(rng, m, k, n, tile):
    a, kernel, bias = rand(rng, m, k), rand(rng, k, n, scale=k**-0.5), rand(rng, n)
    shortcut = rand(rng, m, n)
    plain = ref.dense(a, kernel, bias)
    for act in ALL_ACTS:
        assert_close(_packed_run(a, kernel, bias, act, None, tile), REFERENCE_ACTIVATIONS[act](plain))
        assert_close(_packed_run(a, kernel, bias, act, shortcut, tile),
                     REFERENCE_ACTIVATIONS[act](plain) + shortcut)


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (7, 5, 3), (29, 33, 47), (196, 24, 144)])
def test_packed_reference_twin_matches_the_plain_product(rng, m, k, n):
    a, kernel, bias = rand(rng, m, k), rand(rng, k, n, scale=k**-0.5), rand(rng, n)
    for width in sorted({tile.nr for tile in TILES}):
        panels = ref.pack_panels(kernel, width)
        assert panels.shape == (-(-n // width), k, width)
        assert_close(ref.gemm_panels(a, panels, bias, n), ref.dense(a, kernel, bias))
        packed = G.PackedWeights(kernel, bias, next(tile for tile in TILES if tile.nr == width))
        np.testing.assert_array_equal(packed.panels, panels)
        out = np.empty((m, n), np.float32)
        G.gemm_packed(a, packed, out, ACT_NONE)
        assert_close(out, ref.gemm_panels(a, panels, bias, n))


@pytest.mark.parametrize("k", [40, 600])  # 600: the 32-wide tiles' panels stream from L2, the 16-wide one's not
def test_every_tile_cut_thread_count_and_batch_position_gives_the_same_bits(rng, k):
    """The determinism contract: one image's answer depends on nothing but the image."""
    n, image_rows = 75, 37
    kernel, bias = rand(rng, k, n, scale=k**-0.5), rand(rng, n)
    image = rand(rng, image_rows, k)
    shortcut = rand(rng, image_rows, n)
    for act, residual in ((ACT_RELU6, None), (ACT_NONE, shortcut), (ACT_HARD_SWISH, None), (ACT_SWISH, shortcut)):
        alone = _packed_run(image, kernel, bias, act, residual, TILES[0], rows=image_rows, per_task=99)
        for threads in sorted({1, 2, max_threads()}):
            with thread_limits(threads):
                for tile in TILES:
                    mr = tile.mr
                    for rows, per_task in ((mr, 1), (3 * mr, 2), (image_rows, 99)):
                        out = _packed_run(image, kernel, bias, act, residual, tile, rows, per_task)
                        np.testing.assert_array_equal(out, alone)
                    for position in range(3):
                        batch = rand(rng, 3 * image_rows, k)
                        batch[position * image_rows:(position + 1) * image_rows] = image
                        res = None if residual is None else np.concatenate([residual] * 3)
                        out = _packed_run(batch, kernel, bias, act, res, tile)
                        np.testing.assert_array_equal(out[position * image_rows:(position + 1) * image_rows], alone)


def test_choose_tile_follows_the_shape_and_the_cpu():
    assert G.choose_tile(12544, 96, avx512=False) == gemm_rules.AVX2_6X16
    assert G.choose_tile(1, 1000, avx512=True) == gemm_rules.AVX512_1X128  # a matrix-vector product
    assert G.choose_tile(3136, 24, avx512=True) == gemm_rules.AVX512_8X32
    # 48 columns in panels of 16, 64 of 32: on AMD's cores the narrow tile, on Intel's the wide one but for a width
    # of 16 (kernels/gemm_rules.py NARROW_TILE_ONLY_AT_16)
    assert G.choose_tile(784, 40, avx512=True, cpu="znver5") == gemm_rules.AVX512_28X16
    assert G.choose_tile(784, 40, avx512=True, cpu="rocketlake") == gemm_rules.AVX512_8X32
    assert G.choose_tile(12544, 16, avx512=True, cpu="rocketlake") == gemm_rules.AVX512_28X16
    assert G.choose_tile(196, 80, avx512=True, cpu="icelake-server") == gemm_rules.AVX512_7X32
    assert G.choose_tile(49, 960, avx512=True) == gemm_rules.AVX512_7X32  # a 7x7 map: 7-row tiles pad no row
    assert G.choose_tile(392, 960, avx512=True) == gemm_rules.AVX512_8X32  # a batch of 8: 8-row tiles pad none


def test_tiling_covers_the_product_and_gives_several_cores_work():
    for m in (1, 7, 49, 196, 3136, 12544):
        for k in (1, 16, 960):
            for panels in (1, 3, 8, 63):
                for mr in (1, 6, 8, 28):
                    rows, per_task = G.tiling(m, k, panels, mr)
                    assert rows >= 1 and 1 <= per_task <= panels
                    assert rows % mr == 0 or rows >= m
                    tasks = -(-m // rows) * -(-panels // per_task)
                    if -(-m // mr) * panels >= G.TASKS:
                        assert tasks >= min(G.TASKS, 4), (m, k, panels, mr, rows, per_task)


def test_gemm_packed_refuses_shapes_that_do_not_fit(rng):
    packed = G.pack(rand(rng, 8, 5), rand(rng, 5), 4)
    a, out = rand(rng, 4, 8), np.empty((4, 5), np.float32)
    for bad_a, bad_out, bad_res in ((rand(rng, 4, 7), out, None), (a, np.empty((4, 6), np.float32), None),
                                    (a, out, rand(rng, 3, 5)), (a[:, ::2].repeat(2, 1), out, None),
                                    (a.astype(np.float64), out, None)):
        if bad_a.flags.c_contiguous and bad_a.dtype == np.float32 and bad_a.shape == a.shape and bad_res is None \
                and bad_out.shape == out.shape:
            bad_a = np.asfortranarray(bad_a)
        with pytest.raises(ValueError):
            G.gemm_packed(bad_a, packed, bad_out, ACT_NONE, bad_res)
    with pytest.raises(ValueError):
        G.pack(rand(rng, 8, 5), rand(rng, 4), 4)


def test_the_path_is_a_rule_of_the_layer_shape_and_the_cpu(rng):
    """use_microkernel takes no row count and no thread count: a layer takes one path in every call."""
    import inspect

    from npmobile.kernels import blas
    from npmobile.kernels.pointwise import prepare_weights, use_microkernel

    assert set(inspect.signature(use_microkernel).parameters) == {"k", "n", "avx512"}
    assert all(use_microkernel(k, n, avx512=True) for k in (1, 27, 960, 4096) for n in (1, 24, 1280))
    if blas.AVAILABLE:
        assert not use_microkernel(512, 512, avx512=False) and use_microkernel(160, 960, avx512=False)
    kernel, bias = rand(rng, 24, 40), rand(rng, 40)
    prepared = prepare_weights(kernel, bias, 49)
    assert isinstance(prepared, G.PackedWeights) == use_microkernel(24, 40)


def test_plain_and_prepared_weights_give_the_same_bits(rng):
    from npmobile.kernels.pointwise import pointwise_conv2d, prepare_weights

    x, kernel, bias = rand(rng, 2, 7, 7, 24), rand(rng, 24, 40, scale=0.2), rand(rng, 40)
    plain, prepared = (np.empty((2, 7, 7, 40), np.float32) for _ in range(2))
    pointwise_conv2d(x, kernel, bias, plain, ACT_RELU6)
    pointwise_conv2d(x, prepare_weights(kernel, bias, 98), None, prepared, ACT_RELU6)
    np.testing.assert_array_equal(plain, prepared)


def test_a_tile_not_compiled_for_this_cpu_is_refused_not_run(rng):
    other = next(tile for tile in (gemm_rules.AVX2_6X16, gemm_rules.AVX512_8X32) if tile not in TILES)
    a, kernel, bias = rand(rng, 8, 16), rand(rng, 16, 16), rand(rng, 16)
    with pytest.raises(ValueError, match="not compiled for this CPU"):
        G.gemm_packed(a, G.PackedWeights(kernel, bias, other), np.empty((8, 16), np.float32), ACT_NONE)
