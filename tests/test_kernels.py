"""The fast Numba kernels agree with their NumPy reference twins (kernels/reference.py).

Tolerance is stated in float32 rounding: the fast kernels sum in a different order (and with
FMA), so they may differ from the reference by a few ulps of the largest value involved:
max |fast - ref| <= 1e-5 * max(1, max |ref|). Elementwise activations, which do the same
operations in the same order, must match bit for bit.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from npmobile.errors import ThreadCountError
from npmobile.kernels import backend, blas
from npmobile.kernels import reference as ref
from npmobile.kernels.activations import (
    ACT_HARD_SIGMOID,
    ACT_HARD_SWISH,
    ACT_NONE,
    ACT_RELU,
    ACT_RELU6,
    ACT_SIGMOID,
    ACT_SWISH,
    activate,
    activation_code,
    add,
    softmax,
)
from npmobile.kernels.conv import conv2d, indirection_table
from npmobile.kernels.depthwise import depthwise_conv2d
from npmobile.kernels.entry import in_order, needs_blas, no_work
from npmobile.kernels.gemm import COMPILED_TILES, INDIRECT_CIN, INDIRECT_TILES, pack
from npmobile.kernels.pointwise import (
    TILES_PER_IMAGE,
    dense,
    gemm_matmul,
    gemm_tiles,
    pointwise_conv2d,
    pointwise_conv2d_numba,
    tile_shape,
)
from npmobile.kernels.pooling import global_average_pool
from npmobile.kernels.squeeze_excite import squeeze_excite
from npmobile.kernels.threads import hold_blas, max_threads, set_threads, thread_limits

REFERENCE_ACTIVATIONS = {
    ACT_NONE: lambda x: x,
    ACT_RELU: ref.relu,
    ACT_RELU6: ref.relu6,
    ACT_HARD_SWISH: ref.hard_swish,
    ACT_HARD_SIGMOID: ref.hard_sigmoid,
    ACT_SIGMOID: ref.sigmoid,
    ACT_SWISH: ref.swish,
}
ALL_ACTS = list(REFERENCE_ACTIVATIONS)
EXACT_ACTS = [ACT_NONE, ACT_RELU, ACT_RELU6, ACT_HARD_SWISH, ACT_HARD_SIGMOID]


def assert_close(fast: np.ndarray, expected: np.ndarray) -> None:
    assert fast.shape == expected.shape
    assert np.all(np.isfinite(fast))
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    err = float(np.abs(fast.astype(np.float64) - expected).max(initial=0.0))
    assert err <= 1e-5 * scale, f"max error {err:.3g} exceeds 1e-5 * {scale:.3g}"


def rand(rng, *shape, scale=1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# --------------------------------------------------------------------------------------------------
# Activations and elementwise kernels
# --------------------------------------------------------------------------------------------------


def _activation_probe(rng) -> np.ndarray:
    # The breakpoints (-3, 0, 3, 6) and their float32 neighbours, plus a spread of ordinary values.
    edges = np.array([-3.0, 0.0, 3.0, 6.0, -6.0, 9.0, 1.0 / 3.0, 40.0, -40.0], dtype=np.float32)
    near = np.concatenate([edges, np.nextafter(edges, np.float32(np.inf)), np.nextafter(edges, np.float32(-np.inf))])
    x = np.concatenate([near, rand(rng, 2 * 7 * 5 * 13 - near.size, scale=4.0)])
    return x.reshape(2, 7, 5, 13)


@pytest.mark.parametrize("act", EXACT_ACTS)
def test_piecewise_activations_match_reference_bit_for_bit(rng, act):
    x = _activation_probe(rng)
    out = np.empty_like(x)
    activate(x, out, act)
    np.testing.assert_array_equal(out, REFERENCE_ACTIVATIONS[act](x))


@pytest.mark.parametrize("act", [ACT_SIGMOID, ACT_SWISH])
def test_sigmoid_activations_match_reference_to_an_ulp(rng, act):
    x = _activation_probe(rng)
    out = np.empty_like(x)
    activate(x, out, act)
    expected = REFERENCE_ACTIVATIONS[act](x)
    np.testing.assert_allclose(out, expected, rtol=4e-7, atol=1e-37)


def test_hard_swish_divides_by_six_like_keras():
    # Values where x * (r / 6) and x * (r * (1/6)) round differently in float32.
    x = np.linspace(-3.0, 3.0, 20001, dtype=np.float32).reshape(1, 1, 1, -1)
    out = np.empty_like(x)
    activate(x, out, ACT_HARD_SWISH)
    r = np.minimum(np.maximum(x + np.float32(3), np.float32(0)), np.float32(6))
    by_multiply = x * (r * np.float32(1.0 / 6.0))
    assert np.any(by_multiply != x * (r / np.float32(6)))  # the probe does tell them apart
    np.testing.assert_array_equal(out, x * (r / np.float32(6)))


def test_activate_works_in_place(rng):
    x = _activation_probe(rng)
    expected = ref.relu6(x)
    activate(x, x, ACT_RELU6)
    np.testing.assert_array_equal(x, expected)


@pytest.mark.parametrize("act", [ACT_NONE, ACT_RELU])
def test_add_matches_numpy_sum_then_activation(rng, act):
    a, b = rand(rng, 3, 9, 7, 13), rand(rng, 3, 9, 7, 13)
    out = np.empty_like(a)
    add(a, b, out, act)
    np.testing.assert_array_equal(out, REFERENCE_ACTIVATIONS[act](a + b))


def test_softmax_matches_reference(rng):
    x = rand(rng, 3, 1000, scale=5.0)
    out = np.empty_like(x)
    softmax(x, out)
    np.testing.assert_allclose(out, ref.softmax(x), rtol=2e-6, atol=1e-9)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-5)


def test_activation_codes_cover_keras_names():
    assert activation_code(None) == activation_code("linear") == ACT_NONE
    assert activation_code("hard_silu") == activation_code("hard_swish") == ACT_HARD_SWISH
    assert activation_code("silu") == ACT_SWISH
    with pytest.raises(KeyError):
        activation_code("softmax")


# --------------------------------------------------------------------------------------------------
# Depthwise convolution
# --------------------------------------------------------------------------------------------------

# (batch, height, width, channels, kernel, stride, ((top, bottom), (left, right)))
DEPTHWISE_CASES = [
    (1, 1, 1, 8, 3, 1, ((1, 1), (1, 1))),  # a 1x1 image: every tap but the centre is padding
    (1, 1, 1, 3, 3, 2, ((0, 1), (0, 1))),
    (1, 7, 5, 13, 3, 1, ((1, 1), (1, 1))),
    (3, 7, 5, 13, 3, 2, ((0, 1), (0, 1))),  # MobileNetV1 stride-2 padding
    (1, 8, 8, 72, 3, 2, ((1, 1), (1, 1))),  # V2/V3 correct_pad on an odd-sized step
    (1, 9, 9, 1, 3, 2, ((1, 1), (1, 1))),
    (2, 9, 14, 40, 3, 1, ((1, 1), (1, 1))),  # vector kernel: whole blocks, a partial block, group remainders
    (1, 10, 17, 24, 3, 3, ((1, 1), (1, 1))),  # a stride with no grouped loop
    (1, 5, 9, 33, 3, 1, ((4, 4), (1, 1))),  # padding taller than the kernel: rows with no tap inside
    (1, 12, 12, 88, 5, 1, ((2, 2), (2, 2))),
    (3, 11, 6, 40, 5, 2, ((1, 2), (1, 2))),
    (1, 14, 14, 120, 5, 2, ((2, 2), (2, 2))),
    (1, 6, 9, 17, 3, 1, ((0, 0), (0, 0))),  # valid padding
    (1, 6, 9, 17, 5, 1, ((0, 1), (2, 0))),  # lopsided
    (1, 10, 10, 24, 7, 1, ((3, 3), (3, 3))),  # a kernel size with no special path
    (1, 113, 113, 16, 3, 2, ((1, 1), (1, 1))),
    (1, 4, 4, 5, 5, 1, ((2, 2), (2, 2))),  # kernel wider than the image
]


def _reference_depthwise(x, kernel, bias, stride, pads, act):
    y = ref.depthwise_conv2d(x, kernel[..., None], bias, (stride, stride), pads)
    return REFERENCE_ACTIVATIONS[act](y)


def _fast_depthwise(x, kernel, bias, stride, pads, act):
    (top, bottom), (left, right) = pads
    k = kernel.shape[0]
    oh = ref.conv_output_size(x.shape[1], k, stride, (top, bottom))
    ow = ref.conv_output_size(x.shape[2], k, stride, (left, right))
    out = np.full((x.shape[0], oh, ow, x.shape[3]), np.nan, dtype=np.float32)
    depthwise_conv2d(x, kernel, bias, out, stride, stride, top, left, act)
    return out


@pytest.mark.parametrize("case", DEPTHWISE_CASES, ids=lambda c: "n{}_{}x{}x{}_k{}_s{}_p{}".format(*c))
def test_depthwise_matches_reference(rng, case):
    n, h, w, c, k, stride, pads = case
    x, kernel, bias = rand(rng, n, h, w, c), rand(rng, k, k, c, scale=0.5), rand(rng, c)
    for act in ALL_ACTS:
        fast = _fast_depthwise(x, kernel, bias, stride, pads, act)
        assert_close(fast, _reference_depthwise(x, kernel, bias, stride, pads, act))


# Every MobileNet-like depthwise shape the vector kernel meets, border pixels included: square maps
# from 1x1 up, odd sizes, strides 1 and 2, "same" and "valid" padding, channel counts that are and
# are not a multiple of the vector width (16 with AVX-512, 8 with AVX2), batches of one and two.
GRID_CHANNELS = (1, 7, 17, 72, 120, 16, 8, 33)
DEPTHWISE_GRID = [
    (1 + (size + stride) % 2, size, size, GRID_CHANNELS[(size + k + stride + len(padding)) % len(GRID_CHANNELS)],
     k, stride, padding)
    for k in (3, 5) for stride in (1, 2) for padding in ("same", "valid")
    for size in (1, 2, 3, 5, 7, 9, 14, 15, 40)  # 40: enough whole 5x5 groups for the plain-load loop
    if padding == "same" or size >= k
]


@pytest.mark.parametrize("case", DEPTHWISE_GRID, ids=lambda c: "n{}_{}x{}x{}_k{}_s{}_{}".format(*c))
def test_depthwise_vector_paths_match_reference(rng, case):
    n, h, w, c, k, stride, padding = case
    pads = ((0, 0), (0, 0)) if padding == "valid" else (ref.same_padding(h, k, stride), ref.same_padding(w, k, stride))
    x, kernel, bias = rand(rng, n, h, w, c), rand(rng, k, k, c, scale=0.5), rand(rng, c)
    for act in ALL_ACTS:
        fast = _fast_depthwise(x, kernel, bias, stride, pads, act)
        assert_close(fast, _reference_depthwise(x, kernel, bias, stride, pads, act))


ROW_ORDER_CASES = [case for case in DEPTHWISE_GRID if case[4] == 3] + [
    (1, 14, 14, 512, 3, 1, "same"), (1, 7, 7, 1024, 3, 2, "same"), (2, 28, 28, 256, 3, 2, "valid")]


@pytest.mark.parametrize("case", ROW_ORDER_CASES, ids=lambda c: "n{}_{}x{}x{}_k{}_s{}_{}".format(*c))
def test_depthwise_row_orders_give_the_same_bits(rng, case):
    """Block by block over a row, or every block of a group of pixels in turn (depthwise_rules.by_pixel_order
    chooses by shape): the same FMAs for every output, so the same bits, on the serial and parallel drivers."""
    from npmobile.kernels.depthwise_drivers import vector_depthwise, vector_depthwise_serial
    from npmobile.kernels.depthwise_row_kernels import row_kernel
    from npmobile.kernels.depthwise_rules import VECTOR_ACTS

    n, h, w, c, k, stride, padding = case
    pads = ((0, 0), (0, 0)) if padding == "valid" else (ref.same_padding(h, k, stride), ref.same_padding(w, k, stride))
    x, kernel, bias = rand(rng, n, h, w, c), rand(rng, k, k, c, scale=0.5), rand(rng, c)
    expected = _fast_depthwise(x, kernel, bias, stride, pads, ACT_NONE)
    for act in ALL_ACTS:
        if act not in VECTOR_ACTS:
            continue
        outs = []
        for by_pixel in (False, True):
            for driver in (vector_depthwise_serial, vector_depthwise):
                out = np.full(expected.shape, np.nan, np.float32)
                driver(row_kernel(3, act, by_pixel), x, kernel, bias, out, stride, stride, pads[0][0], pads[1][0],
                       act)
                outs.append(out)
        for out in outs[1:]:
            np.testing.assert_array_equal(out, outs[0])
        assert_close(outs[0], _reference_depthwise(x, kernel, bias, stride, pads, act))


def test_depthwise_row_order_rule():
    """Pixel by pixel where a block's rows, C floats apart, crowd a few L1 sets (V1's channel counts)."""
    from npmobile.kernels.depthwise_rules import VECTOR_WIDTH, by_pixel_order

    assert by_pixel_order(3, 512, 14, 14) and by_pixel_order(3, 128, 56, 28) and by_pixel_order(3, 1024, 7, 7)
    assert not by_pixel_order(3, 576, 14, 14) and not by_pixel_order(3, 144, 56, 56)  # V2's: spread over the sets
    assert not by_pixel_order(3, 72, 56, 56)  # pixels not a whole number of lines apart
    assert not by_pixel_order(5, 1024, 7, 7)  # no MobileNet 5x5 layer conflicts: one order for them
    assert not by_pixel_order(3, VECTOR_WIDTH, 112, 112)  # one block: the same loads either way


@pytest.mark.parametrize("k, stride, pads", [(3, 1, ((1, 1), (1, 1))), (3, 2, ((0, 1), (0, 1))),
                                             (5, 1, ((2, 2), (2, 2))), (5, 2, ((1, 2), (1, 2)))])
@pytest.mark.parametrize("size, channels", [(7, 40), (14, 17), (2, 24), (40, 16)])
def test_depthwise_border_pixels_sum_like_interior_ones(rng, k, stride, pads, size, channels):
    """A border window adds its taps as an interior one does: the same image padded by hand, where
    every window is inside, gives the same bits (the outside taps count as exact zeros)."""
    x, kernel, bias = rand(rng, 2, size, size, channels), rand(rng, k, k, channels, scale=0.5), rand(rng, channels)
    for act in (ACT_NONE, ACT_RELU6, ACT_HARD_SWISH):
        fast = _fast_depthwise(x, kernel, bias, stride, pads, act)
        padded = _fast_depthwise(ref.zero_pad(x, pads).astype(np.float32), kernel, bias, stride, ((0, 0), (0, 0)), act)
        np.testing.assert_array_equal(fast, padded)


@pytest.mark.parametrize("k, stride, pads", [(3, 1, ((1, 1), (1, 1))), (3, 2, ((0, 1), (0, 1))),
                                             (5, 1, ((2, 2), (2, 2))), (5, 2, ((1, 2), (1, 2)))])
def test_depthwise_plain_loops_sum_like_the_vector_kernel(rng, k, stride, pads):
    """The two implementations add each output's taps in the same order: an input that is not in C
    order (the plain loops) gives the bits of the same input in C order (the vector kernel)."""
    x, kernel, bias = rand(rng, 2, 11, 11, 40), rand(rng, k, k, 40, scale=0.5), rand(rng, 40)
    strided = np.zeros((2, 11, 22, 40), np.float32)[:, :, ::2]
    strided[...] = x
    for act in (ACT_NONE, ACT_RELU6, ACT_HARD_SWISH):
        np.testing.assert_array_equal(_fast_depthwise(strided, kernel, bias, stride, pads, act),
                                      _fast_depthwise(x, kernel, bias, stride, pads, act))


@pytest.mark.parametrize("k, stride, pads", [(3, 2, ((0, 1), (0, 1))), (5, 1, ((2, 2), (2, 2)))])
def test_bound_depthwise_matches_the_plain_call_on_one_and_two_threads(rng, k, stride, pads):
    """The plan's form (checked once, bound to its arrays) gives the plain call's bits on the serial and the
    parallel path alike; arrays not in C order are bound to the plain loops; shapes that do not fit fail at bind."""
    from npmobile.kernels.depthwise import depthwise_conv2d
    from npmobile.kernels.entry import ByThreads

    x, kernel, bias = rand(rng, 2, 9, 9, 24), rand(rng, k, k, 24, scale=0.5), rand(rng, 24)
    expected = _fast_depthwise(x, kernel, bias, stride, pads, ACT_HARD_SWISH)
    out = np.full_like(expected, np.nan)
    call = depthwise_conv2d.bind(x, kernel, bias, out, stride, stride, pads[0][0], pads[1][0], ACT_HARD_SWISH)
    assert isinstance(call, ByThreads)
    for form in (call.one, call.many, call):
        for threads in (1, 2):
            with thread_limits(threads):
                out[...] = np.nan
                form()
                np.testing.assert_array_equal(out, expected)
    strided = np.full((2, 9, 18, 24), np.nan, np.float32)[:, :, ::2]  # not C order: the plain loops
    strided[...] = x
    out[...] = np.nan
    depthwise_conv2d.bind(strided, kernel, bias, out, stride, stride, pads[0][0], pads[1][0], ACT_HARD_SWISH)()
    assert_close(out, expected)
    with pytest.raises(ValueError, match="do not fit"):
        depthwise_conv2d.bind(x[:, :, :, :8], kernel, bias, out, stride, stride, pads[0][0], pads[1][0],
                              ACT_HARD_SWISH)


def test_same_padding_gives_ceil_of_size_over_stride_positions():
    for size in (1, 7, 112, 113):
        for k, s, d in [(3, 1, 1), (3, 2, 1), (5, 2, 1), (1, 2, 1), (3, 1, 2)]:
            assert ref.conv_output_size(size, k, s, ref.same_padding(size, k, s, d), d) == -(-size // s)


# --------------------------------------------------------------------------------------------------
# Pointwise convolution / dense (GEMM with fused epilogue)
# --------------------------------------------------------------------------------------------------

# (batch, height, width, cin, cout)
POINTWISE_CASES = [
    (1, 1, 1, 1, 1),
    (1, 7, 5, 13, 3),
    (3, 5, 7, 3, 13),
    (1, 56, 56, 24, 144),
    (1, 14, 14, 576, 88),
    (1, 7, 7, 320, 1280),
    (3, 9, 9, 72, 40),
    (1, 113, 113, 16, 24),
]
POINTWISE_IMPLEMENTATIONS = {"blas": pointwise_conv2d, "numba": pointwise_conv2d_numba}


@pytest.mark.parametrize("impl", POINTWISE_IMPLEMENTATIONS)
@pytest.mark.parametrize("case", POINTWISE_CASES, ids=lambda c: "n{}_{}x{}_{}to{}".format(*c))
def test_pointwise_matches_reference(rng, case, impl):
    n, h, w, cin, cout = case
    fn = POINTWISE_IMPLEMENTATIONS[impl]
    x, kernel, bias = rand(rng, n, h, w, cin), rand(rng, cin, cout, scale=cin**-0.5), rand(rng, cout)
    shortcut = rand(rng, n, h, w, cout)
    plain = ref.pointwise_conv2d(x, kernel, bias)
    for act in ALL_ACTS:
        out = np.full((n, h, w, cout), np.nan, dtype=np.float32)
        fn(x, kernel, bias, out, act)
        assert_close(out, REFERENCE_ACTIVATIONS[act](plain))
    for act in (ACT_NONE, ACT_RELU6):  # residual: added after bias (and activation), as Keras's Add
        out = np.full((n, h, w, cout), np.nan, dtype=np.float32)
        fn(x, kernel, bias, out, act, shortcut)
        assert_close(out, REFERENCE_ACTIVATIONS[act](plain) + shortcut)


def test_blas_sgemm_is_found():
    """NumPy's wheels bundle a 64-bit-integer OpenBLAS: the tiled kernel must be the one that runs."""
    assert blas.AVAILABLE


GEMM_SHAPES = [(1, 1, 1), (1, 1280, 1000), (7, 5, 3), (49, 160, 960), (196, 24, 144), (3136, 8, 24)]


@pytest.mark.parametrize("m,k,n", GEMM_SHAPES)
def test_gemm_tiles_any_tiling_matches_reference(rng, m, k, n):
    """Every way of cutting the product -- ragged last tiles, single rows or columns, one tile, one
    image or several -- gives the reference's answer, with and without a residual, on one thread and on all."""
    a, w, bias, shortcut = rand(rng, m, k), rand(rng, k, n, scale=k**-0.5), rand(rng, n), rand(rng, m, n)
    plain = ref.dense(a, w, bias)
    tilings = {(m, n), (1, 1), (max(1, m // 3), max(1, n // 2)), (5, 17), (64, n), tile_shape(m, k, n)}
    images = [1] + [d for d in (3, 7) if m % d == 0]
    for threads in sorted({1, max_threads()}):
        with thread_limits(threads):
            for count in images:
                for tile_rows, tile_cols in sorted(tilings):
                    out = np.full((m, n), np.nan, dtype=np.float32)
                    gemm_tiles(a, w, bias, out, ACT_RELU6, None, m // count, min(tile_rows, m // count), tile_cols)
                    assert_close(out, ref.relu6(plain))
                    gemm_tiles(a, w, bias, out, ACT_NONE, shortcut, m // count, min(tile_rows, m // count), tile_cols)
                    assert_close(out, plain + shortcut)


def test_tile_shape_gives_four_cores_work_and_ignores_the_thread_count():
    """The cut is a function of one image's shape (the determinism contract): it takes no thread count,
    and gives at least TILES_PER_IMAGE tiles wherever an image is big enough to split."""
    assert "threads" not in inspect.signature(tile_shape).parameters
    for m in (1, 7, 49, 196, 784, 3136, 12544, 100000):
        for n in (1, 16, 24, 96, 160, 1000, 1280):
            for k in (3, 27, 128, 1024):
                tile_rows, tile_cols = tile_shape(m, k, n)
                assert 1 <= tile_rows <= m and 1 <= tile_cols <= n
                tiles = -(-m // tile_rows) * -(-n // tile_cols)
                if m * n >= 64 * 32 * TILES_PER_IMAGE:  # big enough to split
                    assert tiles >= TILES_PER_IMAGE, (m, k, n, tile_rows, tile_cols)


def test_gemm_answers_an_image_the_same_wherever_it_sits_in_a_batch(rng):
    """Bit for bit, not within a tolerance: the engine cuts each image the same way, so the same
    arithmetic runs in the same order for it alone, in a batch, on one core or on all."""
    h, w, k, n = 14, 14, 144, 24
    image = rand(rng, 1, h, w, k)
    weights, bias = rand(rng, k, n, scale=k**-0.5), rand(rng, n)
    alone = np.empty((1, h, w, n), np.float32)
    pointwise_conv2d(image, weights, bias, alone, ACT_RELU6)
    for threads in sorted({1, max_threads()}):
        with thread_limits(threads):
            for position in range(3):
                batch = rand(rng, 3, h, w, k)
                batch[position] = image[0]
                out = np.empty((3, h, w, n), np.float32)
                pointwise_conv2d(batch, weights, bias, out, ACT_RELU6)
                np.testing.assert_array_equal(out[position], alone[0])


def test_kernels_refuse_shapes_that_do_not_fit(rng):
    """Numba does not check indices and the tiled kernels hand BLAS raw addresses: a mismatched shape
    must raise before any of them runs."""
    x, w, b = rand(rng, 1, 4, 4, 8), rand(rng, 8, 6), rand(rng, 6)
    with pytest.raises(ValueError, match="do not fit"):
        pointwise_conv2d(x, w, b, np.empty((1, 4, 5, 6), np.float32))  # more pixels out than in
    with pytest.raises(ValueError, match="do not fit"):
        pointwise_conv2d(x, w, b, np.empty((1, 4, 4, 6), np.float32), ACT_NONE, rand(rng, 1, 4, 2, 6))
    with pytest.raises(ValueError, match="do not fit"):
        dense(rand(rng, 2, 7), w, b, np.empty((2, 6), np.float32))
    with pytest.raises(ValueError, match="do not fit"):
        conv2d(x, rand(rng, 3, 3, 8, 6), b, np.empty((2, 2, 2, 6), np.float32), 2, 2, 0, 0)  # batch 2 from 1
    with pytest.raises(ValueError, match="do not fit"):
        depthwise_conv2d(x, rand(rng, 3, 3, 6), rand(rng, 6), np.empty((1, 4, 4, 8), np.float32), 1, 1, 1, 1, ACT_NONE)
    with pytest.raises(ValueError, match="do not fit"):
        squeeze_excite(x, rand(rng, 8, 2), rand(rng, 2), rand(rng, 2, 6), rand(rng, 6), np.empty_like(x))
    for call in (lambda: activate(x, np.empty(5, np.float32), ACT_RELU),
                 lambda: add(x, x[:, :2], np.empty_like(x), ACT_NONE),
                 lambda: softmax(rand(rng, 2, 10), np.empty((2, 9), np.float32)),
                 lambda: global_average_pool(x, np.empty((2, 8), np.float32))):
        with pytest.raises(ValueError):
            call()


def test_gemm_matmul_fallback_matches_reference(rng):
    """The path taken when no sgemm can be called from Numba (a NumPy on another BLAS)."""
    a, w, bias, shortcut = rand(rng, 300, 40), rand(rng, 40, 24, scale=0.2), rand(rng, 24), rand(rng, 300, 24)
    out = np.full((300, 24), np.nan, dtype=np.float32)
    gemm_matmul(a, w, bias, out, ACT_HARD_SWISH, None)
    assert_close(out, ref.hard_swish(ref.dense(a, w, bias)))
    gemm_matmul(a, w, bias, out, ACT_NONE, shortcut)
    assert_close(out, ref.dense(a, w, bias) + shortcut)


def test_dense_matches_reference(rng):
    x, kernel, bias = rand(rng, 3, 1280), rand(rng, 1280, 1000, scale=0.03), rand(rng, 1000)
    out = np.empty((3, 1000), dtype=np.float32)
    dense(x, kernel, bias, out, ACT_NONE)
    assert_close(out, ref.dense(x, kernel, bias))
    probs = np.empty_like(out)
    softmax(out, probs)
    np.testing.assert_allclose(probs, ref.softmax(ref.dense(x, kernel, bias)), rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# Standard convolution (im2col + GEMM)
# --------------------------------------------------------------------------------------------------

# (batch, height, width, cin, cout, kernel, stride, dilation, ((top, bottom), (left, right)))
CONV_CASES = [
    (1, 224, 224, 3, 32, 3, 2, 1, ((0, 1), (0, 1))),  # the MobileNet stem (V1/V2 padding)
    (3, 17, 13, 3, 16, 3, 2, 1, ((1, 1), (1, 1))),  # V3 stem padding="same" on an odd image
    (1, 1, 1, 3, 8, 3, 2, 1, ((1, 1), (1, 1))),
    (1, 9, 11, 13, 7, 5, 1, 1, ((2, 2), (2, 2))),
    (1, 9, 11, 4, 5, 3, 1, 2, ((2, 2), (2, 2))),  # dilated
    (1, 8, 8, 6, 10, 1, 2, 1, ((0, 0), (0, 0))),  # strided 1x1
    (1, 10, 7, 5, 3, 2, 2, 1, ((0, 1), (1, 0))),
    # Three input channels take the indirect GEMM: pixel counts off every tile height (6, 8, 28),
    # padding on every side, strides 1 and 2, "valid" and "same", batches, a dilated 5x5.
    (2, 15, 12, 3, 16, 3, 1, 1, ((1, 1), (1, 1))),
    (1, 7, 9, 3, 40, 3, 2, 1, ((0, 0), (0, 0))),
    (2, 33, 31, 3, 32, 3, 2, 1, ((0, 1), (0, 1))),
    (1, 10, 11, 3, 8, 5, 2, 2, ((3, 5), (4, 2))),
    (4, 5, 5, 3, 17, 3, 2, 1, ((1, 1), (1, 1))),
    (1, 2, 3, 3, 5, 3, 1, 1, ((2, 2), (1, 3))),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "n{}_{}x{}_{}to{}_k{}_s{}_d{}_p{}".format(*c))
def test_conv2d_matches_reference(rng, case):
    n, h, w, cin, cout, k, stride, dil, pads = case
    x, kernel, bias = rand(rng, n, h, w, cin), rand(rng, k, k, cin, cout, scale=0.3), rand(rng, cout)
    (top, bottom), (left, right) = pads
    oh = ref.conv_output_size(h, k, stride, (top, bottom), dil)
    ow = ref.conv_output_size(w, k, stride, (left, right), dil)
    plain = ref.conv2d(x, kernel, bias, (stride, stride), pads, (dil, dil))
    pixels = (x * 40 + 128).astype(np.float32)
    rescaled = ref.conv2d(ref.rescale(pixels, 1 / 127.5, -1), kernel, bias, (stride, stride), pads, (dil, dil))
    # OpenBLAS tiles (no packed weights), then the microkernel in each of its tiles.
    for packed in (None, *(pack(kernel.reshape(-1, cout), bias, n * oh * ow, tile) for tile in COMPILED_TILES)):
        for act in (ACT_NONE, ACT_RELU6, ACT_HARD_SWISH, ACT_SWISH):
            out = np.full((n, oh, ow, cout), np.nan, dtype=np.float32)
            conv2d(x, kernel, bias, out, stride, stride, top, left, act, dil, dil, packed=packed)
            assert_close(out, REFERENCE_ACTIVATIONS[act](plain))
        # A Rescaling folded in (V3's [0, 255] -> [-1, 1]): rescaled inside the image, zero in the padding.
        for patches in (None, np.full(n * oh * ow * k * k * cin + 5, np.nan, np.float32)):
            out = np.full((n, oh, ow, cout), np.nan, dtype=np.float32)
            conv2d(pixels, kernel, bias, out, stride, stride, top, left, ACT_NONE, dil, dil, 1 / 127.5, -1.0, patches,
                   packed)
            assert_close(out, rescaled)


@pytest.mark.parametrize("case", [c for c in CONV_CASES if c[3] == INDIRECT_CIN],
                         ids=lambda c: "n{}_{}x{}_{}to{}_k{}_s{}_d{}_p{}".format(*c))
def test_indirect_gemm_gives_the_bits_of_im2col_and_the_microkernel(rng, case):
    """The stem's outputs do not change with the indirect GEMM: each is the same FMA chain over
    k = (ky, kx, c), then the bias, then the activation, in every tile, rescaled or not."""
    n, h, w, cin, cout, k, stride, dil, pads = case
    (top, bottom), (left, right) = pads
    oh = ref.conv_output_size(h, k, stride, (top, bottom), dil)
    ow = ref.conv_output_size(w, k, stride, (left, right), dil)
    x, kernel, bias = rand(rng, n, h, w, cin), rand(rng, k, k, cin, cout, scale=0.3), rand(rng, cout)
    x[0, 0, 0] = -0.0  # a negative zero, which x * 1 + 0 would make positive, changes no sum
    pixels = (x * 40 + 128).astype(np.float32)
    for tile in COMPILED_TILES:
        packed = pack(kernel.reshape(-1, cout), bias, n * oh * ow, tile)
        table = indirection_table(h, w, cin, oh, ow, k, k, stride, stride, top, left, dil, dil, tile.mr)
        for act in ALL_ACTS:
            for image, scale, offset in ((x, 1.0, 0.0), (pixels, 1 / 127.5, -1.0)):
                outs = []
                scratch = np.full(image.size + 7, np.nan, np.float32)  # as the plan makes them, once
                for indirect, tab, rescaled in ((False, None, None), (True, None, None), (True, table, scratch)):
                    out = np.full((n, oh, ow, cout), np.nan, dtype=np.float32)
                    conv2d(image, kernel, bias, out, stride, stride, top, left, act, dil, dil, scale, offset,
                           packed=packed, table=tab, rescaled=rescaled, indirect=indirect)
                    outs.append(out)
                np.testing.assert_array_equal(outs[1], outs[0])
                np.testing.assert_array_equal(outs[2], outs[0])


def test_indirect_gemm_answer_depends_on_the_image_alone(rng):
    """One image's stem output, bit for bit: alone or at any position of a batch, on 1 or 2 threads,
    however the pixels are cut into tasks."""
    kernel, bias = rand(rng, 3, 3, 3, 24, scale=0.3), rand(rng, 24)
    image = (rand(rng, 1, 29, 23, 3) * 40 + 128).astype(np.float32)
    oh, ow = 15, 12
    for tile in COMPILED_TILES:
        packed = pack(kernel.reshape(-1, 24), bias, oh * ow, tile)
        alone = np.empty((1, oh, ow, 24), np.float32)
        conv2d(image, kernel, bias, alone, 2, 2, 1, 0, ACT_HARD_SWISH, 1, 1, 1 / 127.5, -1.0, packed=packed)
        for threads in sorted({1, 2, max_threads()}):
            with thread_limits(threads):
                for position in range(3):
                    batch = (rand(rng, 3, 29, 23, 3) * 40 + 128).astype(np.float32)
                    batch[position] = image[0]
                    out = np.empty((3, oh, ow, 24), np.float32)
                    conv2d(batch, kernel, bias, out, 2, 2, 1, 0, ACT_HARD_SWISH, 1, 1, 1 / 127.5, -1.0, packed=packed)
                    np.testing.assert_array_equal(out[position], alone[0])
                mr = tile.mr
                packed.cuts[-oh * ow] = (mr, 1)  # another cut of the pixels into tasks: one tile each
                out = np.empty((1, oh, ow, 24), np.float32)
                conv2d(image, kernel, bias, out, 2, 2, 1, 0, ACT_HARD_SWISH, 1, 1, 1 / 127.5, -1.0, packed=packed)
                np.testing.assert_array_equal(out, alone)
                del packed.cuts[-oh * ow]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "n{}_{}x{}_{}to{}_k{}_s{}_d{}_p{}".format(*c))
def test_indirection_table_reference_twin_matches_conv2d(rng, case):
    n, h, w, cin, cout, k, stride, dil, pads = case
    (top, bottom), (left, right) = pads
    oh = ref.conv_output_size(h, k, stride, (top, bottom), dil)
    ow = ref.conv_output_size(w, k, stride, (left, right), dil)
    x, kernel, bias = rand(rng, n, h, w, cin), rand(rng, k, k, cin, cout, scale=0.3), rand(rng, cout)
    for mr in (1, 6, 28):
        table = indirection_table(h, w, cin, oh, ow, k, k, stride, stride, top, left, dil, dil, mr)
        assert table.shape == (-(-oh * ow // mr), k * k, mr) and table.dtype == np.int32
        assert_close(ref.indirect_conv2d(x, table, kernel, bias)[:, : oh * ow].reshape(n, oh, ow, cout),
                     ref.conv2d(x, kernel, bias, (stride, stride), pads, (dil, dil)))


def test_conv2d_refuses_an_indirection_table_of_another_geometry(rng):
    x, kernel, bias = rand(rng, 1, 9, 9, 3), rand(rng, 3, 3, 3, 8), rand(rng, 8)
    tile = INDIRECT_TILES[0]  # one of this CPU's indirect tiles, given a table cut for other tile rows
    packed = pack(kernel.reshape(-1, 8), bias, 25, tile)
    with pytest.raises(ValueError, match="indirection table"):
        conv2d(x, kernel, bias, np.empty((1, 5, 5, 8), np.float32), 2, 2, 1, 1, packed=packed,
               table=indirection_table(9, 9, 3, 5, 5, 3, 3, 2, 2, 1, 1, mr=tile.mr + 1))


def test_conv2d_without_blas_matches_reference(rng, monkeypatch):
    """The im2col + np.matmul path, taken when kernels/blas.py finds no sgemm."""
    monkeypatch.setattr(blas, "AVAILABLE", False)
    x, kernel, bias = rand(rng, 2, 15, 12, 3), rand(rng, 3, 3, 3, 8, scale=0.3), rand(rng, 8)
    out = np.full((2, 8, 6, 8), np.nan, dtype=np.float32)
    conv2d(x, kernel, bias, out, 2, 2, 1, 0, ACT_RELU6, 1, 1, 0.5, 0.25)
    assert_close(out, ref.relu6(ref.conv2d(ref.rescale(x, 0.5, 0.25), kernel, bias, (2, 2), ((1, 1), (0, 1)))))


# --------------------------------------------------------------------------------------------------
# Pooling and squeeze-and-excite
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1, 1, 5), (3, 7, 7, 1280), (2, 13, 5, 88), (1, 112, 112, 16)])
def test_global_average_pool_matches_reference(rng, shape):
    x = rand(rng, *shape)
    out = np.empty((shape[0], 1, 1, shape[3]), dtype=np.float32)  # a keepdims buffer, filled via a view
    global_average_pool(x, out.reshape(shape[0], shape[3]))
    assert_close(out, ref.global_average_pool(x, keepdims=True))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape,reduced", [((1, 1, 1, 16), 8), ((3, 7, 7, 72), 24), ((1, 14, 14, 672), 168),
                                           ((2, 5, 3, 13), 4), ((1, 1, 1, 1), 1), ((2, 3, 5, 7), 3),
                                           ((1, 3, 5, 17), 5), ((8, 7, 7, 72), 24), ((1, 56, 56, 16), 8),
                                           ((2, 7, 7, 960), 240), ((1, 28, 28, 120), 32)])
def test_squeeze_excite_matches_reference(rng, shape, reduced, threads):
    c = shape[3]
    x = rand(rng, *shape)
    w1, b1 = rand(rng, c, reduced, scale=c**-0.5), rand(rng, reduced)
    w2, b2 = rand(rng, reduced, c, scale=reduced**-0.5) * 3, rand(rng, c)
    expected = ref.squeeze_excite(x, w1, b1, w2, b2)
    out = np.full_like(x, np.nan)
    with thread_limits(threads):
        squeeze_excite(x, w1, b1, w2, b2, out)
        assert_close(out, expected)
        squeeze_excite(x, w1, b1, w2, b2, x)  # in place
    assert_close(x, expected)
    np.testing.assert_array_equal(x, out)


@pytest.mark.parametrize("shape,reduced", [((4, 14, 14, 240), 64), ((3, 7, 7, 960), 240)])  # small, big dense
def test_squeeze_excite_same_answer_on_any_thread_count_and_batch_position(rng, shape, reduced):
    """Each image's gate is summed in one order: alone or in a batch, on one thread or two."""
    c = shape[3]
    x = rand(rng, *shape)
    w1, b1 = rand(rng, c, reduced, scale=0.1), rand(rng, reduced)
    w2, b2 = rand(rng, reduced, c, scale=0.1), rand(rng, c)
    outs = []
    for threads in (1, 2):
        with thread_limits(threads):
            out = np.empty_like(x)
            squeeze_excite(x, w1, b1, w2, b2, out)
            outs.append(out)
            for n in range(shape[0]):
                alone = np.empty_like(x[n:n + 1])
                squeeze_excite(x[n:n + 1].copy(), w1, b1, w2, b2, alone)
                np.testing.assert_array_equal(alone[0], out[n])
    np.testing.assert_array_equal(outs[0], outs[1])


# --------------------------------------------------------------------------------------------------
# Threads
# --------------------------------------------------------------------------------------------------


def _run_all(rng_seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(rng_seed)
    x = rand(rng, 2, 29, 31, 40)
    dw = np.empty((2, 15, 16, 40), dtype=np.float32)
    depthwise_conv2d(x, rand(rng, 3, 3, 40), rand(rng, 40), dw, 2, 2, 1, 1, ACT_RELU6)
    pw = np.empty((2, 15, 16, 24), dtype=np.float32)
    pointwise_conv2d_numba(dw, rand(rng, 40, 24, scale=0.2), rand(rng, 24), pw, ACT_NONE, rand(rng, 2, 15, 16, 24))
    pb = np.empty_like(pw)
    pointwise_conv2d(dw, rand(rng, 40, 24, scale=0.2), rand(rng, 24), pb, ACT_HARD_SWISH)
    stem = np.empty((2, 15, 16, 8), dtype=np.float32)
    conv2d(x[..., :3].copy(), rand(rng, 3, 3, 3, 8), rand(rng, 8), stem, 2, 2, 1, 1, ACT_RELU)
    se = np.empty_like(dw)
    squeeze_excite(dw, rand(rng, 40, 8), rand(rng, 8), rand(rng, 8, 40), rand(rng, 40), se)
    act = np.empty_like(x)
    activate(x, act, ACT_HARD_SWISH)
    return [dw, pw, pb, stem, se, act]


def test_one_and_two_threads_give_identical_results():
    with thread_limits(1):
        one = _run_all(7)
    with thread_limits(2):
        two = _run_all(7)
    for a, b in zip(one, two, strict=True):
        np.testing.assert_array_equal(a, b)


def _blas_threads() -> list[int]:
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


def test_thread_limits_pins_blas_to_one_and_restores_both_pools():
    np.ones((2, 2)) @ np.ones((2, 2))  # make sure NumPy's BLAS is loaded
    numba_before, blas_before = backend.get_num_threads(), _blas_threads()
    with thread_limits(1) as n:
        assert n == 1 and backend.get_num_threads() == 1
        assert _blas_threads() and all(t == 1 for t in _blas_threads())
    assert backend.get_num_threads() == numba_before
    assert _blas_threads() == blas_before


def test_thread_limits_without_blas_leaves_blas_alone():
    np.ones((2, 2)) @ np.ones((2, 2))
    with threadpool_limits(2, user_api="blas"):
        blas_before = _blas_threads()
        with thread_limits(1, blas=False):
            assert backend.get_num_threads() == 1
            assert _blas_threads() == blas_before
            with hold_blas():
                assert all(t == 1 for t in _blas_threads())
            assert _blas_threads() == blas_before


def test_bound_calls_say_whether_they_call_blas():
    """A plan holds BLAS to one thread only when a step calls it (npmobile/plan.py): the bound calls say so."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 9, 9, 4)).astype(np.float32)
    out = np.empty((1, 9, 9, 8), np.float32)
    kernel, bias = rng.standard_normal((3, 3, 4, 8)).astype(np.float32), np.zeros(8, np.float32)
    # A 4-channel convolution without packed weights: im2col, then BLAS (or NumPy's matmul).
    assert needs_blas(conv2d.bind(x, kernel, bias, out, 1, 1, 1, 1))
    dw_out = np.empty_like(x)
    dw_kernel = rng.standard_normal((3, 3, 4)).astype(np.float32)
    assert not needs_blas(depthwise_conv2d.bind(x, dw_kernel, np.zeros(4, np.float32), dw_out, 1, 1, 1, 1, ACT_NONE))
    assert not needs_blas(in_order(no_work, no_work))
    assert needs_blas(in_order(no_work, lambda: None))  # a Python step may call anything


def test_set_threads_sets_both_pools_and_refuses_counts_the_kernels_cannot_run():
    before, blas_before = backend.get_num_threads(), _blas_threads()
    try:
        assert set_threads(1) == 1
        assert backend.get_num_threads() == 1
        assert all(t == 1 for t in _blas_threads())
        assert set_threads(None) == max_threads() == backend.get_num_threads()
        for wrong in (0, -1, max_threads() + 1, 1.5, True, "2"):
            with pytest.raises(ThreadCountError, match=f"threads={wrong!r}: this process may use 1 to "):
                set_threads(wrong)
            with pytest.raises(ThreadCountError):
                with thread_limits(wrong):
                    pass
        assert backend.get_num_threads() == max_threads()
    finally:
        backend.set_num_threads(before)
        if blas_before:
            threadpool_limits(limits=blas_before[0], user_api="blas")


@pytest.mark.jit_only
def test_kernels_cached_says_so_once_a_models_own_kernels_are_compiled(tmp_path):
    """The 'compiling kernels' notice follows the kernels the model runs: a MobileNetV2 never compiles the 5x5
    depthwise or the squeeze-excite kernel, so their absence must not make every run announce a compile."""
    import os
    import subprocess
    import sys

    script = (
        "import numpy as np\n"
        "from npmobile.applications import MobileNetV2\n"
        "from npmobile.kernels.threads import kernels_cached\n"
        "model = MobileNetV2(weights=None, alpha=0.35, input_shape=(64, 64, 3))\n"
        "before = kernels_cached((3,), False, False)\n"
        "model.predict(np.zeros((1, 64, 64, 3), np.float32))\n"
        "print(before, kernels_cached((3,), False, False), kernels_cached((3, 5), True, True))\n"
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "NPMOBILE_KERNELS": "jit"}  # the JIT's cache, in any pass
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True", "False"]
