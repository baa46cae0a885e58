"""`python -m npmobile classify` end to end, in a subprocess, on real photos, against Keras's own
pipeline (load_img + preprocess_input + predict + decode_predictions) on the same files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
PHOTOS = [REPO / "samples" / "chelsea.jpg", REPO / "samples" / "coffee.jpg"]
LABELS = REPO / "npmobile" / "data" / "imagenet_class_index.json"


def run_cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "npmobile", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=REPO)


def keras_top5(case, module, paths: list[Path], size: int) -> list[list[tuple[str, str]]]:
    """What Keras's own pipeline says for these files, with the same model."""
    import keras

    keras.src.applications.imagenet_utils.CLASS_INDEX = json.loads(LABELS.read_text())  # offline
    batch = np.stack([keras.utils.img_to_array(keras.utils.load_img(p, target_size=(size, size))) for p in paths])
    probs = case.keras_model.predict(module.preprocess_input(batch), verbose=0)
    return [[(wnid, label) for wnid, label, _ in row] for row in module.decode_predictions(probs, top=5)]


@pytest.mark.parametrize(
    "family,cli_model,module_name",
    [("MobileNetV2", "mobilenet_v2", "mobilenet_v2"), ("MobileNetV3Small", "mobilenet_v3_small", "mobilenet_v3")],
)
def test_classify_agrees_with_keras_pipeline_on_photos(keras_files, family, cli_model, module_name):
    import keras

    case = keras_files.get(family, "official_h5", input_shape=(224, 224, 3))
    expected = keras_top5(case, getattr(keras.applications, module_name), PHOTOS, 224)
    result = run_cli("classify", *map(str, PHOTOS), "--model", cli_model, "--weights", str(case.path), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [entry["path"] for entry in report] == [str(p) for p in PHOTOS]
    for entry, keras_top in zip(report, expected):
        assert [(t["wnid"], t["label"]) for t in entry["top"]] == keras_top
        assert [t["rank"] for t in entry["top"]] == [1, 2, 3, 4, 5]
        probabilities = [t["probability"] for t in entry["top"]]
        assert probabilities == sorted(probabilities, reverse=True)


def test_text_output_lists_rank_label_wnid_probability(keras_files):
    case = keras_files.get("MobileNetV2", "keras3_keras", input_shape=(96, 96, 3), alpha=0.35)
    result = run_cli("classify", str(PHOTOS[0]), "--weights", str(case.path), "--top", "3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == str(PHOTOS[0])
    assert len(lines) == 4
    rank, label, wnid, probability = lines[1].split()
    assert rank == "1." and wnid.startswith("n") and 0 < float(probability) <= 1 and label


def test_folder_run_reports_a_bad_image_and_classifies_the_rest(keras_files, tmp_path):
    case = keras_files.get("MobileNetV2", "keras3_keras", input_shape=(96, 96, 3), alpha=0.35)
    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in PHOTOS:
        (folder / photo.name).write_bytes(photo.read_bytes())
    (folder / "broken.jpg").write_bytes(PHOTOS[0].read_bytes()[:200])
    (folder / "notes.txt").write_text("not an image: not even looked at")
    result = run_cli("classify", str(folder), "--weights", str(case.path), "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert sorted(Path(e["path"]).name for e in report if "top" in e) == sorted(p.name for p in PHOTOS)
    assert [Path(e["path"]).name for e in report if "error" in e] == ["broken.jpg"]
    # (On a cold Numba cache the run also says it is compiling: a notice, not an error.)
    errors = [line for line in result.stderr.splitlines() if line.strip() and "compiling kernels" not in line]
    assert len(errors) == 1 and "broken.jpg" in errors[0] and "Traceback" not in result.stderr


def test_offline_imagenet_says_which_file_to_put_where(tmp_path):
    env = {"NPMOBILE_WEIGHTS_DIR": str(tmp_path / "weights"), "KERAS_HOME": str(tmp_path / "keras"),
           "NPMOBILE_CACHE_DIR": str(tmp_path / "cache"), "NPMOBILE_WEIGHTS_URL": "http://127.0.0.1:9/"}
    result = run_cli("classify", str(PHOTOS[0]), env=env)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5" in lines[0]


@pytest.mark.parametrize(
    "args,code",
    [(["classify"], 2), (["classify", "x.jpg", "--top", "0"], 2), (["classify", "x.jpg", "--model", "resnet"], 2),
     (["classify", "missing.jpg", "--weights", "missing.h5"], 1)],
    ids=["no-image", "top-0", "unknown-model", "missing-weights"],
)
def test_usage_errors_exit_2_and_failures_exit_1(args, code):
    result = run_cli(*args)
    assert result.returncode == code
    assert "Traceback" not in result.stderr and result.stderr.strip()


def test_help_explains_with_examples():
    result = run_cli("classify", "--help")
    assert result.returncode == 0
    for text in ("--json", "--top", "--weights", "examples:", "exit status"):
        assert text in result.stdout


def test_debug_shows_the_traceback(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not a model")
    result = run_cli("--debug", "summary", str(bad))
    assert result.returncode != 0 and "Traceback" in result.stderr
    plain = run_cli("summary", str(bad))
    assert plain.returncode == 1 and "Traceback" not in plain.stderr and str(bad) in plain.stderr


def test_weights_file_of_another_architecture_says_what_the_api_says(keras_files):
    case = keras_files.get("MobileNetV2", "official_h5", input_shape=(96, 96, 3), alpha=0.35)
    result = run_cli("classify", str(PHOTOS[0]), "--model", "mobilenet_v3_small", "--weights", str(case.path))
    assert result.returncode == 1
    assert "holds weights for 105 layers, the architecture 'MobileNetV3Small' has 88 layers with weights" in \
        result.stderr
    assert "no architecture" not in result.stderr


def test_a_pytorch_file_given_as_weights_is_read_as_one(tmp_path):
    """PyTorch state dicts load (tests/test_torch.py); one without tensors, or cut short, fails in one line
    that says what it is, never as a broken Keras file."""
    import zipfile

    path = tmp_path / "model.pth"
    with zipfile.ZipFile(path, "w") as archive:  # the layout torch.save writes
        archive.writestr("model/data.pkl", b"\x80\x02}q\x00.")
        archive.writestr("model/version", "3\n")
        archive.writestr("model/data/0", b"\0" * 16)
    result = run_cli("classify", str(PHOTOS[0]), "--weights", str(path))
    assert result.returncode == 1 and "holds no tensors" in result.stderr
    assert "config.json" not in result.stderr
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19.")  # torch's legacy pickle format, cut short
    result = run_cli("classify", str(PHOTOS[0]), "--weights", str(legacy))
    assert result.returncode == 1 and "the pickle is corrupt" in result.stderr and "config.json" not in result.stderr


def test_the_compile_notice_asks_for_the_kernels_the_plan_compiles():
    """The "compiling kernels" notice asks kernels_cached about what each step's record says it compiles: the
    squeeze-excite kernel only for a plan that has one (V1's head pools with keepdims, and has none), the
    rescaled input only where a Rescaling is folded into the stem (V3's)."""
    from npmobile import applications
    from npmobile.cli.models import first_run_kernels

    v1 = first_run_kernels(applications.MobileNet(weights=None, input_shape=(128, 128, 3)))
    assert v1 == {"depthwise_sizes": (3,), "squeeze_excite": False, "rescaled_input": False,
                  "expand_depthwise_sizes": ()}
    v3 = first_run_kernels(applications.MobileNetV3Large(weights=None, input_shape=(128, 128, 3)))
    assert v3["squeeze_excite"] and v3["rescaled_input"]
    assert {*v3["depthwise_sizes"], *v3["expand_depthwise_sizes"]} == {3, 5}


def test_custom_object_option_maps_a_tutorial_function(tutorials):
    case = tutorials("MobileNetV3Small", "keras3_keras")
    refused = run_cli("summary", str(case.path))
    assert refused.returncode == 1 and "--custom-object hard_swish=hard_swish" in refused.stderr
    mapped = ["--custom-object", "hard_swish=hard_swish", "--custom-object", "h_sigmoid=hard_sigmoid"]
    result = run_cli("summary", str(case.path), *mapped)
    assert result.returncode == 0, result.stderr
    assert "block4_se_mul (Multiply)" in result.stdout
    result = run_cli("classify", str(PHOTOS[0]), "--weights", str(case.path), "--json", *mapped)
    assert result.returncode == 0, result.stderr
    assert [t["label"] for t in json.loads(result.stdout)[0]["top"]][0].startswith("class ")
    assert run_cli("summary", str(case.path), "--custom-object", "hard_swish").returncode == 2
