"""Hostile and broken model files fail cleanly: npmobile's own error, one line naming the file and the
layer, raised at load time, before anything large is allocated, and nothing from the file is run or
read from elsewhere on disk."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import tracemalloc
import warnings
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

import npmobile
import npmobile.io.torch
import npmobile.isolation
from npmobile.errors import ModelFileError, NpmobileError, UnsupportedLayerError

V3 = dict(input_shape=(96, 96, 3))
SAMPLES = Path(__file__).resolve().parents[1] / "samples"


# --------------------------------------------------------------------------------------------------
# Hand-written files: a Keras 3 legacy .h5 with exactly the config and weights a test needs
# --------------------------------------------------------------------------------------------------


def _input(name="in", shape=(None, 32, 32, 3)) -> dict:
    return {"class_name": "InputLayer", "name": name, "config": {"name": name, "batch_shape": list(shape)},
            "inbound_nodes": []}


def _tensor(layer: str) -> dict:
    return {"class_name": "__keras_tensor__", "config": {"keras_history": [layer, 0, 0]}}


def _layer(cls: str, name: str, *sources: str, **config) -> dict:
    args = [_tensor(s) for s in sources]
    return {"class_name": cls, "name": name, "config": {"name": name, **config},
            "inbound_nodes": [{"args": args if len(args) == 1 else [args], "kwargs": {}}]}


def write_h5(path: Path, layers: list[dict], output: str, weights: dict | None = None) -> Path:
    """A legacy .h5 as Keras 3 writes it: model_config, and model_weights/<layer>/<layer>/<var>."""
    weights = weights or {}
    config = {"class_name": "Functional", "config": {"name": "m", "layers": layers,
                                                     "input_layers": [[layers[0]["name"], 0, 0]],
                                                     "output_layers": [[output, 0, 0]]}}
    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = json.dumps(config)
        f.attrs["keras_version"] = "3.15.1"
        root = f.create_group("model_weights")
        root.attrs["layer_names"] = [layer["name"] for layer in layers]
        for layer in layers:
            group = root.create_group(layer["name"])
            arrays = weights.get(layer["name"], {})
            group.attrs["weight_names"] = np.array([f"{layer['name']}/{v}" for v in arrays], dtype="S")
            for var, array in arrays.items():
                group.create_dataset(f"{layer['name']}/{var}", data=array)
    return path


def _load_error(path: Path, error=ModelFileError) -> str:
    """The one-line message of the error loading ``path`` raises, which must name the file."""
    with pytest.raises(error) as info:
        npmobile.load_model(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    return message


def _load_error_and_peak(path: Path) -> tuple[str, int]:
    """``_load_error``'s message, and the most memory Python's allocations held before the refusal."""
    tracemalloc.start()
    try:
        return _load_error(path), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# --------------------------------------------------------------------------------------------------
# Graph structure
# --------------------------------------------------------------------------------------------------


def test_a_chain_of_thousands_of_layers_loads_without_recursion_limits(tmp_path):
    layers = [_input()] + [_layer("ReLU", f"relu_{i}", "in" if i == 0 else f"relu_{i - 1}") for i in range(1500)]
    model = npmobile.load_model(write_h5(tmp_path / "deep.h5", layers, "relu_1499"))
    x = np.linspace(-1, 1, 32 * 32 * 3, dtype=np.float32).reshape(1, 32, 32, 3)
    np.testing.assert_array_equal(model.predict(x), np.maximum(x, 0))


def test_cyclic_inbound_nodes_are_refused(tmp_path):
    layers = [_input(), _layer("ReLU", "a", "b"), _layer("ReLU", "b", "a")]
    assert "cycle" in _load_error(write_h5(tmp_path / "cycle.h5", layers, "b"))


def test_dangling_inbound_node_names_both_layers(tmp_path):
    layers = [_input(), _layer("ReLU", "a", "ghost")]
    message = _load_error(write_h5(tmp_path / "dangling.h5", layers, "a"))
    assert "'a' takes input from 'ghost'" in message


def test_call_index_beyond_a_layers_calls_is_refused(tmp_path):
    layers = [_input(), _layer("ReLU", "a", "in")]
    layers.append({**_layer("ReLU", "b"), "inbound_nodes": [{"args": [
        {"class_name": "__keras_tensor__", "config": {"keras_history": ["a", 5, 0]}}], "kwargs": {}}]})
    assert "'a' is referenced as call 5" in _load_error(write_h5(tmp_path / "calls.h5", layers, "b"))


# --------------------------------------------------------------------------------------------------
# Absurd sizes: refused at load, naming the layer, before anything is allocated
# --------------------------------------------------------------------------------------------------

ONES = {"kernel": np.ones((3, 3, 3, 4), np.float32)}
ABSURD = {
    "input-10**6": ([_input(shape=(None, 10**6, 10**6, 3)), _layer("ReLU", "r", "in")], {}, "'in'"),
    "filters-10**9": ([_input(), _layer("Conv2D", "c", "in", filters=10**9, kernel_size=[3, 3], padding="same",
                                        use_bias=False)], {"c": ONES}, "'c'"),
    "kernel-10**5": ([_input(), _layer("Conv2D", "c", "in", filters=4, kernel_size=[10**5, 10**5],
                                       padding="same", use_bias=False)], {"c": ONES}, "'c'"),
    "dilation-10**6": ([_input(), _layer("DepthwiseConv2D", "dw", "in", kernel_size=[3, 3], padding="same",
                                         dilation_rate=[10**6, 10**6], use_bias=False)],
                       {"dw": {"depthwise_kernel": np.ones((3, 3, 3, 1), np.float32)}}, "'dw'"),
    "pool-3000": ([_input(shape=(None, 64, 64, 16)), _layer("MaxPooling2D", "p", "in", pool_size=[3000, 3000],
                                                            strides=[1, 1], padding="same")], {}, "'p'"),
    "zero-padding-10**5": ([_input(), _layer("ZeroPadding2D", "z", "in", padding=[[10**5, 10**5], [10**5, 10**5]])],
                           {}, "'z'"),
    "reshape-10**6": ([_input(), _layer("Reshape", "rs", "in", target_shape=[10**6, 10**6, -1])], {}, "'rs'"),
    # Within the per-layer and window rules; its windows as a matrix (the im2col scratch) are 17 G values.
    "conv-patches": ([_input(shape=(None, 256, 256, 64)), _layer("Conv2D", "c", "in", filters=4, kernel_size=[64, 64],
                                                                strides=[1, 1],
                                                                padding="same", use_bias=False)],
                     {"c": {"kernel": np.ones((64, 64, 64, 4), np.float32)}}, "'c'"),
}


@pytest.mark.parametrize("case", ABSURD, ids=list(ABSURD))
def test_absurd_sizes_are_refused_before_allocation(tmp_path, case):
    layers, weights, layer = ABSURD[case]
    path = write_h5(tmp_path / f"{case}.h5", layers, layers[-1]["name"], weights)
    message, peak = _load_error_and_peak(path)
    assert layer in message
    assert peak < 50 * 2**20, f"{peak:,} bytes allocated before refusing"


def test_reshape_with_two_unknown_sizes_fails_at_load(tmp_path):
    layers = [_input(), _layer("Reshape", "rs", "in", target_shape=[-1, -1])]
    assert "'rs'" in _load_error(write_h5(tmp_path / "reshape.h5", layers, "rs"))


# --------------------------------------------------------------------------------------------------
# Weights: shapes against configs, NaN/Inf, data outside the file
# --------------------------------------------------------------------------------------------------


def test_weight_shape_disagreeing_with_config_in_a_real_file(keras_files, tmp_path):
    source = keras_files.get("MobileNetV3Small", "keras3_h5", **V3).path
    target = tmp_path / "resized.h5"
    target.write_bytes(source.read_bytes())
    with h5py.File(target, "r+") as f:
        group = f["model_weights/expanded_conv_project"]
        name = next(iter(n.decode() if isinstance(n, bytes) else n for n in group.attrs["weight_names"]))
        kernel = group[name][()]
        del group[name]
        group.create_dataset(name, data=kernel[..., :-1])
    message = _load_error(target)
    assert "'expanded_conv_project'" in message and "shape" in message


def test_nan_and_inf_weights_warn_naming_the_layer_and_still_load(tmp_path):
    kernel = np.ones((3, 4), np.float32)
    kernel[0, 0], kernel[1, 1] = np.nan, np.inf
    layers = [_input(shape=(None, 3)), _layer("Dense", "d", "in", units=4, activation="linear")]
    path = write_h5(tmp_path / "nan.h5", layers, "d", {"d": {"kernel": kernel, "bias": np.zeros(4, np.float32)}})
    with pytest.warns(RuntimeWarning, match=r"layer 'd' weight 'kernel' has 2 NaN/Inf values"):
        model = npmobile.load_model(path)
    assert np.isnan(model.predict(np.ones((1, 3), np.float32))).any()


def test_weights_stored_in_another_file_are_refused(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(108, dtype=np.float32).tobytes())
    layers = [_input(), _layer("Conv2D", "c", "in", filters=4, kernel_size=[3, 3], use_bias=False)]
    path = write_h5(tmp_path / "external.h5", layers, "c")
    with h5py.File(path, "r+") as f:
        group = f["model_weights/c"]
        group.attrs["weight_names"] = np.array(["c/kernel"], dtype="S")
        group.create_dataset("c/kernel", shape=(3, 3, 3, 4), dtype="f4", external=[(str(secret), 0, 432)])
    assert "outside the file" in _load_error(path)


def test_virtual_dataset_viewing_another_file_is_refused(tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["kernel"] = np.ones((3, 3, 3, 4), np.float32)
    layout = h5py.VirtualLayout(shape=(3, 3, 3, 4), dtype="f4")
    layout[...] = h5py.VirtualSource(str(other), "kernel", shape=(3, 3, 3, 4))
    layers = [_input(), _layer("Conv2D", "c", "in", filters=4, kernel_size=[3, 3], use_bias=False)]
    path = write_h5(tmp_path / "virtual.h5", layers, "c")
    with h5py.File(path, "r+") as f:
        group = f["model_weights/c"]
        group.attrs["weight_names"] = np.array(["c/kernel"], dtype="S")
        group.create_virtual_dataset("c/kernel", layout)
    assert "outside the file" in _load_error(path)


def test_external_link_to_another_hdf5_file_is_refused(tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["kernel"] = np.ones((3, 3, 3, 4), np.float32)
    layers = [_input(), _layer("Conv2D", "c", "in", filters=4, kernel_size=[3, 3], use_bias=False)]
    path = write_h5(tmp_path / "link.h5", layers, "c")
    with h5py.File(path, "r+") as f:
        group = f["model_weights/c"]
        group.attrs["weight_names"] = np.array(["c/kernel"], dtype="S")
        group.create_group("c")["kernel"] = h5py.ExternalLink(str(other), "/kernel")
    assert "links to another file" in _load_error(path)


def test_missing_model_weights_group_and_layer_group(keras_files, tmp_path):
    source = keras_files.get("MobileNetV3Small", "keras3_h5", **V3).path
    for victim in ("model_weights", "model_weights/conv_bn"):
        target = tmp_path / f"missing-{victim.replace('/', '-')}.h5"
        target.write_bytes(source.read_bytes())
        with h5py.File(target, "r+") as f:
            del f[victim]
        assert victim.rsplit("/", 1)[-1] in _load_error(target)


# --------------------------------------------------------------------------------------------------
# Code in files: Lambda, custom classes, custom functions
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def custom_files(tmp_path_factory):
    """Real Keras-written files with a Lambda, a registered ReLU subclass, an unregistered custom
    layer and a registered custom activation function."""
    import keras

    @keras.saving.register_keras_serializable(package="evil")
    class ReLU(keras.layers.ReLU):  # Keras's name, user code: must not run as Keras's ReLU
        def call(self, x):
            return super().call(x) * 2

    class Plain(keras.layers.Layer):
        def call(self, x):
            return x

    @keras.saving.register_keras_serializable(package="evil")
    def triple(x):
        return x * 3

    root = tmp_path_factory.mktemp("custom")
    inputs = keras.Input((8, 8, 3))
    models = {
        "lambda": keras.layers.Lambda(lambda t: t * 2.0, name="double")(inputs),
        "registered": ReLU(name="evil_relu")(inputs),
        "unregistered": Plain(name="plain")(inputs),
        "activation": keras.layers.Conv2D(4, 3, activation=triple, name="conv")(inputs),
    }
    paths = {}
    for name, outputs in models.items():
        for suffix in (".keras", ".h5"):
            paths[name + suffix] = root / f"{name}{suffix}"
            keras.Model(inputs, outputs).save(paths[name + suffix])
    return paths


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
@pytest.mark.parametrize(
    "name,layer,expected",
    [("lambda", "double", "Lambda layer"), ("registered", "evil_relu", "evil>ReLU"),
     ("unregistered", "plain", "Plain"), ("activation", "conv", "evil>triple")],
)
def test_code_carrying_layers_are_refused_by_name(custom_files, name, layer, expected, suffix):
    message = _load_error(custom_files[name + suffix], UnsupportedLayerError)
    assert f"'{layer}'" in message and expected in message


# --------------------------------------------------------------------------------------------------
# The wrong kind of file, and hostile .keras zips
# --------------------------------------------------------------------------------------------------


def test_a_directory_named_like_a_model_is_refused(tmp_path):
    folder = tmp_path / "model.h5"
    folder.mkdir()
    assert "directory" in _load_error(folder)


def test_a_real_jpeg_named_h5_is_refused(tmp_path):
    photo = Path(__file__).resolve().parents[1] / "samples" / "chelsea.jpg"
    path = tmp_path / "model.h5"
    path.write_bytes(photo.read_bytes())
    assert "not a Keras file" in _load_error(path)


def _patch_sizes(path: Path, member: str, size: int) -> None:
    """Make the zip's headers (local and central) claim ``member`` holds ``size`` bytes."""
    data = bytearray(path.read_bytes())
    name = member.encode()
    for signature, offset, name_at in ((b"PK\x03\x04", 22, 30), (b"PK\x01\x02", 24, 46)):
        start = 0
        while (start := data.find(signature, start)) >= 0:
            length = struct.unpack_from("<H", data, start + name_at - (2 if signature == b"PK\x03\x04" else 18))[0]
            if data[start + name_at : start + name_at + length] == name:
                struct.pack_into("<I", data, start + offset, size)
            start += 4
    path.write_bytes(bytes(data))


def _copy_keras(source: Path, target: Path, replace: dict[str, bytes] | None = None) -> Path:
    replace = replace or {}
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, replace.get(info.filename, src.read(info)))
    return target


def test_zip_bomb_whose_header_understates_its_size_is_refused(keras_files, tmp_path):
    source = keras_files.get("MobileNetV3Small", "keras3_keras", **V3).path
    config = zipfile.ZipFile(source).read("config.json")
    bomb = config[:-1] + b" " * (200 * 2**20) + b"}"  # 200 MB of JSON that deflates to ~200 KB
    path = _copy_keras(source, tmp_path / "bomb.keras", {"config.json": bomb})
    _patch_sizes(path, "config.json", len(config))
    _, peak = _load_error_and_peak(path)
    assert peak < 50 * 2**20, f"{peak:,} bytes read from the bomb"


def test_member_claiming_a_huge_size_is_refused_before_reading(keras_files, tmp_path):
    source = keras_files.get("MobileNetV3Small", "keras3_keras", **V3).path
    path = _copy_keras(source, tmp_path / "huge.keras")
    _patch_sizes(path, "model.weights.h5", 3 * 2**30)
    assert "model.weights.h5" in _load_error(path) and "refusing" in _load_error(path)


@pytest.mark.parametrize("member", ["/etc/passwd", "../../evil.txt", "a/../../evil.txt", "C:/evil.txt"])
def test_members_with_unsafe_paths_are_refused(keras_files, tmp_path, member):
    source = keras_files.get("MobileNetV3Small", "keras3_keras", **V3).path
    path = _copy_keras(source, tmp_path / "unsafe.keras")
    with zipfile.ZipFile(path, "a") as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the odd name it is asked to write
        archive.writestr(zipfile.ZipInfo(member), b"x")
    assert "unsafe path" in _load_error(path)
    assert not (tmp_path.parent / "evil.txt").exists()


# --------------------------------------------------------------------------------------------------
# The command line: one line, exit 1; --debug shows the traceback
# --------------------------------------------------------------------------------------------------


def test_cli_reports_a_hostile_model_in_one_line(tmp_path):
    layers = [_input(), _layer("ReLU", "a", "b"), _layer("ReLU", "b", "a")]
    path = write_h5(tmp_path / "cycle.h5", layers, "b")
    image = Path(__file__).resolve().parents[1] / "samples" / "chelsea.jpg"
    command = [sys.executable, "-m", "npmobile", "classify", str(image), "--weights", str(path)]
    quiet = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 1
    lines = [line for line in quiet.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(path) in lines[0] and "cycle" in lines[0], quiet.stderr
    loud = subprocess.run(command + ["--debug"], capture_output=True, text=True, timeout=120)
    assert loud.returncode == 1 and "Traceback" in loud.stderr



def test_many_empty_datasets_cannot_add_up_to_gigabytes(tmp_path):
    # Never-written chunks take no space in the file but read back as fill values: a 1 MB file
    # could list 64 datasets of 60 M values each (15 GB), every one under the per-dataset limit.
    layers = [_input(shape=(None, 3)), _layer("Dense", "d", "in", units=4, use_bias=False)]
    path = write_h5(tmp_path / "sparse.h5", layers, "d")
    with h5py.File(path, "r+") as f:
        group = f["model_weights/d"]
        names = [f"d/kernel_{i}" for i in range(64)]
        group.attrs["weight_names"] = np.array(names, dtype="S")
        for name in names:
            group.create_dataset(name, shape=(60 * 2**20,), dtype="f4", chunks=(2**20,))
    assert path.stat().st_size < 2**20
    message, peak = _load_error_and_peak(path)
    assert "'d'" in message and "add up to" in message
    assert peak < 2**31, f"{peak:,} bytes read"


# --------------------------------------------------------------------------------------------------
# A folder of awkward and hostile images: the bad ones are reported, the rest classified
# --------------------------------------------------------------------------------------------------


def _png_claiming(path: Path, width: int, height: int) -> None:
    """A PNG whose header (with a valid checksum) claims width x height pixels: a decompression bomb."""
    import zlib

    from PIL import Image

    Image.new("RGB", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    struct.pack_into(">II", data, 16, width, height)  # IHDR's width and height follow its type
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


def _awkward_images(folder: Path) -> tuple[set[str], set[str]]:
    """Images that must classify, and images that must fail; returns (good names, bad names)."""
    from PIL import Image

    photo = Path(__file__).resolve().parents[1] / "samples" / "chelsea.jpg"
    base = Image.open(photo).convert("RGB")
    base.resize((1, 1)).save(folder / "one_pixel.png")
    base.resize((5000, 1)).save(folder / "wide_5000x1.png")
    base.resize((1, 5000)).save(folder / "tall_1x5000.png")
    base.convert("CMYK").save(folder / "cmyk.jpg")
    grey16 = np.asarray(base.convert("L"), dtype=np.uint16) * 257
    Image.fromarray(grey16).save(folder / "sixteen_bit.png")
    frames = [base.resize((40, 30)), base.resize((40, 30)).rotate(90)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    frames[0].save(folder / "animated.webp", save_all=True, append_images=frames[1:], duration=50)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(photo.read_bytes()[:300])
    (folder / "not_an_image.png").write_bytes(b"hello, this is text")
    _png_claiming(folder / "bomb.png", 100_000, 100_000)
    good = {"one_pixel.png", "wide_5000x1.png", "tall_1x5000.png", "cmyk.jpg", "sixteen_bit.png", "animated.gif",
            "animated.webp"}
    return good, {"empty.jpg", "truncated.jpg", "not_an_image.png", "bomb.png"}


def test_folder_run_reports_each_bad_image_in_one_line_and_classifies_the_rest(keras_files, tmp_path):
    model = keras_files.get("MobileNetV2", "keras3_keras", input_shape=(96, 96, 3), alpha=0.35).path
    folder = tmp_path / "images"
    folder.mkdir()
    good, bad = _awkward_images(folder)
    result = subprocess.run(
        [sys.executable, "-m", "npmobile", "classify", str(folder), "--weights", str(model), "--size", "96", "--json"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    classified = {Path(entry["path"]).name for entry in report if "top" in entry}
    failed = {Path(entry["path"]).name for entry in report if "error" in entry}
    assert classified == good and failed == bad
    assert all(len(entry["top"]) == 5 for entry in report if "top" in entry)
    errors = [line for line in result.stderr.splitlines()
              if line.startswith("npmobile:") and "compiling kernels" not in line]  # cold-cache notice
    assert sorted(next(name for name in bad if name in line) for line in errors) == sorted(bad)
    assert "Traceback" not in result.stderr
    assert any("too many pixels" in line for line in errors if "bomb.png" in line)


# --------------------------------------------------------------------------------------------------
# The weights cache: a download never writes through a link planted in the cache
# --------------------------------------------------------------------------------------------------


def test_download_replaces_a_planted_symlink_instead_of_writing_through_it(tmp_path, monkeypatch):
    from npmobile.weights import cache, official_file

    outside = tmp_path / "outside.txt"
    outside.write_text("must not be overwritten")
    monkeypatch.setenv("NPMOBILE_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setenv("NPMOBILE_CACHE_DIR", str(tmp_path / "cache"))
    info = official_file("mobilenet_v2", 0.35, 96, include_top=True)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / info.filename).symlink_to(outside)
    monkeypatch.setattr(cache, "_fetch", lambda url, out, progress: out.write(b"\x89HDF\r\n\x1a\n" + bytes(64)))
    path = cache.resolve(info)
    assert outside.read_text() == "must not be overwritten"
    assert path == tmp_path / "cache" / info.filename and not path.is_symlink()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [info.filename]


# --------------------------------------------------------------------------------------------------
# Malformed configs in a real .keras: our error, naming the file and (where there is one) the layer
# --------------------------------------------------------------------------------------------------


def _conv(config: dict) -> dict:
    return next(layer for layer in config["config"]["layers"] if layer["name"] == "conv")


MALFORMED = {
    "config-not-a-mapping": (lambda c: _conv(c).__setitem__("config", [1, 2]), "'conv'"),
    "channels-first": (lambda c: _conv(c)["config"].__setitem__("data_format", "channels_first"), "channels_first"),
    "activation-a-list": (lambda c: _conv(c)["config"].__setitem__("activation", [1]), "'conv'"),
    "call-args-a-mapping": (lambda c: _conv(c)["inbound_nodes"][0].__setitem__("args", {"a": 1}), "argument"),
    "strides-zero": (lambda c: _conv(c)["config"].__setitem__("strides", [0, 0]), "'conv'"),
    "history-nan": (lambda c: _conv(c)["inbound_nodes"][0]["args"][0]["config"].__setitem__(
        "keras_history", ["rescaling", float("nan"), 0]), "malformed"),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_malformed_configs_fail_naming_the_file(keras_files, tmp_path, case):
    edit, expected = MALFORMED[case]
    source = keras_files.get("MobileNetV3Small", "keras3_keras", **V3).path
    with zipfile.ZipFile(source) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(members["config.json"])
    edit(config)
    members["config.json"] = json.dumps(config).encode()
    path = tmp_path / f"{case}.keras"
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    with pytest.raises(NpmobileError) as info:
        npmobile.load_model(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path)) and expected in message, message


# --------------------------------------------------------------------------------------------------
# Keras's modules exactly, Lambda wherever it is, one member per name
# --------------------------------------------------------------------------------------------------


def _rewrite_keras(source: Path, target: Path, edit) -> Path:
    """A copy of a .keras archive whose config.json ``edit`` changed."""
    with zipfile.ZipFile(source) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(members["config.json"])
    edit(config)
    members["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(target, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return target


@pytest.fixture(scope="module")
def relu_then_lambda(tmp_path_factory) -> dict[str, Path]:
    """Keras-written: input -> ReLU 'r' -> Lambda 'double' (the output), as .keras and .h5."""
    import keras

    inputs = keras.Input((8, 8, 3))
    outputs = keras.layers.Lambda(lambda t: t * 2.0, name="double")(keras.layers.ReLU(name="r")(inputs))
    folder = tmp_path_factory.mktemp("lambda")
    paths = {}
    for suffix in (".keras", ".h5"):
        paths[suffix] = folder / f"model{suffix}"
        keras.Model(inputs, outputs).save(paths[suffix])
    return paths


def _output_r(config: dict) -> None:
    config["config"]["output_layers"] = [["r", 0, 0]]


@pytest.mark.parametrize("module,refused", [("keras_evil.layers", True), ("kerasx", True), ("tf_keras_x.layers", True),
                                            ("keras.layers", False), ("keras", False), ("tf_keras.layers", False)])
def test_layer_modules_are_keras_only_when_named_exactly(relu_then_lambda, tmp_path, module, refused):
    def edit(config):
        _output_r(config)
        config["config"]["layers"] = [layer for layer in config["config"]["layers"] if layer["name"] != "double"]
        relu = next(layer for layer in config["config"]["layers"] if layer["name"] == "r")
        relu["module"] = module

    path = _rewrite_keras(relu_then_lambda[".keras"], tmp_path / "module.keras", edit)
    if refused:
        message = _load_error(path, UnsupportedLayerError)
        assert f"{module}>ReLU" in message and "'r'" in message
    else:
        x = np.linspace(-1, 1, 8 * 8 * 3, dtype=np.float32).reshape(1, 8, 8, 3)
        np.testing.assert_array_equal(npmobile.load_model(path).predict(x), np.maximum(x, 0))


def test_a_lambda_no_output_depends_on_is_refused(relu_then_lambda, tmp_path):
    keras_path = _rewrite_keras(relu_then_lambda[".keras"], tmp_path / "unreachable.keras", _output_r)
    h5_path = tmp_path / "unreachable.h5"
    h5_path.write_bytes(relu_then_lambda[".h5"].read_bytes())
    with h5py.File(h5_path, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        _output_r(config)
        f.attrs["model_config"] = json.dumps(config)
    for path in (keras_path, h5_path):
        for trusted in (False, True):
            with pytest.raises(UnsupportedLayerError, match="'double' is a Lambda layer") as info:
                npmobile.load_model(path, trusted=trusted)
            assert str(path) in str(info.value)
        # Nor are its weights put on an architecture, nor is it handed to Keras by verify (whose status for
        # "could not run" is 3).
        for command, status in ((["classify", str(SAMPLES / "chelsea.jpg"), "--weights", str(path)], 1),
                                (["verify", str(path), str(SAMPLES / "chelsea.jpg")], 3)):
            result = subprocess.run([sys.executable, "-m", "npmobile", *command], capture_output=True, text=True,
                                    timeout=300)
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            assert result.returncode == status and len(lines) == 1 and "Lambda" in lines[0], result.stderr[-2000:]


def _duplicate(source: Path, target: Path, name: str, content: bytes) -> Path:
    """A copy of a zip with a second member called ``name`` added after the first."""
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(target, "w") as out:
        for info in archive.infolist():
            out.writestr(info, archive.read(info))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zipfile warns of the duplicate it is asked to write
            out.writestr(name, content)
    return target


def test_archive_members_with_one_name_twice_are_refused(relu_then_lambda, tmp_path):
    torch = pytest.importorskip("torch")
    pth = tmp_path / "state.pth"
    torch.save({"weight": torch.ones(4)}, pth)
    with zipfile.ZipFile(pth) as archive:
        storage = next(n for n in archive.namelist() if n.endswith("/data/0"))
    forged = _duplicate(pth, tmp_path / "forged.pth", storage, np.full(4, 7, np.float32).tobytes())
    for trusted in (False, True):
        with pytest.raises(ModelFileError, match="two members named") as info:
            npmobile.io.torch.read_state_dict(forged) if trusted else \
                npmobile.isolation.read_file(forged, "any")
        assert storage in str(info.value)
    keras_path = _rewrite_keras(relu_then_lambda[".keras"], tmp_path / "plain.keras", _output_r)
    forged = _duplicate(keras_path, tmp_path / "forged.keras", "config.json", b"{}")
    assert "two members named 'config.json'" in _load_error(forged)
