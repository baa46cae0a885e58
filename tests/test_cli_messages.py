"""What a user sees from the command line and the API when something is off (issue 25, points 5-9): folder runs
in order and streamed, --out checked before the work and kept on Ctrl-C, one actionable line per mistake."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from npmobile import cli
from npmobile.batch import BatchClassifier
from npmobile.cli import classify

REPO = Path(__file__).resolve().parents[1]
CAT, COFFEE = str(REPO / "samples" / "chelsea.jpg"), str(REPO / "samples" / "coffee.jpg")
SMALL = ["--weights", "none", "--size", "96", "--top", "1"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def printed_paths(out: str) -> list[str]:
    """The image paths of a text report, in the order printed (lines that do not start with a space)."""
    return [line for line in out.splitlines() if line and not line.startswith(" ") and " classified, " not in line]


@pytest.fixture
def broken(tmp_path) -> str:
    path = tmp_path / "broken.jpg"
    path.write_bytes(Path(CAT).read_bytes()[:200])
    return str(path)


@pytest.fixture
def calls(monkeypatch):
    """Run a hook before each batch is classified: ``calls.before[k] = fn`` runs before batch k (0-based)."""

    class Hooks:
        before: dict = {}
        count = 0

    hooks = Hooks()
    hooks.before = {}
    original = BatchClassifier.__call__

    def wrapped(self, paths, data=None):
        hook = hooks.before.get(hooks.count)
        hooks.count += 1
        if hook is not None:
            hook()
        return original(self, paths, data)

    monkeypatch.setattr(BatchClassifier, "__call__", wrapped)
    monkeypatch.setattr(classify, "BATCH", 1)  # one image per batch: every image is a batch boundary
    return hooks


# --------------------------------------------------------------------------------------------------
# 5. --out's needs are checked before the first image
# --------------------------------------------------------------------------------------------------


def test_parquet_without_pyarrow_fails_before_the_first_image(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setattr(classify, "classified_batches", lambda *a: pytest.fail("classified before checking --out"))
    out = tmp_path / "preds.parquet"
    code, _, err = run(capsys, "classify", CAT, *SMALL, "--out", str(out))
    assert code == 1 and err.count("\n") == 1
    assert "preds.parquet: writing Parquet needs pyarrow" in err and not out.exists()


# --------------------------------------------------------------------------------------------------
# 6. A whole-model file and --model/--size/--alpha
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def whole_model(keras_files) -> str:
    return str(keras_files.get("MobileNetV2", "keras3_keras", input_shape=(96, 96, 3), alpha=0.35).path)


@pytest.mark.parametrize("option,says", [(["--model", "mobilenet_v3_small"], "--model does not apply"),
                                         (["--alpha", "0.5"], "--alpha does not apply"),
                                         (["--size", "160"], "takes 96x96 images: --size 160 contradicts it")])
def test_whole_model_file_refuses_a_contradicting_option(capsys, whole_model, option, says):
    code, out, err = run(capsys, "classify", CAT, "--weights", whole_model, *option)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert says in err and whole_model in err


def test_whole_model_file_accepts_its_own_size(capsys, whole_model):
    code, out, _ = run(capsys, "classify", CAT, "--weights", whole_model, "--size", "96", "--top", "1")
    assert code == 0 and out.startswith(CAT)


def test_size_applies_to_a_whole_model_that_takes_any_size(capsys, tmp_path):
    import keras

    inputs = keras.Input((None, None, 3))
    outputs = keras.layers.DepthwiseConv2D(3, strides=2, padding="same", name="dw")(inputs)
    path = tmp_path / "any_size.keras"
    keras.Model(inputs, outputs).save(path)
    code, out, _ = run(capsys, "show", CAT, "--weights", str(path), "--size", "64", "--layer", "dw",
                       "--out", str(tmp_path / "maps.png"))
    assert code == 0 and "3 of 3 feature maps, 32x32 each" in out


# --------------------------------------------------------------------------------------------------
# 7. Folder runs
# --------------------------------------------------------------------------------------------------


def test_duplicates_come_back_in_the_order_given(capsys):
    code, out, _ = run(capsys, "classify", COFFEE, CAT, COFFEE, *SMALL)
    assert code == 0
    assert printed_paths(out) == [COFFEE, CAT, COFFEE]


def test_text_mode_lists_failed_images_in_place_and_counts(capsys, broken):
    code, out, err = run(capsys, "classify", CAT, broken, COFFEE, *SMALL)
    assert code == 1
    assert printed_paths(out) == [CAT, broken, COFFEE]
    lines = out.splitlines()
    assert lines[lines.index(broken) + 1].startswith(f"  failed: {broken}:")
    assert lines[-1] == "2 classified, 1 failed" and err == ""


def test_text_results_are_printed_before_the_next_batch_is_classified(capsys, calls):
    seen: list[str] = []

    def first_is_out():
        seen.append(capsys.readouterr().out)

    calls.before[1] = first_is_out
    code, out, _ = run(capsys, "classify", CAT, COFFEE, *SMALL)
    assert code == 0
    assert printed_paths(seen[0]) == [CAT]  # the first result, before the second image was classified
    assert printed_paths(out) == [COFFEE]


def test_json_is_one_document_with_failures_and_no_count_line(capsys, broken):
    code, out, _ = run(capsys, "classify", CAT, broken, CAT, *SMALL, "--json")
    assert code == 1
    report = json.loads(out)  # the whole of stdout
    assert [r["path"] for r in report] == [CAT, broken, CAT]
    assert "error" in report[1] and "top" in report[2]


def test_out_rows_are_written_as_batches_finish(capsys, calls, tmp_path):
    out = tmp_path / "preds.jsonl"
    written: list[int] = []
    calls.before[1] = lambda: written.append(len(out.read_text().splitlines()))
    code, stdout, _ = run(capsys, "classify", CAT, COFFEE, *SMALL, "--out", str(out))
    assert code == 0 and written == [1]
    assert [json.loads(line)["path"] for line in out.read_text().splitlines()] == [CAT, COFFEE]
    assert stdout.strip() == "2 classified, 0 failed"


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_ctrl_c_exits_130_in_one_line_keeping_what_out_wrote(capsys, calls, tmp_path, suffix):
    out = tmp_path / f"preds{suffix}"

    def interrupt():
        raise KeyboardInterrupt

    calls.before[2] = interrupt
    code, _, err = run(capsys, "classify", CAT, COFFEE, CAT, COFFEE, *SMALL, "--out", str(out))
    assert code == 130 and err.count("\n") == 1
    assert "interrupted after 2 of 4 images" in err and f"{out} holds the first 2" in err
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    else:
        import pyarrow.parquet as pq

        rows = pq.read_table(out).to_pylist()  # a whole Parquet file: closed on the way out
    assert [r["path"] for r in rows] == [CAT, COFFEE]


def test_existing_out_is_kept_unless_overwrite(capsys, tmp_path):
    out = tmp_path / "preds.jsonl"
    out.write_text("precious\n")
    code, _, err = run(capsys, "classify", CAT, *SMALL, "--out", str(out))
    assert code == 2 and "exists: add --overwrite" in err and out.read_text() == "precious\n"
    code, _, _ = run(capsys, "classify", CAT, *SMALL, "--out", str(out), "--overwrite")
    assert code == 0 and json.loads(out.read_text())["path"] == CAT


def test_paths_from_a_file_and_from_standard_input(capsys, monkeypatch, tmp_path):
    listing = tmp_path / "paths.txt"
    listing.write_text(f"{COFFEE}\n\n{CAT}\n")
    code, out, _ = run(capsys, "classify", "--from-file", str(listing), *SMALL)
    assert code == 0 and printed_paths(out) == [COFFEE, CAT]
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{CAT}\n{CAT}\n"))
    code, out, _ = run(capsys, "classify", COFFEE, "--from-file", "-", *SMALL)
    assert code == 0 and printed_paths(out) == [COFFEE, CAT, CAT]


# --------------------------------------------------------------------------------------------------
# 8. Pipes and the Python API
# --------------------------------------------------------------------------------------------------


def test_a_closed_pipe_ends_quietly(tmp_path):
    """`npmobile classify ... | head -1`: the reader goes away after one line; no BrokenPipeError traceback."""
    listing = tmp_path / "many.txt"
    listing.write_text("\n".join([CAT] * 400))  # ~100 KB of text: more than a pipe holds
    env = {**os.environ, "NPMOBILE_AUTO_BUILD": "0"}
    process = subprocess.Popen([sys.executable, "-m", "npmobile", "classify", "--from-file", str(listing), *SMALL],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=env)
    first = process.stdout.readline()
    process.stdout.close()
    err = process.stderr.read().decode()
    code = process.wait(timeout=300)
    assert first.decode().strip() == CAT
    assert "Traceback" not in err and "BrokenPipeError" not in err and err.strip() == ""
    assert code == 141


@pytest.fixture(scope="module")
def small_model():
    from npmobile import applications

    return applications.MobileNetV2(weights=None, input_shape=(96, 96, 3), alpha=0.35)


def test_predict_takes_one_output_name_as_a_string(small_model):
    x = np.zeros((2, 96, 96, 3), np.float32)
    one = small_model.predict(x, outputs="out_relu")
    assert np.array_equal(one, small_model.predict(x, outputs=["out_relu"])["out_relu"])
    assert one.shape == (2, 3, 3, 1280)


def test_predict_on_an_empty_batch_says_so(small_model):
    from npmobile.errors import InputShapeError

    with pytest.raises(InputShapeError, match=r"empty batch \(0, 96, 96, 3\): give at least one image"):
        small_model.predict(np.zeros((0, 96, 96, 3), np.float32))


def test_predict_on_a_list_of_images_says_to_stack_them(small_model):
    from npmobile.errors import InputShapeError

    images = [np.zeros((96, 96, 3), np.float32)] * 2
    with pytest.raises(InputShapeError, match=r"got a list of 2 images: stack them first, predict\(np.stack"):
        small_model.predict(images)


# --------------------------------------------------------------------------------------------------
# 9. CLI messages
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,closest", [("mobilenetv2", "did you mean mobilenet_v2"), ("mobilenet_v4", "")])
def test_summary_of_an_unknown_family_names_the_families(capsys, name, closest):
    code, _, err = run(capsys, "summary", name)
    assert code == 2 and err.count("\n") == 1
    assert "not a model family npmobile builds (mobilenet, mobilenet_v2, mobilenet_v3_small" in err
    assert closest in err


def test_weights_given_a_directory_says_so(capsys, tmp_path):
    code, _, err = run(capsys, "classify", CAT, "--weights", str(tmp_path))
    assert code == 1 and err.count("\n") == 1 and f"{tmp_path}: is a directory" in err


def test_folder_with_images_only_in_subfolders_offers_recursive(capsys, tmp_path):
    (tmp_path / "photos" / "cats").mkdir(parents=True)
    (tmp_path / "photos" / "cats" / "a.jpg").write_bytes(Path(CAT).read_bytes())
    folder = str(tmp_path / "photos")
    code, _, err = run(capsys, "classify", folder, *SMALL)
    assert code == 1 and err.count("\n") == 1
    assert "not searched recursively; 1 image in subfolders: add --recursive" in err
    code, out, _ = run(capsys, "classify", folder, "--recursive", *SMALL)
    assert code == 0 and printed_paths(out) == [str(tmp_path / "photos" / "cats" / "a.jpg")]


def test_a_plain_pickle_named_pth_is_called_a_pickle_not_a_pytorch_file(capsys, tmp_path):
    path = tmp_path / "best.pth"
    path.write_bytes(pickle.dumps({"weights": [1.0, 2.0]}))
    code, _, err = run(capsys, "summary", str(path))
    assert code == 1 and err.count("\n") == 1
    assert "a Python pickle written by pickle.dump, not a PyTorch file" in err and "torch.save" in err


@pytest.mark.parametrize("argv,says", [(["--workers", "2"], "--workers need --engine"),
                                       (["--output", "features"], "--output features needs --json or --out")])
def test_option_combinations_that_cannot_work_exit_2(capsys, argv, says):
    code, out, err = run(capsys, "classify", CAT, *SMALL, *argv)
    assert code == 2 and out == "" and says in err and err.count("\n") == 1


def test_plain_summary_keeps_long_layer_names_apart_from_the_shape_column(capsys, tmp_path):
    import keras

    inputs = keras.Input((8, 8, 3))
    name = "a_very_long_layer_name_for_a_depthwise_convolution_in_block_12"
    outputs = keras.layers.DepthwiseConv2D(3, name=name)(inputs)
    path = tmp_path / "long.keras"
    keras.Model(inputs, outputs).save(path)
    code, out, _ = run(capsys, "summary", str(path))
    assert code == 0
    header = next(line for line in out.splitlines() if line.startswith("Layer (type)"))
    row = next(line for line in out.splitlines() if line.startswith(name))
    label = f"{name} (DepthwiseConv2D)"
    assert row.index("(None") == header.index("Output Shape") > len(label)
