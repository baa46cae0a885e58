"""The fused 1x1 + depthwise kernel (kernels/expand_depthwise.py) and the pass that makes its nodes.

The fused kernel must give the bits of the two fast kernels run one after the other (the microkernel
product, then the depthwise vector kernel), on any thread count and band size, and so stay within
float32 rounding of its NumPy twin: reference.pointwise_conv2d, the activation, reference.depthwise_conv2d.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_kernels import REFERENCE_ACTIVATIONS, assert_close, rand

from npmobile.kernels import expand_depthwise as fused
from npmobile.kernels import reference as ref
from npmobile.kernels.activations import ACT_HARD_SWISH, ACT_NONE, ACT_RELU, ACT_RELU6
from npmobile.kernels.depthwise import depthwise_conv2d
from npmobile.kernels.gemm import gemm_packed, pack
from npmobile.kernels.gemm_rules import AVX2_6X16, AVX512_8X32
from npmobile.kernels.threads import thread_limits

# (images, height, width, input channels, expanded channels, window, stride, ((top, bottom), (left, right)))
CASES = [
    (1, 112, 112, 16, 96, 3, 2, ((0, 1), (0, 1))),  # MobileNetV2 block_1 (ZeroPadding2D + valid)
    (2, 56, 56, 24, 144, 3, 1, ((1, 1), (1, 1))),  # block_2, a batch
    (1, 23, 19, 8, 40, 3, 1, ((1, 1), (1, 1))),  # odd sizes; channels not a multiple of the tiles
    (3, 17, 30, 5, 20, 3, 2, ((1, 1), (1, 1))),  # stride 2 on odd maps
    (1, 40, 40, 16, 72, 5, 2, ((1, 2), (1, 2))),  # MobileNetV3's 5x5 stride 2
    (2, 29, 11, 12, 24, 5, 1, ((2, 2), (2, 2))),
    (1, 9, 9, 4, 16, 3, 1, ((0, 0), (0, 0))),  # valid padding
]
ACT_PAIRS = [(ACT_RELU6, ACT_RELU6), (ACT_HARD_SWISH, ACT_NONE), (ACT_NONE, ACT_RELU), (ACT_RELU, ACT_HARD_SWISH)]


@pytest.fixture
def rng():
    return np.random.default_rng(4321)


def _layers(rng, case):
    n, h, w, cin, c, k, stride, pads = case
    return (rand(rng, n, h, w, cin), rand(rng, cin, c, scale=0.4), rand(rng, c), rand(rng, k, k, c, scale=0.5),
            rand(rng, c))


def _output_shape(case):
    n, h, w, _, c, k, stride, ((top, bottom), (left, right)) = case
    return (n, ref.conv_output_size(h, k, stride, (top, bottom)), ref.conv_output_size(w, k, stride, (left, right)), c)


def _two_kernels(x, packed, expand_act, kernel, bias, case, act):
    """The two fast kernels one after the other, through a whole intermediate tensor."""
    n, h, w, cin, c, k, stride, ((top, _), (left, _)) = case
    mid = np.empty((n, h, w, c), np.float32)
    gemm_packed(x.reshape(-1, cin), packed, mid.reshape(-1, c), expand_act)
    out = np.full(_output_shape(case), np.nan, np.float32)
    depthwise_conv2d(mid, kernel, bias, out, stride, stride, top, left, act)
    return out


def _fused(x, packed, expand_act, kernel, bias, case, act, threads=2):
    n, h, w, cin, c, k, stride, ((top, _), (left, _)) = case
    out = np.full(_output_shape(case), np.nan, np.float32)
    scratch = fused.scratch_for(threads, w, c, k, stride)
    fused.expand_depthwise(x, packed, expand_act, kernel, bias, out, stride, stride, top, left, act, scratch)
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: "n{}_{}x{}_{}to{}_k{}_s{}".format(*c[:7]))
def test_fused_gives_the_bits_of_the_two_kernels_on_one_and_two_threads(rng, case):
    x, kernel, e_bias, dw, bias = _layers(rng, case)
    for expand_act, act in ACT_PAIRS:
        packed = pack(kernel, e_bias, 0, fused.TILE)
        expected = _two_kernels(x, pack(kernel, e_bias, x.shape[0] * x.shape[1] * x.shape[2]), expand_act, dw, bias,
                                case, act)
        for threads in (1, 2):
            with thread_limits(threads):
                np.testing.assert_array_equal(_fused(x, packed, expand_act, dw, bias, case, act), expected)


@pytest.mark.parametrize("case", CASES[2:5], ids=lambda c: "n{}_{}x{}_{}to{}_k{}_s{}".format(*c[:7]))
def test_fused_matches_its_numpy_twin(rng, case):
    x, kernel, e_bias, dw, bias = _layers(rng, case)
    *_, k, stride, pads = case
    for expand_act, act in ACT_PAIRS:
        mid = REFERENCE_ACTIVATIONS[expand_act](ref.pointwise_conv2d(x, kernel, e_bias))
        expected = REFERENCE_ACTIVATIONS[act](ref.depthwise_conv2d(mid, dw[..., None], bias, (stride, stride), pads))
        assert_close(_fused(x, pack(kernel, e_bias, 0, fused.TILE), expand_act, dw, bias, case, act), expected)


@pytest.mark.parametrize("band_bytes", [1, 4096, 1 << 30])  # one row per band, a few rows, the whole map
def test_any_band_size_gives_the_same_bits_as_any_tile_of_the_two_kernels(rng, band_bytes, monkeypatch):
    """The band's rows moved up from the last band (overlapping when a band is one row at stride 1) change
    no bit, nor does the tile the unfused product runs (the fused kernel runs ``TILE`` alone)."""
    monkeypatch.setattr(fused, "BAND_BYTES", band_bytes)
    for case in (CASES[2], CASES[3], CASES[5]):
        x, kernel, e_bias, dw, bias = _layers(rng, case)
        answer = _fused(x, pack(kernel, e_bias, 0, fused.TILE), ACT_RELU6, dw, bias, case, ACT_RELU6)
        for rows in (1, 49, 5000):  # the matrix-vector, 7-row and 8-row tiles (those this CPU compiles)
            expected = _two_kernels(x, pack(kernel, e_bias, rows), ACT_RELU6, dw, bias, case, ACT_RELU6)
            np.testing.assert_array_equal(answer, expected)


def test_fused_refuses_what_does_not_fit(rng):
    case = CASES[2]
    x, kernel, e_bias, dw, bias = _layers(rng, case)
    packed = pack(kernel, e_bias, 0, fused.TILE)
    out = np.empty(_output_shape(case), np.float32)
    scratch = fused.scratch_for(2, 19, 40, 3, 1)
    call = fused.expand_depthwise.bind
    with pytest.raises(ValueError, match="do not fit"):
        call(x, packed, ACT_RELU6, dw, bias, out, 1, 1, 1, 1, ACT_RELU6, scratch[:, :-1])  # scratch too small
    with pytest.raises(ValueError, match="do not fit"):
        call(x, packed, ACT_RELU6, dw, bias, out, 1, 1, 3, 1, ACT_RELU6, scratch)  # padding as tall as the window
    with pytest.raises(ValueError, match="do not fit"):
        call(x[..., :4], packed, ACT_RELU6, dw, bias, out, 1, 1, 1, 1, ACT_RELU6, scratch)
    with pytest.raises(ValueError, match="do not fit"):
        call(x, packed, 99, dw, bias, out, 1, 1, 1, 1, ACT_RELU6, scratch)  # an activation not on the registers
    with pytest.raises(ValueError, match="not this kernel's"):
        other = AVX512_8X32 if fused.TILE != AVX512_8X32 else AVX2_6X16
        call(x, pack(kernel, e_bias, 1, other), ACT_RELU6, dw, bias, out, 1, 1, 1, 1, ACT_RELU6, scratch)
    with pytest.raises(ValueError, match="C-contiguous float32"):
        call(x, packed, ACT_RELU6, dw, bias, out[:, :, ::-1], 1, 1, 1, 1, ACT_RELU6, scratch)


# --------------------------------------------------------------------------------------------------
# The pass and the model
# --------------------------------------------------------------------------------------------------


def _fused_names(model, outputs=None):
    return [n.name for n in model.optimized_graph(outputs).nodes if n.op == "ExpandDepthwise"]


def test_mobilenet_v2_at_224_fuses_its_first_three_expansions_and_answers_the_same(monkeypatch):
    from npmobile.applications import MobileNetV2
    from npmobile.passes import expand_depthwise as fusion_rule

    model = MobileNetV2(weights=None)
    assert _fused_names(model) == ["block_1_depthwise", "block_2_depthwise", "block_3_depthwise"]
    fused_node = next(n for n in model.optimized_graph().nodes if n.op == "ExpandDepthwise")
    assert fused_node.keras_names[:3] == ["block_1_expand", "block_1_expand_BN", "block_1_expand_relu"]
    x = np.random.default_rng(0).uniform(-1, 1, (2, 224, 224, 3)).astype(np.float32)
    answer = model.predict(x)

    monkeypatch.setattr(fusion_rule, "MIN_EXPANDED_BYTES", 1 << 40)  # the same model, nothing fused
    unfused = MobileNetV2(weights=None)
    unfused.graph = model.graph
    assert _fused_names(unfused) == []
    np.testing.assert_array_equal(unfused.predict(x), answer)
    np.testing.assert_array_equal(model.predict(x, reference=True).argmax(1), answer.argmax(1))


def test_no_fusion_where_the_expansion_is_asked_for_or_small_or_of_any_size():
    from npmobile.applications import MobileNet, MobileNetV2

    model = MobileNetV2(weights=None)
    assert "block_1_depthwise" not in _fused_names(model, ["block_1_expand_relu"])  # its output is wanted
    assert _fused_names(MobileNetV2(weights=None, input_shape=(64, 64, 3))) == []  # stays in the L2 cache
    assert _fused_names(MobileNetV2(weights=None, input_shape=(None, None, 3))) == []  # size unknown
    assert _fused_names(MobileNet(weights=None)) == []  # 32+ channels in: nothing to gain
