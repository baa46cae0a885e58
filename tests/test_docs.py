"""docs/depthwise.md: every printed number is a doctest, and every cost it quotes agrees with npmobile.costs.
README.md: the benchmark table is the latest full bench run."""

from __future__ import annotations

import doctest
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
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


@pytest.fixture
def bench_run(monkeypatch):
    """bench/run.py as a module."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))  # run.py imports engines.py from beside it, as a script does
    spec = importlib.util.spec_from_file_location("bench_run", REPO / "bench" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_benchmark_table_is_the_latest_run(bench_run):
    """README's benchmark block is bench/results/latest.json as `python bench/run.py --markdown` renders it,
    so the table a reader sees is the newest full run, with its date and machine."""
    report = json.loads((REPO / "bench" / "results" / "latest.json").read_text())
    readme = (REPO / "README.md").read_text()
    start = readme.index("\n", readme.index("<!-- bench-table")) + 1
    block = readme[start : readme.index("<!-- /bench-table -->")].strip()
    assert block == bench_run.markdown(report)
    assert {(c["model"], c["batch"], c["threads"]) for c in report["cells"]} == {
        (m, b, t) for m in ("v1", "v2", "v3s", "v3l") for b in (1, 8) for t in (1, 2)}


def test_benchmark_block_shows_each_engines_share_of_peak_and_start_up(bench_run):
    """With a run's peaks and start-up per engine, the block adds the share-of-peak table (a model's FLOPs x batch
    over the median time, over the peak on the cell's thread count; one figure per thread count) and the start-up
    table (npmobile over ONNX Runtime in brackets)."""
    report = json.loads((REPO / "bench" / "results" / "latest.json").read_text())
    flops = {key: 2 * costs.total_macs(costs.layer_costs(getattr(applications, name)(weights=None), 224))
             for key, name in bench_run.MODELS.items()}
    roofs = {"1": 100.0, "2": 170.0}
    bench_run.add_peak_shares(report["cells"], flops, roofs)
    report.update(roof_gflops=roofs, model_flops=flops)
    seconds = {"npmobile": 0.5, "npmobile_trusted": 0.4, "onnxruntime": 0.25}
    report["startup"]["engines"] = {"threads": 1, "batch": 1, "ready_seconds": 0.1, "same_top5": True, "models": {
        "v2": {engine: {"seconds": s, "peak_mb": 90.0} for engine, s in seconds.items()}}}
    block = bench_run.markdown(report)

    def share(model: str, batch: int, threads: int, engine: str) -> float:
        cell = next(c for c in report["cells"] if (c["model"], c["batch"], c["threads"]) == (model, batch, threads))
        return flops[model] * batch / (cell["ms"][engine]["median"] / 1e3) / 1e9 / roofs[str(threads)] * 100

    ours, ort = share("v2", 8, 1, "npmobile"), share("v2", 8, 2, "onnxruntime")
    row = next(line for line in block.splitlines() if line.startswith("| v2 | 8 | ") and "/" in line)
    assert row.split(" | ")[2] == f"{ours:.0f} / {share('v2', 8, 2, 'npmobile'):.0f}"
    assert row.split(" | ")[5].endswith(f" / {ort:.0f}")
    assert "on 1 thread, 170 GFLOP/s on 2 threads" in block
    assert (f"| v2 | 0.50 s, 90 MB ({0.5 / 0.25:.2f}×) | 0.40 s, 90 MB ({0.4 / 0.25:.2f}×) | 0.25 s, 90 MB |"
            in block)
    timings = bench_run.markdown(json.loads((REPO / "bench" / "results" / "latest.json").read_text()))
    head = "\nShare of the machine"
    assert block.split(head)[0] == timings.split(head)[0]  # the timings table and its lines as without them


def _bench_cell(model: str, ms: dict[str, float], max_abs_diff: float = 0.0, same_top5: bool = True) -> dict:
    """A cell as bench/run.py's time_cell writes it: each engine's median ms (30 calls, an IQR of a tenth of it)."""
    return {"model": model, "batch": 1, "threads": 1,
            "agreement": {e: {"max_abs_diff": max_abs_diff, "same_top5": same_top5} for e in ms},
            "ms": {e: {"median": m, "iqr": m / 10, "n": 30} for e, m in ms.items()}}


def test_median_cells_takes_each_engines_median_across_runs(bench_run):
    """Each cell of several runs: per engine the median of the runs' medians and of their IQRs, the worst
    agreement any run saw; in the first run's order, engines every run measured; one run is its own figures."""
    runs = [[_bench_cell("v1", {"npmobile": 3.0, "onnxruntime": 4.0, "litert": 5.0}),
             _bench_cell("v2", {"npmobile": 1.0, "onnxruntime": 4.0, "litert": 0.5})],
            [_bench_cell("v2", {"npmobile": 9.0, "onnxruntime": 0.5, "litert": 6.5}, max_abs_diff=1e-6),
             _bench_cell("v1", {"npmobile": 1.0, "onnxruntime": 6.0, "litert": 4.0})],
            [_bench_cell("v1", {"npmobile": 8.0, "onnxruntime": 9.0}, same_top5=False),
             _bench_cell("v2", {"npmobile": 2.0, "onnxruntime": 1.0, "litert": 1.5})]]
    v1, v2 = bench_run.median_cells(runs)
    assert (v1["model"], v2["model"]) == ("v1", "v2")
    assert {e: r["median"] for e, r in v1["ms"].items()} == {"npmobile": 3.0, "onnxruntime": 6.0}  # litert: 2 runs
    assert {e: r["median"] for e, r in v2["ms"].items()} == {"npmobile": 2.0, "onnxruntime": 1.0, "litert": 1.5}
    assert v2["ms"]["litert"]["iqr"] == 0.15 and v2["ms"]["litert"]["n"] == 30
    assert v1["agreement"]["npmobile"]["same_top5"] is False and v2["agreement"]["npmobile"]["same_top5"]
    assert v2["agreement"]["npmobile"]["max_abs_diff"] == 1e-6
    assert bench_run.median_cells(runs[:1]) == runs[0]


def test_benchmark_block_says_how_many_runs_and_issue_27s_figures(bench_run):
    """Under the table: how many runs each figure is the median of (a results file without the count is one run)
    and, from the cells, the geometric mean of npmobile / the faster of ONNX Runtime and LiteRT and how many cells
    are at or below both."""
    report = json.loads((REPO / "bench" / "results" / "latest.json").read_text())
    cells = report["cells"]
    ratios = [c["ms"]["npmobile"]["median"] / min(c["ms"]["onnxruntime"]["median"], c["ms"]["litert"]["median"])
              for c in cells]
    figures = (f"npmobile / that peer {np.exp(np.mean(np.log(ratios))):.3f} (geometric mean over {len(cells)} cells); "
               f"at or below both peers in {sum(r <= 1 for r in ratios)} of {len(cells)}")
    one_run = bench_run.markdown(report)
    assert "\nOne run; " in one_run and figures in one_run
    # Three runs whose npmobile times are 0.9x, 1x and 1.2x the file's: the medians are the file's own cells.
    runs = [[{**c, "ms": {**c["ms"], "npmobile": {**c["ms"]["npmobile"], "median": c["ms"]["npmobile"]["median"] * f}}}
             for c in cells] for f in (0.9, 1.0, 1.2)]
    report.update(cells=bench_run.median_cells(runs), runs=runs, median_of_runs=3)
    three_runs = bench_run.markdown(report)
    assert "\nEach figure: the median across 3 runs of `bench/run.py`" in three_runs and figures in three_runs


# --------------------------------------------------------------------------------------------------
# The tutorial's figures and its "Where to go next" commands
# --------------------------------------------------------------------------------------------------


def _figures_module():
    spec = importlib.util.spec_from_file_location("docs_figures", REPO / "docs" / "figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cells(figure, role: str) -> list[float]:
    return [float(text) for r, text in figure.texts if r == role]


def test_tutorial_figures_show_the_reference_kernels_numbers(tmp_path):
    """docs/figures.py draws the tutorial's tensors; every number in a cell is what the reference kernels compute
    for the tutorial's image and filters, and the committed pictures are the ones it draws, shown by the page."""
    from PIL import Image

    from npmobile.kernels import reference as K

    figures = _figures_module()
    drawn = figures.write_all(tmp_path)
    x = np.zeros((1, 4, 4, 2), np.float32)  # section 1, as the page builds it
    x[0, :, 2:, 0] = 1
    x[0, :, :, 1] = [[1], [2], [3], [4]]
    vertical = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float32)
    dw = np.stack([vertical, vertical.T], axis=-1)[..., None]
    pw = np.array([[1, 0, 0.5], [0, 1, 0.5]], np.float32)
    pad = ((1, 1), (1, 1))
    d = K.depthwise_conv2d(x, dw, padding=pad)
    p = K.pointwise_conv2d(d, pw)
    padded = K.zero_pad(x, pad)
    image, sliding, pointwise = (drawn[name] for name in figures.FIGURES)
    for c in range(2):
        assert _cells(image, f"x channel {c}") == x[0, :, :, c].ravel().tolist()
        assert _cells(sliding, f"padded channel {c}") == padded[0, :, :, c].ravel().tolist()
        assert _cells(sliding, f"filter {c}") == dw[:, :, c, 0].ravel().tolist()
        assert _cells(sliding, f"depthwise output {c}") == d[0, :, :, c].ravel().tolist()
    window_sums = [float(t.rsplit("= ", 1)[1]) for r, t in sliding.texts if r == "sum"]
    assert window_sums == [float(d[0, 1, 2, 0]), float(d[0, 1, 2, 1])] == [4.0, 8.0]
    assert _cells(pointwise, "pixel channels") == d[0, 1, 2].tolist()
    assert _cells(pointwise, "pointwise kernel") == pw.ravel().tolist()
    assert _cells(pointwise, "pixel mixed") == p[0, 1, 2].tolist() == (d[0, 1, 2] @ pw).tolist()
    for c in range(3):
        assert _cells(pointwise, f"pointwise output {c}") == p[0, :, :, c].ravel().tolist()
    page = TUTORIAL.read_text(encoding="utf-8")
    for name, figure in drawn.items():
        assert f"]({name})" in page, f"docs/depthwise.md does not show {name}"
        with Image.open(REPO / "docs" / name) as committed:
            assert committed.size == figure.image.size, f"docs/{name} is not what docs/figures.py draws now"


def _next_commands() -> list[list[str]]:
    """The npmobile commands of the tutorial's "Where to go next", as argument lists."""
    section = TUTORIAL.read_text(encoding="utf-8").split("## Where to go next", 1)[1]
    return [command.split()[1:] for command in re.findall(r"`(npmobile [^`]+)`", section)]


def test_where_to_go_next_commands_run_offline_on_files_the_reader_has(tmp_path):
    """Run from a copy of the repository's root with only samples/ in it, with every download pointed at a
    closed port: each command exits 0."""
    import os
    import subprocess
    import sys

    commands = _next_commands()
    assert len(commands) >= 4 and all(c[0] in ("summary", "profile", "show") for c in commands)
    (tmp_path / "samples").symlink_to(REPO / "samples")
    env = {**os.environ, "NPMOBILE_AUTO_BUILD": "0", "NPMOBILE_WEIGHTS_DIR": str(tmp_path / "weights"),
           "KERAS_HOME": str(tmp_path / "keras"), "NPMOBILE_CACHE_DIR": str(tmp_path / "cache"),
           "NPMOBILE_WEIGHTS_URL": "http://127.0.0.1:9/"}
    for command in commands:
        result = subprocess.run([sys.executable, "-m", "npmobile", *command], capture_output=True, text=True,
                                cwd=tmp_path, env=env, timeout=600)
        assert result.returncode == 0, f"npmobile {' '.join(command)}: {result.stderr[-500:]}"
    assert (tmp_path / "maps.png").exists() and (tmp_path / "roofline.png").exists()


# --------------------------------------------------------------------------------------------------
# README.md and the docs/ pages it links: short, linked pages exist, every shell command accounted for
# --------------------------------------------------------------------------------------------------

README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
SHELL_BLOCK = re.compile(r"```(?:bash|sh|shell|console)\n(.*?)```", re.S)
NPMOBILE_COMMAND = re.compile(r"(?:^|&& )(?:npmobile|\S*python3? -m npmobile) (.*)$")

# Commands the docs show that a test cannot run offline here, each with the reason and where it is covered.
RUN_ELSEWHERE = {
    "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/python -m npmobile classify samples/chelsea.jpg":
        "installs from PyPI and downloads the ImageNet weights (14 MB); the same classify runs below on --weights none",
    "npmobile build-kernels":
        "compiles every kernel ahead of time (20-45 s, needs a C compiler); tests/test_built_kernels.py runs it",
    "npmobile classify photos/ --weights finetuned.keras --engine ray --workers 2 --out preds.parquet":
        "starts a Ray cluster; tests/test_cluster.py runs classify on real local Ray and Dask clusters",
    "npmobile classify photos/ --engine dask --address tcp://scheduler:8786 --json > preds.json":
        "needs a running Dask scheduler at that address; tests/test_cluster.py starts a local one",
}
# Downloads a command would make, replaced by random weights: the command is otherwise the page's.
DOWNLOADING = ("classify", "show", "profile")


def _shell_commands() -> list[tuple[str, str]]:
    """(page, command) for every npmobile command in a fenced shell block of README.md and docs/*.md,
    comments cut off."""
    found = []
    for page in PAGES:
        for block in SHELL_BLOCK.findall(page.read_text(encoding="utf-8")):
            for line in block.splitlines():
                command = line.split("  #")[0].strip()
                if NPMOBILE_COMMAND.search(command):
                    found.append((page.relative_to(REPO).as_posix(), command))
    return found


def _offline_commands() -> list[tuple[str, str]]:
    return [(page, command) for page, command in _shell_commands() if command not in RUN_ELSEWHERE]


def test_readme_is_short_with_both_first_screen_commands_and_its_links_exist():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    first_screen = text[: text.index("## ")]
    assert ".venv/bin/python -m npmobile classify samples/chelsea.jpg" in first_screen
    assert "<!-- test-command -->" in first_screen and ".venv/bin/python -m pytest -q" in first_screen
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), f"{page.name} links {target}, which does not exist"


def test_no_page_narrates_earlier_runs():
    for page in [*PAGES, REPO / "bench" / "README.md"]:
        text = page.read_text(encoding="utf-8")
        for phrase in ("the run before", "half an hour earlier", "the one before that", "this session",
                       "second session", "third session", "fourth session"):
            assert phrase not in text.lower(), f"{page.name} narrates an earlier run: {phrase!r}"


def test_every_shell_command_in_the_docs_is_run_here_or_says_why_not():
    commands = {command for _, command in _shell_commands()}
    assert set(RUN_ELSEWHERE) <= commands, f"listed but no longer in the docs: {set(RUN_ELSEWHERE) - commands}"
    assert len(_offline_commands()) >= 15


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tutorials, transfer_models):
    """A folder holding every file the docs' commands name, written here: photos, Keras files written by Keras
    (a hand-built tutorial MobileNetV3-Small, TensorFlow's transfer-learning tutorial model), a torchvision-named
    MobileNetV3-Small state dict written by torch, label files."""
    import shutil

    import torch
    from PIL import Image

    from npmobile.applications import torchvision_modules

    root = tmp_path_factory.mktemp("docs_commands")
    (root / "samples").symlink_to(REPO / "samples")
    shutil.copy(REPO / "samples" / "chelsea.jpg", root / "cat.jpg")
    with Image.open(REPO / "samples" / "chelsea.jpg") as photo:
        photo.save(root / "cat.png")
    (root / "photos").mkdir()
    for name in ("chelsea.jpg", "coffee.jpg"):
        shutil.copy(REPO / "samples" / name, root / "photos" / name)
    transfer = transfer_models("tutorial", "keras3_keras").path
    for name in ("tutorial_model.keras", "finetuned.keras"):
        shutil.copy(transfer, root / name)
    shutil.copy(transfer_models("tutorial", "keras3_h5").path, root / "my_model.h5")
    shutil.copy(tutorials("MobileNetV3Small", "tfkeras_h5").path, root / "tutorial_v3_small.h5")
    (root / "cats_dogs.txt").write_text("cat\ndog\n")
    net = torchvision_modules.randomize(torchvision_modules.build("mobilenet_v3_small", num_classes=3), seed=1)
    torch.save(net.state_dict(), root / "best.pth")
    (root / "classes.txt").write_text("ant\nbee\nwasp\n")
    return root


@pytest.mark.parametrize(("page", "command"), _offline_commands(), ids=[c for _, c in _offline_commands()])
def test_docs_command_runs_offline(workspace, page, command):
    """Each command as its page writes it, run from the folder of files the test wrote, with every download
    pointed at a closed port (the official weights replaced by --weights none): exit 0, and any --out written."""
    import os
    import shlex
    import subprocess
    import sys

    args = shlex.split(NPMOBILE_COMMAND.search(command).group(1))
    if args[0] in DOWNLOADING and "--weights" not in args:
        args += ["--weights", "none"]
    env = {**os.environ, "NPMOBILE_AUTO_BUILD": "0", "NPMOBILE_WEIGHTS_DIR": str(workspace / "weights"),
           "KERAS_HOME": str(workspace / "keras"), "NPMOBILE_CACHE_DIR": str(workspace / "cache"),
           "TORCH_HOME": str(workspace / "torch"), "NPMOBILE_WEIGHTS_URL": "http://127.0.0.1:9/"}
    result = subprocess.run([sys.executable, "-m", "npmobile", *args], capture_output=True, text=True,
                            cwd=workspace, env=env, timeout=600)
    assert result.returncode == 0, f"{page}: npmobile {' '.join(args)}: {result.stderr[-800:]}"
    if "--out" in args:
        assert (workspace / args[args.index("--out") + 1]).exists()
