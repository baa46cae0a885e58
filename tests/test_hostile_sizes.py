"""Inputs of unknown size meet the size rules at predict: a model that takes any image size loads (nothing is
known to be too large yet), and once predict knows the size every layer's output, window and the plan's
buffers go through the rules of load time before any buffer exists. Each case runs in a child process under
an address-space limit, so that a regression fails the test instead of filling the machine."""

from __future__ import annotations

import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
# Address space for the process that predicts: enough for npmobile and Numba (about 1 GiB), far below what
# any of these files asks for (6.45 GiB to terabytes).
LIMIT = 3 * 2**30


@pytest.fixture(scope="module")
def unknown_size_files(tmp_path_factory) -> dict[str, Path]:
    """Keras-written .keras models on a (None, None, 3) input."""
    import keras

    folder = tmp_path_factory.mktemp("unknown-size")

    def save(name: str, build) -> Path:
        inputs = keras.Input((None, None, 3))
        path = folder / f"{name}.keras"
        keras.Model(inputs, build(inputs)).save(path)
        return path

    return {
        "padding": save("padding", lambda x: keras.layers.ZeroPadding2D(12000, name="pad")(x)),
        "upsampling": save("upsampling", lambda x: keras.layers.UpSampling2D(3000, name="up")(x)),
        # Each branch passes the per-layer rule at 1x1; the three buffers alive at once do not.
        "branches": save("branches", lambda x: keras.layers.Add(name="sum")([
            keras.layers.UpSampling2D(9000, name="up_a")(x), keras.layers.UpSampling2D(9000, name="up_b")(x)])),
    }


def _limited() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT, hard))


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, preexec_fn=_limited)


PREDICT = """
    import sys
    import numpy as np
    import npmobile
    from npmobile.errors import ModelFileError

    model = npmobile.load_model(sys.argv[1])  # loads: the size is unknown until predict
    for reference in ({references}):
        try:
            model.predict(np.zeros({shape}, np.float32), reference=reference)
        except ModelFileError as error:
            print(error)
        else:
            print("predicted")
"""


@pytest.mark.parametrize("case,layer,references", [
    ("padding", "'pad' (ZeroPadding2D)", "False, True"),
    ("upsampling", "'up' (UpSampling2D)", "False, True"),
    ("branches", "buffers", "False, True"),
])
def test_predict_refuses_sizes_the_rules_refuse_once_the_input_is_known(unknown_size_files, case, layer,
                                                                        references):
    path = unknown_size_files[case]
    shape = (1, 1, 1, 3) if case == "branches" else (1, 32, 32, 3)
    result = _run(["-c", textwrap.dedent(PREDICT.format(references=references, shape=shape)), str(path)])
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert len(lines) == len(references.strip(",").split(",")), result.stdout
    for line in lines:
        assert str(path) in line and layer in line and "refusing it" in line and str(shape) in line, line


def test_an_input_small_enough_still_runs(unknown_size_files):
    # UpSampling2D(3000) of a 1x1 image: 27 M values, within the rules.
    code = PREDICT.format(references="False,", shape=(1, 1, 1, 3)).replace('print("predicted")',
                                                                             'print(model.predict(np.ones('
                                                                             '(1, 1, 1, 3), np.float32)).shape)')
    result = _run(["-c", textwrap.dedent(code), str(unknown_size_files["upsampling"])])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["(1,", "3000,", "3000,", "3)"]


@pytest.mark.parametrize("case,layer", [("padding", "'pad'"), ("upsampling", "'up'")])
def test_the_cli_refuses_in_one_line_and_exits_1(unknown_size_files, case, layer):
    path = unknown_size_files[case]
    result = _run(["-m", "npmobile", "classify", str(SAMPLES / "chelsea.jpg"), "--weights", str(path), "--json"])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "MemoryError" not in result.stderr
    assert len(lines) == 1 and str(path) in lines[0] and layer in lines[0] and "refusing it" in lines[0], lines
