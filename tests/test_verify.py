"""``npmobile verify``: parity as a feature users run. On a good model it finds every layer within the parity
tolerances (exit 0); on a model whose npmobile side differs it names the first layer that does (exit 1); it says
when it could not run (3) and when it was used wrongly (2)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from test_cli import PHOTOS, REPO, run_cli

from npmobile.verify import FEATURE_RTOL, PROBABILITY_ATOL

MAPPED = ["--custom-object", "hard_swish=hard_swish", "--custom-object", "h_sigmoid=hard_sigmoid"]


def _report(result: subprocess.CompletedProcess) -> dict:
    assert result.stdout, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("writer", ["keras3_keras", "tfkeras_h5"])
def test_a_tutorial_model_verifies_within_tolerance(tutorials, writer):
    case = tutorials("MobileNetV3Small", writer)
    result = run_cli("verify", str(case.path), *MAPPED, "--json")
    assert result.returncode == 0, result.stderr
    report = _report(result)
    assert report["ok"] and report["first_layer_beyond_tolerance"] is None
    assert report["reference"] == "Keras"
    assert report["reference_detail"].startswith("tf_keras" if writer == "tfkeras_h5" else "Keras 3")
    assert any("keras.activations.hard_swish" in note for note in report["notes"])  # said so
    names = [row["name"] for row in report["layers"]]
    assert names[:3] == ["rescaling", "stem_conv", "stem_bn"] and names[-1] == "predictions"  # graph order
    assert all(row["ok"] for row in report["layers"]) and len(names) > 50
    assert report["final"]["ok"] and report["final"]["top5_agree"] == "yes"
    assert report["inputs"].startswith("2 random input(s) (64, 64, 3) in 0..255")
    assert set(report["float64"]) == {"npmobile", "Keras"} and max(report["float64"].values()) < PROBABILITY_ATOL


def test_a_wrong_mapping_is_caught_at_the_first_layer_it_changes(tutorials, tmp_path):
    """The user's own functions in Keras (their code, run by verify only) against a mapping that is wrong for
    one of them: verify names the first layer that function feeds."""
    case = tutorials("MobileNetV3Small", "keras3_keras")
    module = tmp_path / "my_activations.py"
    module.write_text(textwrap.dedent("""\
        from keras import ops

        def hard_swish(x):
            return x * ops.relu6(x + 3.0) / 6.0

        def h_sigmoid(x):
            return ops.relu6(x + 3.0) / 6.0
        """))
    right = run_cli("verify", str(case.path), *MAPPED, "--custom-objects-module", str(module), "--json")
    assert right.returncode == 0, right.stderr
    assert any("your code, run only by verify" in note for note in _report(right)["notes"])
    wrong = run_cli("verify", str(case.path), "--custom-object", "hard_swish=relu6", "--custom-object",
                    "h_sigmoid=hard_sigmoid", "--custom-objects-module", str(module))
    assert wrong.returncode == 1, wrong.stderr
    assert "first layer beyond tolerance: stem_act" in wrong.stdout
    assert "verdict: BEYOND tolerance (exit 1)" in wrong.stdout


def test_an_altered_weight_is_named_as_the_first_bad_layer(keras_files, monkeypatch, capsys):
    """A weight changed on npmobile's side only (in process): the layer holding it is the first one beyond."""
    import npmobile
    from npmobile.cli import main

    case = keras_files.get("MobileNetV2", "keras3_keras", input_shape=(96, 96, 3), alpha=0.35)
    load = npmobile.load_model

    def altered(path, **options):
        model = load(path, **options)
        kernel = model.graph.node("block_3_depthwise").weights["depthwise_kernel"]
        kernel[1, 1, 0, 0] += 0.05
        return model

    monkeypatch.setattr(npmobile, "load_model", altered)
    assert main(["verify", str(case.path), "--samples", "1", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["first_layer_beyond_tolerance"] == "block_3_depthwise"
    names = [row["name"] for row in report["layers"]]
    assert all(row["ok"] for row in report["layers"][: names.index("block_3_depthwise")])


def test_images_and_text_output_on_a_keras_applications_file(keras_files):
    case = keras_files.get("MobileNetV2", "keras3_keras", input_shape=(96, 96, 3), alpha=0.35)
    result = run_cli("verify", str(case.path), *map(str, PHOTOS), "--all")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "inputs: 2 image(s), preprocessed to -1..1" in out and "more layers" not in out  # --all: every layer
    assert "block_3_depthwise" in out and "first layer beyond tolerance: none" in out
    assert "top-5 agree: yes" in out and "verdict: within tolerance (exit 0)" in out


def test_without_keras_it_compares_the_fast_path_with_the_reference_path(tutorials):
    case = tutorials("MobileNetV2", "keras3_h5")
    result = run_cli("verify", str(case.path), "--custom-object", "relu6=relu6", "--without-keras", "--json")
    assert result.returncode == 0, result.stderr
    report = _report(result)
    assert report["reference"] == "npmobile reference" and "Keras not used" in report["reference_detail"]
    assert report["ok"]


def test_usage_errors_exit_2_and_what_could_not_run_exits_3(tutorials, tmp_path):
    case = tutorials("MobileNetV3Small", "keras3_keras")
    assert run_cli("verify", str(case.path), "--custom-object", "hard_swish").returncode == 2
    result = run_cli("verify", str(case.path), "--custom-object", "hard_swish=gelu", "--custom-object",
                     "h_sigmoid=hard_sigmoid")
    assert result.returncode == 2 and "not a built-in activation npmobile knows" in result.stderr
    result = run_cli("verify", str(case.path), *MAPPED, "--custom-objects-module", str(tmp_path / "none.py"))
    assert result.returncode == 2 and "no such file" in result.stderr
    unmapped = run_cli("verify", str(case.path))
    assert unmapped.returncode == 3 and "--custom-object hard_swish=hard_swish" in unmapped.stderr
    not_keras = tmp_path / "weights.pth"
    not_keras.write_bytes(b"\x80\x02}q\x00.")
    result = run_cli("verify", str(not_keras))
    assert result.returncode == 3 and "could not run" in result.stderr and "a Python pickle" in result.stderr


def test_the_engine_never_imports_tensorflow_or_keras(tutorials):
    """Only ``verify`` imports Keras (or PyTorch): loading, predicting (reference and float64 too) and the other
    commands leave TensorFlow and torch out of the process."""
    case = tutorials("MobileNetV3Small", "keras3_keras")
    code = textwrap.dedent(f"""\
        import sys
        import numpy as np
        import npmobile
        from npmobile.cli import build_parser
        build_parser()
        model = npmobile.load_model({str(case.path)!r}, custom_objects={{"hard_swish": "hard_swish",
                                                                        "h_sigmoid": "hard_sigmoid"}})
        x = np.zeros((1, 64, 64, 3), np.float32)
        model.predict(x); model.predict(x, reference=True, dtype=np.float64)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "tf_keras", "torch"))
        assert not loaded, loaded
        """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr


def test_without_keras_installed_it_says_so_and_checks_the_fast_path(tutorials):
    case = tutorials("MobileNet", "keras3_keras")
    code = textwrap.dedent(f"""\
        import sys
        sys.modules["keras"] = None  # as if Keras were not installed: importing it raises ImportError
        from npmobile.cli import main
        sys.exit(main(["verify", {str(case.path)!r}, "--custom-object", "relu6=relu6", "--samples", "1"]))
        """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Keras is not importable in this Python" in result.stdout
    assert "verdict: within tolerance (exit 0)" in result.stdout


@pytest.mark.parametrize("writer", ["keras3_keras", "tfkeras_h5"])
def test_a_nested_backbone_is_compared_layer_by_layer_too(keras_files, writer):
    from keras_files import NESTED

    case = keras_files.get(NESTED, writer, input_shape=(128, 128, 3), alpha=0.35)
    result = run_cli("verify", str(case.path), "--samples", "1", "--json")
    assert result.returncode == 0, result.stderr
    report = _report(result)
    names = [row["name"] for row in report["layers"]]
    backbone = case.keras_model.layers[1].name
    assert names.index("Conv1") < names.index("block_3_depthwise") < names.index(backbone) < names.index("head")
    assert report["ok"] and not report["skipped_layers"]


# --------------------------------------------------------------------------------------------------
# PyTorch state dicts: checked against PyTorch itself
# --------------------------------------------------------------------------------------------------

REPORT_FIELDS = {"model", "model_name", "writer", "inputs", "reference", "reference_detail", "notes", "layers",
                 "skipped_layers", "first_layer_beyond_tolerance", "final", "float64", "ok"}
# A tutorial's MobileNetV3-Small written with nn.BatchNorm2d(c): PyTorch's default epsilon 1e-5 where torchvision
# uses 1e-3. Its state dict has torchvision's names and shapes, so npmobile reads it as torchvision's V3-Small.
TUTORIAL_V3 = textwrap.dedent("""\
    from torch import nn

    from npmobile.applications import torchvision_modules


    def build(eps={eps}):
        model = torchvision_modules.build("mobilenet_v3_small")
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eps = eps
        return model
    """)


@pytest.fixture(scope="module")
def state_dicts(tmp_path_factory):
    """torchvision-named models with random weights and BatchNorm statistics, saved by torch: (arch, format) ->
    path."""
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    from npmobile.applications import torchvision_modules as tvm

    folder = tmp_path_factory.mktemp("state_dicts")
    saved = {}
    for seed, (arch, options) in enumerate([("mobilenet_v2", {"width_mult": 0.5}), ("mobilenet_v3_small", {})]):
        state = tvm.randomize(tvm.build(arch, **options), seed).state_dict()
        saved[arch, "pth"] = folder / f"{arch}.pth"
        torch.save(state, saved[arch, "pth"])
        saved[arch, "safetensors"] = folder / f"{arch}.safetensors"
        safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()}, saved[arch, "safetensors"])
    return saved


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
@pytest.mark.parametrize("arch", ["mobilenet_v2", "mobilenet_v3_small"])
def test_a_pytorch_state_dict_verifies_against_pytorch_module_by_module(state_dicts, arch, fmt, capsys):
    from npmobile.cli import main

    path = state_dicts[arch, fmt]
    assert main(["verify", str(path), "--size", "64", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == REPORT_FIELDS and report["ok"] and report["first_layer_beyond_tolerance"] is None
    assert report["reference"] == "PyTorch" and report["reference_detail"].startswith("PyTorch 2.")
    loader = "safetensors.torch.load_file" if fmt == "safetensors" else "torch.load(weights_only=True)"
    assert f"torchvision's {arch}(" in report["reference_detail"] and loader in report["reference_detail"]
    assert report["inputs"].startswith("2 random input(s) (3, 64, 64) (pixels 0..1 normalized")
    rows = {row["name"]: row for row in report["layers"]}
    names = list(rows)
    # Graph order by module path, a block after the layers inside it, shapes in PyTorch's NCHW.
    assert names[:4] == ["features.0.0", "features.0.1", "features.0.2", "features.0"]
    assert names.index("features.1") < names.index("features.2") < names.index("features") < len(names) - 1
    assert names[-1] == "classifier" and rows["features.0.0"]["shape"] == [16, 32, 32]
    assert not report["skipped_layers"] and len(rows) > 100  # every module, down to each conv and BatchNorm
    assert all(row["ok"] and row["max_abs"] <= row["tolerance"] for row in report["layers"])
    assert report["final"]["ok"] and report["final"]["top5_agree"] == "yes"
    assert report["final"]["rel"] <= FEATURE_RTOL  # the logits: 1e-4 x max(1, max|torch|), as tests/test_torch.py
    assert set(report["float64"]) == {"npmobile", "PyTorch"} and max(report["float64"].values()) < FEATURE_RTOL


def test_a_model_that_differs_from_torchvision_is_caught_at_its_first_batchnorm(state_dicts, tmp_path):
    """The user's own PyTorch module (--torch-model): with torchvision's epsilon it verifies; a tutorial's
    nn.BatchNorm2d default (1e-5) computes something npmobile, reading torchvision's V3-Small, does not, and
    verify names the first layer where that shows."""
    torch = pytest.importorskip("torch")
    from npmobile.applications import torchvision_modules as tvm

    right, tutorial = tmp_path / "right.py", tmp_path / "tutorial.py"
    right.write_text(TUTORIAL_V3.format(eps=1e-3))
    tutorial.write_text(TUTORIAL_V3.format(eps=1e-5))
    model = tvm.randomize(tvm.build("mobilenet_v3_small"), seed=3)
    path = tmp_path / "best.pth"
    torch.save(model.state_dict(), path)
    ok = run_cli("verify", str(path), "--torch-model", f"{right}:build", "--size", "64", "--samples", "1", "--json")
    assert ok.returncode == 0, ok.stderr
    assert "your right.py:build() (your code, run only by verify)" in _report(ok)["reference_detail"]
    wrong = run_cli("verify", str(path), "--torch-model", f"{tutorial}:build", "--size", "64", "--samples", "1")
    assert wrong.returncode == 1, wrong.stderr
    assert "first layer beyond tolerance: features.0.1 " in wrong.stdout  # the stem's BatchNorm
    assert "verdict: BEYOND tolerance (exit 1)" in wrong.stdout
    before = wrong.stdout.split("\nfeatures.0.1 ")[0].splitlines()[-1]
    assert before.startswith("features.0.0 ") and " ok " in before  # the conv before it agrees


def test_a_training_checkpoint_with_dataparallel_prefixes_verifies(tmp_path, capsys):
    """What torch.load gives for a checkpoint is unwrapped on the PyTorch side as npmobile's reader unwraps it."""
    torch = pytest.importorskip("torch")
    from npmobile.applications import torchvision_modules as tvm
    from npmobile.cli import main

    model = tvm.randomize(tvm.build("mobilenet_v3_small", num_classes=10, reduced_tail=True), seed=5)
    path = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 3, "model_state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
                "optimizer_state_dict": torch.optim.SGD(model.parameters(), lr=0.1).state_dict()}, path)
    assert main(["verify", str(path), "--size", "48", "--samples", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "mobilenet_v3_small(num_classes=10, width_mult=1.0, reduced_tail=True)" in report["reference_detail"]
    assert report["ok"] and report["layers"][-1]["shape"] == [10]


def test_without_pytorch_a_state_dict_cannot_be_verified_exit_3(state_dicts):
    code = textwrap.dedent(f"""\
        import sys
        sys.modules["torch"] = None  # as if PyTorch were not installed: importing it raises ImportError
        from npmobile.cli import main
        sys.exit(main(["verify", {str(state_dicts["mobilenet_v3_small", "pth"])!r}]))
        """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 3 and not result.stdout
    assert result.stderr.count("\n") == 1 and "pip install torch" in result.stderr, result.stderr


def test_options_of_the_other_framework_are_usage_errors(state_dicts, tmp_path, capsys):
    from npmobile.cli import main

    path = str(state_dicts["mobilenet_v3_small", "pth"])
    assert main(["verify", path, "--custom-object", "hard_swish=hard_swish"]) == 2
    assert "a PyTorch state dict: --custom-object is for Keras files" in capsys.readouterr().err
    assert main(["verify", path, "--torch-model", "no_colon.py"]) == 2
    assert "expected FILE.py:NAME" in capsys.readouterr().err
    not_torch = tmp_path / "model.h5"
    not_torch.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
    assert main(["verify", str(not_torch), "--torch-model", "net.py:build"]) == 2
    assert "--torch-model is for .pth / .safetensors files" in capsys.readouterr().err


def test_a_torch_model_that_cannot_take_the_file_could_not_run(state_dicts, tmp_path, capsys):
    """PyTorch's own refusal (load_state_dict strict) or the user's module failing: exit 3, one line, PyTorch's
    words kept."""
    pytest.importorskip("torch")
    from npmobile.cli import main

    module = tmp_path / "nets.py"
    module.write_text(textwrap.dedent("""\
        import torch
        from npmobile.applications import torchvision_modules

        def v2():
            return torchvision_modules.build("mobilenet_v2")

        def pair():
            model = torchvision_modules.build("mobilenet_v3_small")
            model.forward = lambda x: (x, x)
            return model

        def broken():
            raise RuntimeError("no GPU here")
        """))
    path = str(state_dicts["mobilenet_v3_small", "pth"])
    for name, said in (("v2", "PyTorch could not load"), ("pair", "returned a tuple, not one tensor of logits"),
                       ("broken", "broken() failed (RuntimeError: no GPU here)"), ("absent", "no class or function")):
        assert main(["verify", path, "--torch-model", f"{module}:{name}", "--size", "32", "--samples", "1"]) == 3
        err = capsys.readouterr().err
        assert said in err and err.count("\n") == 1, err


def _layer_row(name: str, max_abs: float, ok: bool = True) -> dict:
    return {"name": name, "class": "Conv2D", "max_abs": max_abs, "rel": max_abs, "tolerance": 1e-4, "ok": ok,
            "npmobile_vs_float64": 1e-7, "reference_vs_float64": 1e-7}


def test_the_text_listing_shows_ends_problems_and_counts_the_rest():
    """The default listing (the README shows one): the first 4 and last 3 layers, every layer beyond tolerance
    and the closest to it, the others counted in place; --all lists them all."""
    from npmobile.cli.verify import report_text

    def listing(rows: list[dict], all_layers: bool = False) -> list[str]:
        report = {"model": "m.h5", "model_name": "m", "writer": "Keras 3", "inputs": "1 image(s)",
                  "reference": "Keras", "reference_detail": "Keras 3", "notes": [], "layers": rows,
                  "skipped_layers": [], "first_layer_beyond_tolerance": next(
                      (r["name"] for r in rows if not r["ok"]), None), "ok": all(r["ok"] for r in rows),
                  "float64": {"npmobile": 1e-7, "Keras": 1e-7},
                  "final": {"path": "predict", "max_abs": 1e-7, "rel": 1e-7, "tolerance": 5e-5, "ok": True,
                            "top5_agree": "yes"}}
        return [" ".join(line.split()[:2]) if line.startswith("…") else line.split()[0]
                for line in report_text(report, all_layers).splitlines() if line.startswith(("layer_", "…"))]

    rows = [_layer_row(f"layer_{k}", 1e-7) for k in range(20)]
    rows[8] = _layer_row("layer_8", 5e-5)  # the closest to its tolerance
    assert listing(rows) == ["layer_0", "layer_1", "layer_2", "layer_3", "… (4", "layer_8", "… (8",
                             "layer_17", "layer_18", "layer_19"]
    rows[12] = _layer_row("layer_12", 3e-4, ok=False)  # beyond: shown (and now the worst)
    assert listing(rows) == ["layer_0", "layer_1", "layer_2", "layer_3", "… (8", "layer_12", "… (4",
                             "layer_17", "layer_18", "layer_19"]
    assert listing(rows, all_layers=True) == [f"layer_{k}" for k in range(20)]
