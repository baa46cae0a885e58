"""docs/depthwise.md: every printed number is a doctest, and every cost it quotes agrees with npmobile.costs.
README.md: the benchmark table is the latest full bench run."""

from __future__ import annotations

import doctest
import importlib.util
import json
import re
from pathlib import Path

import pytest

from npmobile import applications, costs
from npmobile.applications.builder import Builder
from npmobile.applications.common import finish_model

REPO = Path(__file__).resolve().parent.parent
TUTORIAL = REPO / "docs" / "depthwise.md"

# A number quoted with a unit of cost: "864 MACs", "300.8 M MACs", "3,538,984 parameters", "54 weights".
QUOTED = re.compile(r"(\d[\d,]*(?:\.\d+)?(?: M)?) (MACs|weights|parameters)\b")


def test_tutorial_code_runs_and_prints_what_it_says():
    result = doctest.testfile(str(TUTORIAL), module_relative=False, report=True,
                              optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.attempted > 50
    assert result.failed == 0


def _prose(text: str) -> str:
    """The tutorial without its code blocks: what a reader reads as claims."""
    return re.sub(r"```.*?```", "", text, flags=re.S)


def _toy_models():
    """Section 2 and 3's layers as npmobile models on a 4x4x2 input: one standard 3x3 convolution 2 -> 3,
    and a depthwise 3x3 followed by a pointwise 2 -> 3 (no biases, as in the tutorial)."""
    standard = Builder()
    x = standard.input((4, 4, 2))
    y = standard.conv2d(x, 3, 3, use_bias=False, name="standard")
    separable = Builder()
    x2 = separable.input((4, 4, 2))
    d = separable.depthwise_conv2d(x2, 3, name="depthwise")
    p = separable.conv2d(d, 3, 1, use_bias=False, name="pointwise")
    return (finish_model(standard.spec(x, y, "standard"), standard.in_channels, None, None),
            finish_model(separable.spec(x2, p, "separable"), separable.in_channels, None, None))


@pytest.fixture(scope="module")
def computed() -> dict[str, str]:
    """Every cost the tutorial talks about, as npmobile.costs computes it, in the ways the text writes it."""
    values: dict[str, int] = {}
    standard, separable = _toy_models()
    for name, model in (("toy standard", standard), ("toy separable", separable)):
        c = costs.layer_costs(model)
        values[f"{name} MACs"] = costs.total_macs(c)
        values[f"{name} weights"] = costs.total_params(c)
    for family, size in (("MobileNet", 224), ("MobileNetV2", 224), ("MobileNetV3Small", 224)):
        c = costs.layer_costs(getattr(applications, family)(weights=None, input_shape=(size, size, 3)))
        values[f"{family} MACs"] = costs.total_macs(c)
        values[f"{family} params"] = costs.total_params(c)
        for t in costs.part_totals(c):
            values[f"{family} {t.part} MACs"] = t.macs
        if family == "MobileNetV2":
            block = {x.name: x for x in c}["block_2_depthwise"]
            values.update({"block_2 depthwise MACs": block.macs, "block_2 pair MACs": block.pair_macs,
                           "block_2 standard MACs": block.pair_standard_macs})
    written = {}
    for key, v in values.items():
        written[f"{v:,}"] = key
        written[costs.millions(v)] = key
    return written


def test_tutorial_quotes_only_costs_npmobile_computes(computed):
    quoted = QUOTED.findall(_prose(TUTORIAL.read_text(encoding="utf-8")))
    unknown = [f"{number} {unit}" for number, unit in quoted if number not in computed]
    assert not unknown, f"numbers in docs/depthwise.md that npmobile.costs does not produce: {unknown}"


def test_tutorial_quotes_the_headline_costs(computed):
    quoted = {number for number, _ in QUOTED.findall(_prose(TUTORIAL.read_text(encoding="utf-8")))}
    headline = {"864", "54", "384", "24", "568.7 M", "4,253,864", "300.8 M", "3,538,984", "458,752"}
    assert headline <= quoted
    assert computed["300.8 M"] == "MobileNetV2 MACs"
    assert computed["3,538,984"] == "MobileNetV2 params"
    assert computed["864"] == "toy standard MACs" and computed["384"] == "toy separable MACs"


def test_readme_benchmark_table_is_the_latest_run():
    """README's benchmark block is bench/results/latest.json as `python bench/run.py --markdown` renders it,
    so the table a reader sees is the newest full run, with its date and machine."""
    spec = importlib.util.spec_from_file_location("bench_run", REPO / "bench" / "run.py")
    bench_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_run)
    report = json.loads((REPO / "bench" / "results" / "latest.json").read_text())
    readme = (REPO / "README.md").read_text()
    start = readme.index("\n", readme.index("<!-- bench-table")) + 1
    block = readme[start : readme.index("<!-- /bench-table -->")].strip()
    assert block == bench_run.markdown(report)
    assert {(c["model"], c["batch"], c["threads"]) for c in report["cells"]} == {
        (m, b, t) for m in ("v1", "v2", "v3s", "v3l") for b in (1, 8) for t in (1, 2)}
