"""PyTorch state dicts on npmobile, checked against PyTorch itself (torch==2.13.0, the test extra).

torchvision-named MobileNetV2 / V3 (npmobile/applications/torchvision_modules.py) with random weights and BatchNorm
statistics far from the identity, saved the ways PyTorch users save them (.pth zip, legacy .pth,
.safetensors, a training checkpoint); npmobile reads them without torch and must give PyTorch's logits
within 1e-4 x max(1, max|reference|) and the same top-5, and PyTorch's intermediate outputs by module path.
Hostile pickles must never run anything.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import npmobile
from npmobile.applications import torchvision as tv
from npmobile.errors import ModelFileError, WeightsError
from npmobile.io.torch import read_state_dict, torch_format
from npmobile.verify.report import FEATURE_RTOL

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
from npmobile.applications import torchvision_modules as tvm  # noqa: E402  (needs torch)

RTOL = FEATURE_RTOL
# (architecture, constructor kwargs): every variant the issue names.
VARIANTS = [
    ("mobilenet_v2", {}),
    ("mobilenet_v2", {"width_mult": 0.5}),
    ("mobilenet_v3_small", {}),
    ("mobilenet_v3_small", {"reduced_tail": True, "num_classes": 10}),
    ("mobilenet_v3_large", {}),
]
FORMATS = ["zip", "legacy", "safetensors"]
MAX_DIFF: dict[str, float] = {}  # per model, for the report at the end of the module


def _id(arch, kwargs):
    return arch + "".join(f"-{k}={v}" for k, v in kwargs.items())


def save(model, path: Path, fmt: str) -> Path:
    state = model.state_dict()
    if fmt == "zip":
        torch.save(state, path)
    elif fmt == "legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    else:
        safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


class Case:
    def __init__(self, arch: str, kwargs: dict, folder: Path, seed: int):
        self.arch, self.kwargs = arch, kwargs
        self.model = tvm.randomize(tvm.build(arch, **kwargs), seed)
        generator = torch.Generator().manual_seed(seed)
        # Odd, non-square sizes: PyTorch's symmetric padding differs from Keras's "same" exactly there.
        self.x = torch.rand(2, 3, 113, 97, generator=generator)
        with torch.no_grad():
            self.y = self.model(self.x).numpy()
        self.folder = folder

    def file(self, fmt: str) -> Path:
        path = self.folder / f"{self.arch}-{fmt}.{'safetensors' if fmt == 'safetensors' else 'pth'}"
        return path if path.exists() else save(self.model, path, fmt)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    made: dict[str, Case] = {}

    def get(arch: str, kwargs: dict) -> Case:
        key = _id(arch, kwargs)
        if key not in made:
            made[key] = Case(arch, kwargs, tmp_path_factory.mktemp(key), seed=len(made))
        return made[key]

    return get


def assert_logits_close(got: np.ndarray, expected: np.ndarray, what: str) -> float:
    assert got.shape == expected.shape, what
    np.testing.assert_array_equal(np.argsort(-got, axis=1)[:, :5], np.argsort(-expected, axis=1)[:, :5],
                                  err_msg=f"{what}: top-5 differs")
    return assert_close(got, expected, what)


def assert_close(got: np.ndarray, expected: np.ndarray, what: str) -> float:
    assert got.shape == expected.shape, what
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(got, expected, rtol=0, atol=RTOL * scale, err_msg=what)
    return float(np.abs(got - expected).max()) / scale


# --------------------------------------------------------------------------------------------------
# Parity with PyTorch
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("arch,kwargs", VARIANTS, ids=[_id(*v) for v in VARIANTS])
def test_logits_match_pytorch(cases, arch, kwargs, fmt):
    case = cases(arch, kwargs)
    path = case.file(fmt)
    assert torch_format(str(path)) == fmt
    model = npmobile.load_model(path)  # architecture, width, classes and tail read from the tensors
    assert (model.arch, model.width_mult) == (arch, kwargs.get("width_mult", 1.0))
    assert model.reduced_tail == kwargs.get("reduced_tail", False)
    got = model.predict(case.x.numpy(), data_format="channels_first")
    diff = assert_logits_close(got, case.y, f"{arch} {kwargs} {fmt}")
    key = _id(arch, kwargs)
    MAX_DIFF[key] = max(MAX_DIFF.get(key, 0.0), diff)
    # NHWC, as everywhere in npmobile, gives the same answer.
    np.testing.assert_array_equal(model.predict(case.x.numpy().transpose(0, 2, 3, 1)), got)


@pytest.mark.slow
@pytest.mark.parametrize("arch,kwargs", VARIANTS, ids=[_id(*v) for v in VARIANTS])
def test_full_size_logits_match_pytorch(tmp_path, arch, kwargs):
    """At 224 px, batch 4, as torchvision's ImageNet models run (legacy .pth: the older format)."""
    model = tvm.randomize(tvm.build(arch, **kwargs), seed=7)
    x = torch.rand(4, 3, 224, 224, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = model(x).numpy()
    path = save(model, tmp_path / "full.pth", "legacy")
    got = npmobile.load_model(path).predict(x.numpy(), data_format="channels_first")
    diff = assert_logits_close(got, expected, f"{arch} {kwargs} 224")
    MAX_DIFF[_id(arch, kwargs) + "@224"] = diff


@pytest.mark.parametrize("arch,kwargs", [VARIANTS[0], VARIANTS[4]], ids=[_id(*VARIANTS[0]), _id(*VARIANTS[4])])
def test_reference_kernels_match_pytorch(cases, arch, kwargs):
    case = cases(arch, kwargs)
    model = npmobile.load_model(case.file("zip"))
    assert_logits_close(model.predict(case.x.numpy(), data_format="channels_first", reference=True), case.y,
                        f"{arch} reference")


def test_constructor_with_named_architecture(cases):
    case = cases("mobilenet_v3_small", {"reduced_tail": True, "num_classes": 10})
    model = tv.mobilenet_v3_small(weights=case.file("safetensors"), reduced_tail=True)
    assert model.num_classes == 10
    assert_logits_close(model.predict(case.x.numpy(), data_format="channels_first"), case.y, "named")


def _torch_outputs(model, x, names: list[str]) -> dict[str, np.ndarray]:
    modules = dict(model.named_modules())
    found: dict[str, np.ndarray] = {}
    hooks = [modules[name].register_forward_hook(lambda m, i, o, name=name: found.__setitem__(name, o.clone()))
             for name in names]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return {name: found[name].numpy() for name in names}


INTERMEDIATE = {
    ("mobilenet_v3_large", ()): ["features.0", "features.0.0", "features.1", "features.3", "features.4.block.0",
                                 "features.4.block.1.0", "features.4.block.2", "features.4.block.2.fc1",
                                 "features.4.block.3", "features.13", "features", "avgpool", "classifier.1"],
    ("mobilenet_v2", ()): ["features.0.1", "features.1.conv.0", "features.2", "features.3", "features.3.conv.1.2",
                           "features.17.conv.3", "features.18"],
}


ALONE = {"mobilenet_v3_large": "features.5.block.3", "mobilenet_v2": "features.5.conv"}


@pytest.mark.parametrize("arch", ["mobilenet_v3_large", "mobilenet_v2"])
def test_intermediate_outputs_by_module_path(cases, arch):
    case = cases(arch, {})
    names = INTERMEDIATE[(arch, ())]
    expected = _torch_outputs(case.model, case.x, names)
    model = npmobile.load_model(case.file("zip"))
    got = model.predict(case.x.numpy(), outputs=names, data_format="channels_first")
    for name in names:
        assert_close(got[name], expected[name], f"{arch} {name}")
    # Asked for alone, fusion stops there and nowhere else; a module path names its last layer's output,
    # even where that layer would be fused further (the projection's BatchNorm into the residual add).
    for name in (names[3], ALONE[arch]):
        alone = model.predict(case.x.numpy(), outputs=[name], data_format="channels_first")[name]
        assert_close(alone, _torch_outputs(case.model, case.x, [name])[name], f"{arch} {name} alone")


@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "mobilenet_v3_large"])
def test_dilated_v3_matches_pytorch(tmp_path, arch):
    """torchvision's dilated=True (segmentation backbones): the last stage's depthwise layers at dilation 2 and
    stride 1, padding (k - 1) // 2 * 2, so the features stay at 1/16 of the input. The state dict has the same
    shapes as the undilated model's, so the architecture is named, not read from the file."""
    model = tvm.randomize(tvm.build(arch, dilated=True), seed=11)
    x = torch.rand(2, 3, 113, 97, generator=torch.Generator().manual_seed(11))
    last = "features.11" if arch == "mobilenet_v3_small" else "features.15"
    names = ["features.12" if arch == "mobilenet_v3_small" else "features.16", last, f"{last}.block.1.0"]
    expected = _torch_outputs(model, x, names)
    with torch.no_grad():
        logits = model(x).numpy()
    path = save(model, tmp_path / "dilated.pth", "zip")
    ours = tv.CONSTRUCTORS[arch](weights=path, dilated=True)
    assert ours.dilated and expected[names[0]].shape[2:] == (8, 7)  # 113 x 97 / 16, rounded up
    assert_logits_close(ours.predict(x.numpy(), data_format="channels_first"), logits, f"{arch} dilated")
    got = ours.predict(x.numpy(), data_format="channels_first", outputs=names)
    for name in names:
        assert_close(got[name], expected[name], f"{arch} dilated {name}")
    # The same file read as the undilated architecture (what load_model reads from its shapes) is another model.
    undilated = npmobile.load_model(path).predict(x.numpy(), data_format="channels_first")
    assert np.abs(undilated - logits).max() > 100 * RTOL * max(1.0, float(np.abs(logits).max()))


def test_module_max_differences_reported(cases, capsys):
    """Not a check: prints the worst difference per model (for the README), after the parity tests ran."""
    with capsys.disabled():
        for key, diff in sorted(MAX_DIFF.items()):
            print(f"\n  max |npmobile - torch| / max(1, max|torch|): {key}: {diff:.1e}", end="")


# --------------------------------------------------------------------------------------------------
# What PyTorch users save
# --------------------------------------------------------------------------------------------------


def test_training_checkpoint_with_dataparallel_prefixes(cases, tmp_path):
    case = cases("mobilenet_v3_small", {})
    optimizer = torch.optim.SGD(case.model.parameters(), lr=0.1, momentum=0.9)
    case.model.train()
    case.model(case.x).sum().backward()
    optimizer.step()  # momentum buffers: tensors in the optimizer state, as in a real checkpoint
    optimizer.zero_grad()
    case.model.eval()
    with torch.no_grad():
        expected = case.model(case.x).numpy()
    state = {f"module.{k}": v for k, v in case.model.state_dict().items()}
    path = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 7, "model_state_dict": state, "optimizer_state_dict": optimizer.state_dict(),
                "best_acc": 0.5}, path)
    tensors = read_state_dict(path).tensors
    assert not any(k.startswith("module.") or k.endswith("num_batches_tracked") for k in tensors)
    model = npmobile.load_model(path)
    assert_logits_close(model.predict(case.x.numpy(), data_format="channels_first"), expected, "checkpoint")


def test_wrong_width_names_the_tensor(cases):
    path = cases("mobilenet_v2", {"width_mult": 0.5}).file("zip")
    with pytest.raises(WeightsError, match=r"features\.0\.0\.weight.*\(16, 3, 3, 3\).*\(32, 3, 3, 3\)"):
        tv.mobilenet_v2(weights=path, width_mult=1.0)
    with pytest.raises(WeightsError, match=r"no tensor .features\.1\.block\.0\.0\.weight"):
        tv.mobilenet_v3_small(weights=path)


def test_whole_pickled_model_is_refused_with_the_fix(cases, tmp_path):
    path = tmp_path / "whole.pth"
    torch.save(cases("mobilenet_v3_small", {}).model, path)
    with pytest.raises(ModelFileError, match=r"whole pickled model.*model\.state_dict\(\)") as error:
        npmobile.load_model(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_keras_readers_point_pytorch_files_elsewhere(cases):
    from npmobile.io import read_weights

    with pytest.raises(ModelFileError, match="PyTorch file"):
        read_weights(cases("mobilenet_v3_small", {}).file("zip"))


def test_engine_never_imports_torch(cases):
    path = cases("mobilenet_v3_small", {}).file("legacy")
    code = ("import sys, numpy as np, npmobile; m = npmobile.load_model(sys.argv[1]); "
            "m.predict(np.zeros((1, 64, 64, 3), np.float32)); assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, cwd=Path(__file__).parent.parent)


def test_safetensors_of_every_float_width_read_back_exactly(tmp_path):
    state = {"f32": torch.randn(2, 3), "f16": torch.randn(4, dtype=torch.float16),
             "bf16": torch.randn(3, 2, dtype=torch.bfloat16), "f64": torch.randn(5, dtype=torch.float64),
             "i64": torch.tensor([1, 2]), "scalar": torch.tensor(2.5)}
    path = tmp_path / "s.safetensors"
    safetensors_torch.save_file(state, path)
    tensors = read_state_dict(path).tensors
    for key, value in state.items():
        np.testing.assert_array_equal(tensors[key], value.float().numpy() if value.is_floating_point()
                                      else value.numpy())


def test_untouched_state_dict_reads_back_exactly(tmp_path):
    state = {"a": torch.arange(24, dtype=torch.float32).reshape(2, 3, 4).transpose(0, 2),  # not contiguous
             "b": torch.randn(5, dtype=torch.float16), "c": torch.randn(3, 2, dtype=torch.bfloat16),
             "d": torch.randn(4, 4, dtype=torch.float64)[1:3], "n": torch.tensor(5)}
    for fmt in ("zip", "legacy"):
        path = tmp_path / f"s-{fmt}.pth"
        torch.save(state, path, _use_new_zipfile_serialization=fmt == "zip")
        tensors = read_state_dict(path).tensors
        for key, value in state.items():
            np.testing.assert_array_equal(tensors[key], value.float().numpy() if key != "n" else value.numpy())


# --------------------------------------------------------------------------------------------------
# Hostile files: nothing runs, one clear error
# --------------------------------------------------------------------------------------------------


class _Command:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


class _Writer:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').write('x')",))


@pytest.mark.parametrize("payload", [_Command, _Writer])
@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_hostile_pickle_never_executes(tmp_path, payload, fmt):
    marker = tmp_path / "pwned"
    path = tmp_path / "best.pth"
    state = {"features.0.0.weight": torch.zeros(2, 3, 3, 3), "evil": payload(marker)}
    torch.save(state, path, _use_new_zipfile_serialization=fmt == "zip")
    refused = r"refers to ((posix|os|nt)\.system|(__builtin__|builtins)\.eval)"
    for load in (npmobile.load_model, read_state_dict):
        with pytest.raises(ModelFileError, match=refused) as error:
            load(path)
        assert "\n" not in str(error.value) and str(path) in str(error.value)
    assert not marker.exists()


def test_hostile_pickle_hand_written_in_a_zip(tmp_path):
    """A data.pkl written by hand (no torch): GLOBAL os.system + REDUCE, and the old INST/OBJ opcodes."""
    marker = tmp_path / "pwned"
    command = f"touch {marker}".encode()
    payloads = [
        b"cos\nsystem\n(V" + command + b"\ntR.",
        b"(V" + command + b"\nios\nsystem\n.",  # INST
        b"\x80\x02csubprocess\ncall\n]V" + command + b"\na\x85R.",
    ]
    for n, data in enumerate(payloads):
        path = tmp_path / f"p{n}.pth"
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr(f"p{n}/data.pkl", data)
        with pytest.raises(ModelFileError, match="refers to"):
            npmobile.load_model(path)
    assert not marker.exists()


def test_lying_tensor_sizes_are_refused(tmp_path):
    path = tmp_path / "lie.pth"
    torch.save({"w": torch.zeros(4)}, path)
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    pkl = next(n for n in members if n.endswith("data.pkl"))
    members[pkl] = members[pkl].replace(b"K\x04\x85", b"J\x00\x00\x10\x00\x85")  # size 4 -> 2**20
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    with pytest.raises(ModelFileError, match="reaches past its storage"):
        read_state_dict(path)


@pytest.mark.parametrize("cut", [10, 200, -9])
def test_truncated_files_fail_cleanly(cases, tmp_path, cut):
    for fmt in FORMATS:
        data = cases("mobilenet_v3_small", {}).file(fmt).read_bytes()
        path = tmp_path / f"cut-{fmt}"
        path.write_bytes(data[:cut])
        with pytest.raises(ModelFileError) as error:
            npmobile.load_model(path)
        assert "\n" not in str(error.value)


def test_safetensors_header_lies_are_refused(tmp_path):
    header = b'{"w": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4000000]}}'
    path = tmp_path / "lie.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    with pytest.raises(ModelFileError, match="does not fit"):
        read_state_dict(path)


def test_plain_pickle_is_not_taken_for_pytorch(tmp_path):
    path = tmp_path / "x.pkl"
    path.write_bytes(pickle.dumps({"a": 1}))
    assert torch_format(str(path)) is None


# --------------------------------------------------------------------------------------------------
# torchvision's image preparation, the command line, the registry
# --------------------------------------------------------------------------------------------------

SAMPLES = Path(__file__).parent.parent / "samples"


def _pillow_steps(path: Path, resized: tuple[int, int], corner: tuple[int, int]) -> np.ndarray:
    """Resize(256) + CenterCrop(224) + ToTensor + Normalize done by hand with Pillow and torch, with the
    resized size and crop corner worked out in the test (not by npmobile's code): NCHW, one image."""
    from PIL import Image

    image = Image.open(path).convert("RGB").resize(resized, Image.Resampling.BILINEAR)
    left, top = corner
    image = image.crop((left, top, left + 224, top + 224))
    t = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float().div(255)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return ((t - mean[:, None, None]) / std[:, None, None]).numpy()[None]


# (width, height) -> the resized (width, height) and the crop's (left, top)
GEOMETRY = [((451, 300), (384, 256), (80, 16)), ((300, 451), (256, 384), (16, 80)),
            ((1000, 257), (996, 256), (386, 16)), ((256, 256), (256, 256), (16, 16)),
            ((225, 333), (256, 378), (16, 77))]


@pytest.mark.parametrize("size,resized,corner", GEOMETRY)
def test_torchvision_preprocessing_matches_pillow_steps(tmp_path, size, resized, corner):
    from PIL import Image

    from npmobile.image import load_torchvision

    path = tmp_path / "photo.png"
    Image.open(SAMPLES / "chelsea.jpg").convert("RGB").resize(size, Image.Resampling.LANCZOS).save(path)
    got = load_torchvision(path)
    assert got.shape == (224, 224, 3) and got.dtype == np.float32
    np.testing.assert_array_equal(got.transpose(2, 0, 1)[None], _pillow_steps(path, resized, corner))


def test_classify_with_a_pth_uses_torchvision_preprocessing_and_softmax(cases, tmp_path, capsys):
    import json

    from npmobile.cli import main

    case = cases("mobilenet_v3_small", {"reduced_tail": True, "num_classes": 10})
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"kind {i}\n" for i in range(10)))
    image = SAMPLES / "chelsea.jpg"
    assert main(["classify", str(image), "--weights", str(case.file("zip")), "--labels", str(labels), "--json",
                 "--top", "5"]) == 0
    top = json.loads(capsys.readouterr().out)[0]["top"]
    with torch.no_grad():
        assert _image_size(image) == (451, 300)  # so Resize(256) gives 384 x 256, cropped at (80, 16)
        expected = torch.softmax(case.model(torch.from_numpy(_pillow_steps(image, (384, 256), (80, 16)))), 1)[0]
    order = torch.argsort(expected, descending=True)[:5].tolist()
    assert [t["label"] for t in top] == [f"kind {i}" for i in order]
    np.testing.assert_allclose([t["probability"] for t in top], expected[order].numpy(), atol=5e-5)


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.size


def test_classify_labels_must_match_the_classes(cases, tmp_path, capsys):
    from npmobile.cli import main

    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    path = cases("mobilenet_v3_small", {"reduced_tail": True, "num_classes": 10}).file("zip")
    assert main(["classify", str(SAMPLES / "chelsea.jpg"), "--weights", str(path), "--labels", str(labels)]) == 1
    assert "2 labels, the model has 10 classes" in capsys.readouterr().err


def test_registry_names_torchvision_files_with_torch_hubs_hash_prefix():
    from npmobile.weights import torchvision_file

    info = torchvision_file("mobilenet_v3_large")
    assert info.filename == "mobilenet_v3_large-8738ca79.pth" and info.sha256_prefix == "8738ca79"
    assert info.base_url + info.url == "https://download.pytorch.org/models/mobilenet_v3_large-8738ca79.pth"
    assert torchvision_file("mobilenet_v2").filename == "mobilenet_v2-b0353104.pth"
    assert torchvision_file("mobilenet_v3_small").filename == "mobilenet_v3_small-047dcff4.pth"


def test_imagenet_weights_found_in_the_torch_hub_cache_by_hash(cases, tmp_path, monkeypatch):
    import hashlib

    from npmobile.weights import registry

    data = cases("mobilenet_v3_small", {}).file("zip").read_bytes()
    name = f"mobilenet_v3_small-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    for var, folder in (("NPMOBILE_WEIGHTS_DIR", "w"), ("KERAS_HOME", "k"), ("NPMOBILE_CACHE_DIR", "c"),
                        ("TORCH_HOME", "t")):
        monkeypatch.setenv(var, str(tmp_path / folder))
    monkeypatch.setenv("NPMOBILE_WEIGHTS_URL", "http://127.0.0.1:9/")  # offline: nothing listens there
    monkeypatch.setitem(registry.TORCHVISION_FILES, "mobilenet_v3_small", name)
    hub = tmp_path / "t" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / name).write_bytes(data)
    model = tv.mobilenet_v3_small(weights="imagenet")
    assert model.num_classes == 1000
    (hub / name).write_bytes(data[:-1] + b"x")  # fails torch hub's hash check: not used, and offline
    with pytest.raises(WeightsError, match=f"cannot download {name}.*put {name} in"):
        tv.mobilenet_v3_small(weights="imagenet")


def test_costs_name_the_block_parts_of_torchvision_paths():
    from npmobile.costs import layer_costs

    model = tv.mobilenet_v3_large()  # random weights: costs depend on shapes only
    parts = {c.name: c.part for c in layer_costs(model, 224)}
    assert parts["features.0.0"] == "stem" and parts["features.16.0"] == "head"
    assert (parts["features.1.block.0.0"], parts["features.1.block.1.0"], parts["features.1"]) == \
        ("depthwise", "project", "project")
    assert [parts[f"features.4.block.{k}.0"] for k in (0, 1, 3)] == ["expand", "depthwise", "project"]
    assert parts["features.4.block.2.fc1"] == parts["features.4.block.2"] == "se"
    assert parts["classifier.3"] == "classifier"
    macs = sum(c.macs for c in layer_costs(model, 224))
    assert 215e6 < macs < 220e6  # torchvision's documented 0.217 GFLOPS (multiply-adds) for V3-Large


@pytest.mark.parametrize("arch,params,gmacs", [("mobilenet_v2", 3_504_872, 0.301),
                                               ("mobilenet_v3_small", 2_542_856, 0.057),
                                               ("mobilenet_v3_large", 5_483_032, 0.217)])
def test_parameter_and_mac_counts_are_torchvisions(arch, params, gmacs):
    """torchvision's model cards: num_params (trainable: BatchNorm's running statistics excluded) and GFLOPS."""
    from npmobile.costs import layer_costs

    model = tv.CONSTRUCTORS[arch]()
    stats = sum(int(w.size) for n in model.graph.nodes for k, w in n.weights.items()
                if k in ("moving_mean", "moving_variance"))
    assert model.count_params() - stats == params
    assert round(sum(c.macs for c in layer_costs(model, 224)) / 1e9, 3) == gmacs


def test_zero_stride_tensor_asking_for_terabytes_is_refused(tmp_path):
    """A hand-edited pickle: one float of storage, size (2**20, 2**20) with stride (0, 0)."""
    path = tmp_path / "huge.pth"
    torch.save({"w": torch.zeros(1, 1)}, path)
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    pkl = next(n for n in members if n.endswith("data.pkl"))
    big = b"J\x00\x00\x10\x00"  # BININT 2**20
    members[pkl] = members[pkl].replace(b"K\x01K\x01\x86", big + big + b"\x86", 1).replace(
        b"K\x01K\x01\x86", b"K\x00K\x00\x86", 1)
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    with pytest.raises(ModelFileError, match="far larger than any MobileNet"):
        read_state_dict(path)


def test_summary_and_show_work_on_a_pth(cases, tmp_path, capsys):
    from npmobile.cli import main

    path = str(cases("mobilenet_v3_small", {}).file("zip"))
    assert main(["summary", path]) == 0
    assert "features.4.block.2.fc1 (Conv2D)" in capsys.readouterr().out
    out = tmp_path / "maps.png"
    assert main(["show", str(SAMPLES / "chelsea.jpg"), "--weights", path, "--layer", "features.3", "--out",
                 str(out)]) == 0
    assert out.is_file() and "of features.3" in capsys.readouterr().out
    assert main(["show", str(SAMPLES / "chelsea.jpg"), "--weights", path, "--layer", "features.4.block.1.0",
                 "--filters", "--out", str(out)]) == 0
    assert "5x5 depthwise filters" in capsys.readouterr().out


def test_a_pickle_editing_what_it_is_given_changes_nothing_for_the_next_file(tmp_path):
    """BUILD sets attributes on what find_class returned: on a shared storage type or function, one file
    could change how the next is read. Each file gets its own copies."""
    edits = [
        b"ctorch\nFloatStorage\nN}(Vname\nVDoubleStorage\nu\x86b.",  # FloatStorage now reads as float64?
        b"ctorch._utils\n_rebuild_parameter\nN}(V__defaults__\n(I1\ntu\x86b.",  # new defaults?
    ]
    for n, data in enumerate(edits):
        path = tmp_path / f"edit{n}.pth"
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr(f"edit{n}/data.pkl", data)
        with pytest.raises(ModelFileError):
            read_state_dict(path)
    good = tmp_path / "good.pth"
    torch.save({"w": torch.arange(6, dtype=torch.float32)}, good)
    np.testing.assert_array_equal(read_state_dict(good).tensors["w"], np.arange(6, dtype=np.float32))


def test_other_architectures_are_named_as_such(tmp_path):
    path = tmp_path / "resnet_like.pth"
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).state_dict(), path)
    with pytest.raises(ModelFileError, match="not a torchvision MobileNetV2/V3 state dict") as error:
        npmobile.load_model(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_read_in_a_child_or_trusted_in_process_the_same(cases, monkeypatch):
    """A .pth is read by the isolated reader's child like a Keras file (sent back as arrays, no pickle);
    trusted, in this process: the same model either way."""
    from npmobile import isolation

    case = cases("mobilenet_v3_small", {})
    path = case.file("legacy")
    isolated = npmobile.load_model(path).predict(case.x.numpy(), data_format="channels_first")
    started = []
    monkeypatch.setattr(isolation, "PendingRead", lambda *a: started.append(a))  # no child may start
    trusted = npmobile.load_model(path, trusted=True).predict(case.x.numpy(), data_format="channels_first")
    np.testing.assert_array_equal(isolated, trusted)
    assert not started


def test_keras_file_given_to_a_torchvision_constructor_says_so(keras_files):
    case = keras_files.get("MobileNetV3Small", "keras3_keras", input_shape=(96, 96, 3))
    with pytest.raises(WeightsError, match="a Keras file, not a PyTorch state dict"):
        tv.mobilenet_v3_small(weights=case.path)


def test_batch_classifier_on_a_pth_gives_probabilities_and_features(cases):
    """npmobile.batch (what classify, Ray and Dask run): softmax over the logits; features = avgpool."""
    from npmobile.batch import BatchClassifier, ModelRef

    path = str(cases("mobilenet_v3_small", {}).file("zip"))
    images = [str(SAMPLES / "chelsea.jpg"), str(SAMPLES / "coffee.jpg")]
    probabilities = BatchClassifier(ModelRef(weights=path), output="probabilities", threads=1)(images)
    for row in probabilities:
        assert row["error"] is None and len(row["probabilities"]) == 1000
        assert abs(sum(row["probabilities"]) - 1) < 1e-4 and min(row["probabilities"]) >= 0
    features = BatchClassifier(ModelRef(weights=path), output="features", threads=1)(images)
    assert [len(row["features"]) for row in features] == [576, 576]  # V3-Small's last conv, pooled
