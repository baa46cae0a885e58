"""npmobile.costs counts params and MACs the way the MobileNet papers and keras.applications do."""

from __future__ import annotations

import numpy as np
import pytest

from npmobile import applications, costs, profiling


@pytest.fixture(scope="module")
def v2_224():
    return applications.MobileNetV2(weights=None, input_shape=(224, 224, 3))


@pytest.fixture(scope="module")
def v2_costs(v2_224):
    return costs.layer_costs(v2_224)


def test_mobilenet_v2_224_has_the_documented_300_8_million_macs(v2_costs):
    # keras.applications and the MobileNetV2 paper quote 300 M (300.8 M) multiply-adds for 1.0 at 224.
    assert costs.total_macs(v2_costs) == 300_774_272
    assert costs.millions(costs.total_macs(v2_costs)) == "300.8 M"


def test_mobilenet_v2_224_params_match_keras_layer_by_layer(v2_costs):
    import keras
    reference = keras.applications.MobileNetV2(weights=None, input_shape=(224, 224, 3))
    assert costs.total_params(v2_costs) == reference.count_params() == 3_538_984
    ours = {c.name: c.params for c in v2_costs}
    theirs = {layer.name: layer.count_params() for layer in reference.layers if layer.name in ours}
    assert theirs == {name: ours[name] for name in theirs}
    # Every layer with parameters is matched by name (Keras's automatic names, like input_layer_5,
    # depend on how many models the session built before, so only weighted layers are compared).
    assert {name for name, params in ours.items() if params} <= set(theirs)


def test_mobilenet_v1_224_has_569_million_macs():
    model = applications.MobileNet(weights=None, input_shape=(224, 224, 3))
    assert round(costs.total_macs(costs.layer_costs(model)) / 1e6) == 569  # the V1 paper's 569 M mult-adds


def test_depthwise_layer_costs_follow_the_formulas(v2_costs):
    by_name = {c.name: c for c in v2_costs}
    dw = by_name["block_1_depthwise"]  # 3x3, stride 2: 112x112x96 -> 56x56x96, then project 96 -> 24
    assert dw.output_shape == (None, 56, 56, 96)
    assert dw.macs == 56 * 56 * 3 * 3 * 96
    assert dw.params == 3 * 3 * 96  # no bias: BatchNorm follows
    assert dw.standard_params == 3 * 3 * 96 * 96
    assert dw.standard_macs == 56 * 56 * 3 * 3 * 96 * 96
    assert dw.pointwise == "block_1_project"
    assert dw.pair_params == 3 * 3 * 96 + 96 * 24
    assert dw.pair_standard_params == 3 * 3 * 96 * 24
    assert dw.pair_macs == 56 * 56 * (3 * 3 * 96 + 96 * 24)
    assert dw.pair_saving == pytest.approx((9 * 96 * 24) / (9 * 96 + 96 * 24))
    # The pointwise part of the pair is exactly the projection layer's MACs.
    assert dw.pair_macs == dw.macs + by_name["block_1_project"].macs


def test_v2_parts_come_from_the_graph_structure(v2_costs):
    part = {c.name: c.part for c in v2_costs}
    assert part["Conv1"] == part["bn_Conv1"] == "stem"
    assert part["block_5_expand_relu"] == "expand"
    assert part["block_1_pad"] == part["block_5_depthwise_BN"] == "depthwise"
    assert part["block_5_project"] == part["block_5_add"] == "project"
    assert part["Conv_1"] == part["out_relu"] == "head"
    assert part["predictions"] == "classifier"


def test_part_subtotals_add_up_to_the_totals(v2_costs):
    totals = costs.part_totals(v2_costs)
    assert [t.part for t in totals] == ["stem", "expand", "depthwise", "project", "head", "classifier"]
    assert sum(t.macs for t in totals) == costs.total_macs(v2_costs)
    assert sum(t.params for t in totals) == costs.total_params(v2_costs)
    assert sum(t.layers for t in totals) == len(v2_costs)


def test_v1_pairs_and_v3_squeeze_excite_get_their_own_parts():
    v1 = costs.layer_costs(applications.MobileNet(weights=None, input_shape=(128, 128, 3)))
    assert {c.part for c in v1} == {"stem", "depthwise", "pointwise", "head", "classifier"}
    assert {c.name: c.pointwise for c in v1 if c.op == "DepthwiseConv2D"}["conv_dw_7"] == "conv_pw_7"
    v3 = costs.layer_costs(applications.MobileNetV3Small(weights=None, input_shape=(128, 128, 3)))
    se = [c for c in v3 if c.part == "se"]
    # Keras's automatic names inside the SE gate (add, re_lu_1, multiply) inherit the part.
    assert {"expanded_conv_squeeze_excite_conv", "add", "re_lu_1", "multiply"} <= {c.name for c in se}
    assert sum(c.macs for c in se) > 0
    # The pointwise after a V3 depthwise is the projection, never the SE's 1x1 convolutions.
    assert all(c.pointwise.endswith("_project") for c in v3 if c.op == "DepthwiseConv2D")


def test_unknown_input_size_needs_a_size():
    model = applications.MobileNetV2(weights=None, input_shape=(None, None, 3), include_top=False)
    with pytest.raises(ValueError, match="unknown input size"):
        costs.layer_costs(model)
    fixed = applications.MobileNetV2(weights=None, input_shape=(160, 160, 3), include_top=False)
    assert costs.total_macs(costs.layer_costs(model, input_size=160)) == costs.total_macs(costs.layer_costs(fixed))


def test_costs_text_states_the_convention_and_totals(v2_224, v2_costs):
    text = costs.costs_text(v2_224, v2_costs)
    assert costs.CONVENTION in text
    assert "Total MACs:   300,774,272 (300.8 M" in text
    assert "Total params: 3,538,984 (3.54 M)" in text
    assert "+ block_1_project 1x1 96→24" in text


@pytest.mark.parametrize("family", ["MobileNet", "MobileNetV2", "MobileNetV3Small"])
def test_fused_plan_steps_count_the_same_macs(family):
    # Folding BN and fusing activations/SE must not change the arithmetic the costs count.
    model = getattr(applications, family)(weights=None, input_shape=(96, 96, 3))
    steps = profiling.plan_costs(model.optimized_graph(), (1, 96, 96, 3))
    assert sum(s.macs for s in steps) == costs.total_macs(costs.layer_costs(model))


def test_depthwise_steps_have_lower_intensity_than_pointwise_steps(v2_224):
    steps = profiling.plan_costs(v2_224.optimized_graph(), (1, 224, 224, 3))
    depthwise = [s.intensity for s in steps if s.kind == "depthwise"]
    pointwise = [s.intensity for s in steps if s.kind == "pointwise"]
    # 9 MACs per element loaded: about 2.25 FLOPs per byte at stride 1, less at stride 2.
    assert max(depthwise) == pytest.approx(2.25, abs=0.01)
    assert max(depthwise) < min(pointwise)


def test_step_cost_counts_float32_bytes_of_inputs_outputs_and_weights(v2_224):
    steps = {s.name: s for s in profiling.plan_costs(v2_224.optimized_graph(), (1, 224, 224, 3))}
    dw = steps["block_4_depthwise"]  # 28x28x192 -> 28x28x192, 3x3 kernel + folded bias
    assert dw.bytes == 4 * (2 * 28 * 28 * 192 + 9 * 192 + 192)
    assert dw.flops == 2 * 28 * 28 * 9 * 192
    # Fused with its expand layer (npmobile/ops/expand_depthwise.py): the 56x56x144 tensor between them is
    # never written, so the step reads the block's 24 channels and writes 144.
    fused = steps["block_2_depthwise"]
    assert fused.bytes == 4 * (56 * 56 * 24 + 56 * 56 * 144 + 24 * 144 + 144 + 9 * 144 + 144)
    assert fused.flops == 2 * 56 * 56 * (24 * 144 + 9 * 144)


def test_machine_probe_measures_positive_peak_and_bandwidth():
    machine = profiling.measure_machine(1, memory=False)
    assert machine.peak_gflops > 0 and machine.bandwidth_gbs > 0 and machine.threads == 1
    assert machine.balance == pytest.approx(machine.peak_gflops / machine.bandwidth_gbs)
    assert machine.attainable_gflops(1e9) == machine.peak_gflops
    assert machine.attainable_gflops(1e-9) == pytest.approx(1e-9 * machine.bandwidth_gbs)
    assert np.isfinite(machine.balance)


def _hand_built_separable_net(path):
    """A model written the way a user writes one: Keras's automatic names (conv2d, depthwise_conv2d_1,
    re_lu_3, ...), two depthwise + pointwise pairs, an inverted block with a squeeze-excite gate and a
    residual add, pooling and a Dense classifier."""
    import keras
    from keras import layers

    inputs = keras.Input((32, 32, 3))
    x = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(8, 3, strides=2, padding="same")(inputs)))
    for channels in (16, 24):
        x = layers.ReLU()(layers.BatchNormalization()(layers.DepthwiseConv2D(3, padding="same")(x)))
        x = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(channels, 1)(x)))
    shortcut = x
    x = layers.ReLU()(layers.Conv2D(72, 1)(x))  # expand
    x = layers.ReLU()(layers.DepthwiseConv2D(3, padding="same")(x))
    gate = layers.GlobalAveragePooling2D(keepdims=True)(x)
    gate = layers.Activation("sigmoid")(layers.Conv2D(72, 1)(layers.ReLU()(layers.Conv2D(16, 1)(gate))))
    x = layers.Multiply()([x, gate])
    x = layers.Add()([shortcut, layers.Conv2D(24, 1)(x)])  # project + residual
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(10, activation="softmax")(x)
    keras.Model(inputs, outputs).save(path)


def test_hand_built_model_gets_its_parts_from_structure_not_names(tmp_path):
    import npmobile

    path = tmp_path / "hand_built.keras"
    _hand_built_separable_net(path)
    layers = costs.layer_costs(npmobile.load_model(path))
    by_op: dict[str, list[str]] = {}
    for c in layers:
        by_op.setdefault(c.op, []).append(c.part)
    assert by_op["DepthwiseConv2D"] == ["depthwise"] * 3
    # In graph order: stem, a V1-style pair's pointwise half, then the 1x1 after a depthwise layer that is
    # followed by an expansion (a projection), the expansion, the gate's two 1x1s, the projection.
    assert by_op["Conv2D"] == ["stem", "pointwise", "project", "expand", "se", "se", "project"]
    assert by_op["Dense"] == ["classifier"] and by_op["Multiply"] == ["se"] and by_op["Add"] == ["project"]
    totals = {t.part: t for t in costs.part_totals(layers)}
    assert totals["depthwise"].macs > 0 and totals["pointwise"].macs > 0
    assert totals["stem"].layers < 5  # the model put all 29 layers in "stem"
